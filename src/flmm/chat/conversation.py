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
from contextlib import nullcontext
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
from flmm.errors import FlmmUserError
from flmm.foundation.cache import shipped_tiny_sam
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.lmm.loading import placed_dtype
from flmm.model.checkpoint import read_checkpoint, resolve
from flmm.model.module import FLMM, Grounding
from flmm.model.pretrained import FLMMHead, head_device

COT_QUESTION = "{question} What is the object most relevant to the question?"
COT_PREFIX = "The object most relevant to the question is"
SAM_VARIANTS = ("vit_b", "vit_l", "vit_h", "tiny")
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

    cot_in_turn = False

    def __init__(self, model: FLMM, selector: KeywordSelector | None = None) -> None:
        self.model = model.eval()
        self.lmm: FrozenLMM = model.lmm
        self.selector = selector
        self.decoding: dict = {}

    @classmethod
    def from_pretrained(
        cls,
        head: str,
        lmm: str | None = None,
        sam: str | None = None,
        selector: str | None = None,
        device: str | None = None,
        **kw,
    ) -> GroundedChat:
        """Load a head folder (``save_pretrained``, or ``<run>/model`` of training) or hub id,
        with the LMM and SAM its config.json names.

        Args:
            lmm, sam: replace the recorded LMM (hub id or folder) and SAM checkpoint.
            selector: keyword selector file; None = ``selector.pt`` in the folder if any, else
                beside the run's checkpoints (``<run>/checkpoints``) for a run's model folder.
            device: where the head goes (and the LMM, unless ``device_map`` places it); None:
                where the LMM was loaded (the CPU unless ``device_map`` or bitsandbytes put it).
            kw: :meth:`FLMMHead.from_pretrained`'s: the head's files (``revision``...), the
                LMM's (``lmm_revision``, ``dtype``, ``device_map``, ``quantization``,
                ``attn_implementation``, ``trust_remote_code``...), both (``cache_dir``...).
        """
        model = FLMMHead.from_pretrained(head, lmm=lmm, sam=sam, device=device, **kw).model
        beside = [Path(head) / SELECTOR_FILE, Path(head).parent / "checkpoints" / SELECTOR_FILE]
        return cls(model, load_selector(selector, beside, model, model.device))

    @classmethod
    def from_checkpoint(
        cls,
        lmm: str,
        checkpoint: str,
        sam: str | None = None,
        family: str | None = None,
        sam_variant: str | None = None,
        selector: str | None = None,
        device: str | None = None,
        lmm_revision: str | None = None,
        **kw,
    ) -> GroundedChat:
        """Load the frozen LMM (``lmm``: hub id or folder), SAM and an F-LMM ``checkpoint``.

        Args:
            sam: SAM checkpoint; None = the one the checkpoint records (:func:`recorded_sam`).
            family: the LMM family; None = the one the checkpoint records.
            sam_variant: ``vit_b|vit_l|vit_h|tiny``; None = recorded, or read from the file name.
            selector: keyword selector file; None = ``selector.pt`` beside the checkpoint if any.
            device: as in :meth:`from_pretrained`.
            lmm_revision: the LMM's hub revision; None = the one the checkpoint records.
            kw: :meth:`FrozenLMM.from_pretrained`'s (``dtype``: ``"auto"`` for ``device``,
                ``device_map``, ``quantization``, ``cache_dir``, ``text_layers``...).
        """
        saved = read_checkpoint(checkpoint).get("flmm") or {}
        if sam is None:
            sam, sam_variant = recorded_sam(saved, checkpoint, sam_variant)
        family = family or saved.get("family", "llava")
        recorded = saved.get("lmm_revision") if lmm == saved.get("lmm_id") else None
        kw["dtype"] = placed_dtype(kw.get("dtype", "auto"), kw.get("device_map"), device)
        frozen = FrozenLMM.from_pretrained(lmm, family, revision=lmm_revision or recorded, **kw)
        sam_model = build_sam(sam_variant or sam_variant_of(sam), sam)
        model = FLMM.from_checkpoint(checkpoint, frozen, sam_model).to(head_device(device, frozen))
        beside = [Path(checkpoint).with_name(SELECTOR_FILE)]
        return cls(model, load_selector(selector, beside, model, model.device))

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
        image = as_image(image)
        if question is None:
            return self.model.ground(image, text, phrases)
        with self.lmm.user_turn(question):
            return self.model.ground(image, text, phrases)

    def ground_batch(
        self, images: list[ImageLike], texts: list[str], phrases: list[list[str]]
    ) -> list[Grounding]:
        """:meth:`ground` (no question) for several images in one batched model pass."""
        images = [as_image(image) for image in images]
        return self.model.ground_batch(images, texts, phrases)

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
        with self.lmm.user_turn(question) if question is not None else nullcontext():
            spans = self.selector.select_many(self.lmm, images, answers)
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


def load_selector(path: str | None, beside: list[Path], model: FLMM, device: str):
    """The keyword selector at ``path``, else the first file of ``beside`` that exists, else None."""
    path = path or next((p for p in beside if p.is_file()), None)
    return KeywordSelector.load(path, model.lmm.hidden_size).to(device) if path else None


def recorded_sam(saved: dict, checkpoint: str, variant: str | None) -> tuple[str, str | None]:
    """The SAM file and variant a checkpoint's metadata (``saved``) records; the synthetic
    world's tiny SAM for a checkpoint from before SAM was recorded. A recorded file that is not
    there is a :class:`FlmmUserError` naming it and ``--sam``."""
    source = saved.get("sam") or {}
    if not source.get("checkpoint"):
        return shipped_tiny_sam(), variant
    path = resolve(source["checkpoint"])
    if not Path(path).is_file():
        raise FlmmUserError(
            f"{checkpoint} was trained with SAM {source['variant']} from {path}, which is not "
            "there; pass the SAM checkpoint (--sam PATH, --sam-variant VARIANT)"
        )
    return path, variant or source["variant"]


def object_phrase(object_text: str) -> str:
    """The object named by a visual-CoT completion: its first sentence after the prefix."""
    return object_text.removeprefix(COT_PREFIX).split(".")[0].strip()


def object_span(object_text: str) -> tuple[str, tuple[int, int]]:
    """The object a visual-CoT completion names (:func:`object_phrase`) and its span there."""
    phrase = object_phrase(object_text)
    start = object_text.index(phrase, len(COT_PREFIX))
    return phrase, (start, start + len(phrase))


def sam_variant_of(path: str) -> str:
    """SAM variant named in a checkpoint file name (``sam_vit_l_0b3195.pth`` -> ``vit_l``)."""
    name = Path(path).name
    found = [v for v in SAM_VARIANTS if v in name]
    if len(found) != 1:
        raise FlmmUserError(
            f"cannot tell the SAM variant from the file name {name!r}; pass sam_variant= "
            f"(one of {', '.join(SAM_VARIANTS)})"
        )
    return found[0]
