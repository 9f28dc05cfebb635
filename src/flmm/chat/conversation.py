"""Grounded conversation: ask a frozen LMM about an image, see where the things it names are.

``chat`` generates the answer with the plain HF ``generate`` (KV cache, greedy or sampled, the
text is exactly what ``generate`` gives), then runs one teacher-forced forward of the whole
conversation (user: image + question, assistant: answer) with attention capture. The decoder is
causal, so the rows of the answer tokens in that forward are the attention those tokens had while
being generated. Phrases come from the user, from the keyword selector, or, with no selector
loaded, from the noun-phrase rule of :mod:`flmm.chat.fallback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread

import numpy as np
import torch
from transformers import TextIteratorStreamer, TextStreamer

from flmm.chat.fallback import noun_phrase_spans
from flmm.chat.images import ImageLike, as_image
from flmm.chat.selector import SELECTOR_FILE, KeywordSelector
from flmm.data.masks import expand_box, largest_region, mask_box
from flmm.data.synthetic.corpus import COT_ANSWER
from flmm.data.synthetic.corpus import COT_QUESTION as COT_ASKED
from flmm.errors import FlmmUserError
from flmm.lmm import FrozenLMM
from flmm.model.loader import load_source
from flmm.model.network import FLMMModel
from flmm.model.predictor import FLMMPredictor, Grounding

# the visual chain of thought's question and answer prefix: the tiny LLaVA's pretraining words
# (flmm.data.synthetic.corpus), written as sentences after the user's question
COT_QUESTION = f"{{question}} {COT_ASKED.capitalize()}"
COT_PREFIX = COT_ANSWER.capitalize()
# where the grounded phrases of an answer come from (ChatResult.phrases_from)
GIVEN, SELECTOR, NOUN_RULE = "given", "keyword selector", "noun-phrase rule"


@dataclass
class ChatResult:
    """An answer and its grounded phrases on an ``H x W`` image.

    Attributes:
        question, answer: the user's question and the LMM's answer.
        phrases, spans: the grounded phrases and their character spans in ``answer``.
        masks: ``K x H x W`` bool, one per phrase.
        missing: user phrases that the answer does not contain (not grounded).
        phrases_from: who chose the phrases: ``given`` (the caller), ``keyword selector``, or
            ``noun-phrase rule`` (no selector loaded: :mod:`flmm.chat.fallback`); empty where
            no answer was grounded by :meth:`GroundedChat.chat`.
    """

    question: str
    answer: str
    phrases: list[str]
    spans: list[tuple[int, int]]
    masks: np.ndarray
    missing: list[str] = field(default_factory=list)
    phrases_from: str = ""


@dataclass
class VisualCoT:
    """Visual chain of thought: name the relevant object, ground it, ask again with its crop.

    Attributes:
        question: the user's question.
        object_text: the LMM's "The object most relevant to the question is ..." completion.
        mask: ``H x W`` bool mask of the object, None if nothing could be grounded.
        box: ``(x0, y0, x1, y1)`` of the mask, expanded a little (pixels, end-exclusive).
        answer: the final answer, given the whole image and the crop.
    """

    question: str
    object_text: str
    mask: np.ndarray | None
    box: tuple[int, int, int, int] | None
    answer: str


class _CallbackStreamer(TextStreamer):
    """A transformers streamer that hands each finished piece of text to ``on_text``."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class GroundedChat:
    """A trained F-LMM (``model.lmm`` is the frozen LMM) plus an optional keyword selector.

    ``cot_in_turn``: the visual chain of thought grounds the object it names inside its own
    turn instead of as a referring expression (POPE vcot on the synthetic world, shipped models:
    docs/development/tiny_llava.md, "Grounding the named object as F-LMM was trained to").

    ``decoding``: HF ``generate`` settings for the answers of :meth:`answer`, :meth:`stream` and
    :meth:`chat` (e.g. ``{"repetition_penalty": 1.2}``; a call's own settings win). The visual
    chain of thought's steps keep the model's own decoding (and ``flmm pope`` sets none).
    """

    def __init__(
        self,
        model: FLMMModel,
        selector: KeywordSelector | None = None,
        decoding: dict | None = None,
        cot_in_turn: bool = False,
    ) -> None:
        self.model = model.eval()
        self.predictor = FLMMPredictor(model)
        self.lmm: FrozenLMM = model.lmm
        self.selector = selector
        self.decoding: dict = dict(decoding or {})
        self.cot_in_turn = cot_in_turn

    @classmethod
    def from_pretrained(
        cls,
        head: str,
        lmm: str | None = None,
        sam: str | None = None,
        selector: str | None = None,
        device: str | None = None,
        decoding: dict | None = None,
        cot_in_turn: bool = False,
        **kw,
    ) -> GroundedChat:
        """Load a trained F-LMM with :func:`flmm.model.load`: a head folder (``save_pretrained``,
        or ``<run>/model`` of training) or its hub id, with the LMM and SAM its config.json names,
        or a training ``.ckpt``, with those its metadata names.

        Args:
            lmm, sam: replace the recorded LMM (hub id or folder) and SAM checkpoint.
            selector: keyword selector file; None = ``selector.pt`` in the folder (beside the
                ``.ckpt``) if any, else beside the run's checkpoints (``<run>/checkpoints``) for a
                run's model folder.
            device: where the head goes (and the LMM, unless ``device_map`` places it); None:
                where the LMM was loaded (the CPU unless ``device_map`` or bitsandbytes put it).
            decoding, cot_in_turn: see :class:`GroundedChat`.
            kw: :func:`flmm.model.loader.load_source`'s: the head's files (``revision``...), the
                LMM's (``lmm_revision``, ``family``, ``dtype``, ``device_map``, ``quantization``,
                ``attn_implementation``, ``trust_remote_code``...), both (``cache_dir``...),
                ``sam_variant``.
        """
        loaded = load_source(head, lmm=lmm, sam=sam, device=device, **kw)
        if loaded.folder is None:
            beside = [Path(head).with_name(SELECTOR_FILE)]
        else:
            beside = [loaded.folder / SELECTOR_FILE]
            beside.append(loaded.folder.parent / "checkpoints" / SELECTOR_FILE)
        found = load_selector(selector, beside, loaded.model)
        return cls(loaded.model, found, decoding, cot_in_turn)

    @classmethod
    def from_checkpoint(
        cls,
        lmm: str | None,
        checkpoint: str,
        sam: str | None = None,
        family: str | None = None,
        sam_variant: str | None = None,
        **kw,
    ) -> GroundedChat:
        """:meth:`from_pretrained` of a training ``checkpoint`` with the frozen LMM ``lmm`` (hub
        id or folder; None: the one the checkpoint records).

        Args:
            sam: SAM checkpoint; None = the one the checkpoint records.
            family: the LMM family; None = the one the checkpoint records.
            sam_variant: ``vit_b|vit_l|vit_h|tiny``; None = recorded, or read from the file name.
            kw: :meth:`from_pretrained`'s (``selector``, ``device``, ``lmm_revision``,
                ``dtype``: ``"auto"`` for ``device``, ``device_map``, ``quantization``...).
        """
        return cls.from_pretrained(
            checkpoint, lmm, sam, family=family, sam_variant=sam_variant, **kw
        )

    # ---------------------------------------------------------------------------- answering
    def answer(
        self,
        image: ImageLike,
        question: str,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        **gen,
    ) -> str:
        """The plain LMM answer (HF ``generate``, with :attr:`decoding`); ``seed=`` fixes the
        sampling."""
        return self._generate([image], question, max_new_tokens, do_sample, **self.decoding | gen)

    def stream(
        self,
        image: ImageLike,
        question: str,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        **gen,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated (same text as ``answer``)."""
        image = as_image(image)
        streamer = TextIteratorStreamer(
            self.lmm.processor.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        kwargs = {
            **self.decoding,
            **gen,
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "streamer": streamer,
        }
        failed: list[Exception] = []

        def work() -> None:
            try:
                self._generate([image], question, **kwargs)
            except Exception as err:  # noqa: BLE001 (re-raised in the caller, after the stream)
                failed.append(err)
                streamer.end()

        worker = Thread(target=work)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if failed:
            raise failed[0]

    def _generate(
        self,
        images: list[ImageLike],
        question: str,
        max_new_tokens: int,
        do_sample: bool,
        seed: int | None = None,
        **gen,
    ) -> str:
        images = [as_image(image) for image in images]
        if seed is not None:
            torch.manual_seed(seed)
        return self.lmm.generate(
            images, question, max_new_tokens=max_new_tokens, do_sample=do_sample, **gen
        )

    # ---------------------------------------------------------------------------- grounding
    def ground(
        self, image: ImageLike, text: str, phrases: list[str], question: str | None = None
    ) -> Grounding:
        """Masks for ``phrases`` of ``text``; with ``question``, ``text`` is its answer turn."""
        return self.predictor.ground(as_image(image), text, phrases, question)

    def ground_batch(
        self, images: list[ImageLike], texts: list[str], phrases: list[list[str]]
    ) -> list[Grounding]:
        """:meth:`ground` (no question) for several images in one batched model pass."""
        images = [as_image(image) for image in images]
        return self.predictor.ground_batch(images, texts, phrases)

    def keywords(self, image: ImageLike, question: str | None, answer: str) -> list[str]:
        """The key phrases of ``answer`` that the keyword selector picks (in order), its noun
        phrases (:mod:`flmm.chat.fallback`) when no selector is loaded; with ``question`` None,
        ``answer`` follows the grounding instruction (as in :meth:`ground`)."""
        return self.keywords_batch([image], question, [answer])[0]

    def keywords_batch(
        self, images: list[ImageLike], question: str | None, answers: list[str]
    ) -> list[list[str]]:
        """:meth:`keywords` for several images and answers, in one LMM forward."""
        if self.selector is None:
            spans = [noun_phrase_spans(answer) for answer in answers]
            return [[a[s:e] for s, e in found] for a, found in zip(answers, spans)]
        images = [as_image(image) for image in images]
        spans = self.selector.select_many(self.lmm, images, answers, question)
        return [[a[s:e] for s, e in found] for a, found in zip(answers, spans)]

    def require_selector(self) -> KeywordSelector:
        """The keyword selector; a clear error when none is loaded."""
        if self.selector is None:
            raise FlmmUserError(
                "no keyword selector is loaded: pass phrases explicitly (--phrases ...), or train "
                f"one with `flmm train-selector` and put {SELECTOR_FILE} beside the F-LMM "
                "checkpoint or in its head folder"
            )
        return self.selector

    def chat(
        self,
        image: ImageLike,
        question: str,
        phrases: list[str] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        on_text: Callable[[str], None] | None = None,
        **gen,
    ) -> ChatResult:
        """Answer ``question``, then ground ``phrases`` of the answer (if None: the keyword
        selector's, or the answer's noun phrases where none is loaded; ``phrases_from`` of the
        result says which).

        ``on_text`` receives the answer's text pieces while it is generated; ``seed=`` fixes the
        sampling; other ``gen`` settings go to HF ``generate``.
        """
        image = as_image(image)
        if on_text is not None:
            gen["streamer"] = _CallbackStreamer(self.lmm.processor.tokenizer, on_text)
        text = self.answer(image, question, max_new_tokens, do_sample, **gen)
        result = self.grounded(image, question, text, *self.pick(image, question, text, phrases))
        result.phrases_from = self.phrase_source(phrases)
        return result

    def phrase_source(self, phrases: list[str] | None) -> str:
        """Who chooses the phrases of an answer when :meth:`pick` is given ``phrases``."""
        if phrases is not None:
            return GIVEN
        return SELECTOR if self.selector is not None else NOUN_RULE

    def pick(
        self, image: ImageLike, question: str, answer: str, phrases: list[str] | None
    ) -> tuple[list[str], list[str]]:
        """The ``phrases`` found in ``answer`` (in its order; :meth:`keywords` if None) and
        those missing from it."""
        if phrases is None:
            return self.keywords(image, question, answer), []
        found = sorted((p for p in phrases if p and p in answer), key=answer.find)
        return found, [p for p in phrases if p not in found]

    def grounded(
        self, image: ImageLike, question: str, answer: str, phrases: list[str], missing=()
    ) -> ChatResult:
        """A :class:`ChatResult` grounding ``phrases`` of ``answer``, given in their order there."""
        image = as_image(image)
        if not phrases:
            empty = np.zeros((0, *image.shape[:2]), dtype=bool)
            return ChatResult(question, answer, [], [], empty, list(missing))
        out = self.ground(image, answer, phrases, question)
        masks = out.masks.numpy()
        return ChatResult(question, answer, out.phrases, out.spans, masks, list(missing))

    # --------------------------------------------------------------- visual chain of thought
    def relevant_object(
        self, image: ImageLike, question: str, max_new_tokens: int = 32
    ) -> ChatResult:
        """The visual chain of thought's first step: the LMM completes "The object most relevant
        to the question is ..." (greedy) and the object it names is grounded as F-LMM grounds a
        referring expression, the phrase alone as the answer to its training instruction (with
        :attr:`cot_in_turn`: inside the chain-of-thought turn, where it was said)."""
        image = as_image(image)
        ask = COT_QUESTION.format(question=question)
        completion = self.lmm.generate(
            [image], ask, answer_prefix=COT_PREFIX, max_new_tokens=max_new_tokens, do_sample=False
        ).strip()
        object_text = f"{COT_PREFIX} {completion}"
        phrase, span = object_span(object_text)
        if self.cot_in_turn or not phrase:
            return self.grounded(image, ask, object_text, [phrase] if phrase else [])
        masks = self.ground(image, phrase, [phrase]).masks.numpy()
        return ChatResult(ask, object_text, [phrase], [span], masks)

    def visual_cot(self, image: ImageLike, question: str, max_new_tokens: int = 32) -> VisualCoT:
        """Ask for the most relevant object, ground it, crop the box of its mask's largest region
        (specks elsewhere would widen the crop to other objects), ask again with the crop."""
        image = as_image(image)
        step = self.relevant_object(image, question, max_new_tokens)
        mask = step.masks[0] if len(step.masks) and step.masks[0].any() else None
        box = None if mask is None else expand_box(mask_box(largest_region(mask)), image.shape[:2])
        if box is None:
            final = self._generate([image], question, max_new_tokens, False)
        else:
            crop = image[box[1] : box[3], box[0] : box[2]]
            final = self._generate([image, crop], question, max_new_tokens, False)
        return VisualCoT(question, step.answer, mask, box, final)


def load_selector(path: str | None, beside: list[Path], model: FLMMModel):
    """The keyword selector at ``path``, else the first file of ``beside`` that exists, else None;
    on ``model``'s device."""
    path = path or next((p for p in beside if p.is_file()), None)
    if path is None:
        return None
    return KeywordSelector.load(path, model.lmm.hidden_size).to(model.device)


def object_phrase(object_text: str) -> str:
    """The object named by a visual-CoT completion: its first sentence after the prefix."""
    return object_text.removeprefix(COT_PREFIX).split(".")[0].strip()


def object_span(object_text: str) -> tuple[str, tuple[int, int]]:
    """The object a visual-CoT completion names (:func:`object_phrase`) and its span there."""
    phrase = object_phrase(object_text)
    start = object_text.index(phrase, len(COT_PREFIX))
    return phrase, (start, start + len(phrase))
