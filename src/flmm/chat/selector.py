"""Which words of an answer to ground: a learned keyword selector on the frozen LMM's states.

As in the paper, a linear layer reads the frozen LMM's last-layer hidden state and a sigmoid
above ``threshold`` (0.3) marks a key word. Decisions are per word (``\\w+`` or one punctuation
mark); a word's state is the mean over its tokens, found through the tokenizer's character
offsets (:meth:`flmm.lmm.FrozenLMM.encode`). Runs of consecutive key words become phrases.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flmm.errors import CheckpointMismatchError
from flmm.files import load_torch_file
from flmm.types import GroundingBatch, GroundingSample

WORD = re.compile(r"\w+|[^\w\s]")
SELECTOR_FILE = "selector.pt"


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words (``\\w+``) and punctuation marks of ``text``."""
    return [m.span() for m in WORD.finditer(text)]


@torch.no_grad()
def word_states(
    lmm, images: list[np.ndarray], texts: list[str], question: str | None = None
) -> list[torch.Tensor]:
    """Per text, ``W x D`` last-layer hidden states of its words (mean over each word's tokens).

    ``lmm`` is a :class:`flmm.lmm.FrozenLMM`; the texts are its assistant turns (teacher forcing)
    answering ``question`` (None: the grounding instruction, :meth:`FrozenLMM.prompt`).
    """
    samples = []
    for image, text in zip(images, texts):
        spans = word_spans(text)
        empty = np.zeros((len(spans), 1, 1), dtype=bool)
        samples.append(GroundingSample(image, text, spans, empty))
    batch = GroundingBatch.collate(samples)
    out = lmm(batch, question)
    states = []
    for b, spans in enumerate(batch.spans):
        rows = out.token_phrase[b]
        keep = rows >= 0
        sums = out.hidden.new_zeros(len(spans), out.hidden.shape[-1])
        sums.index_add_(0, rows[keep], out.hidden[b, -1][keep])
        counts = torch.bincount(rows[keep], minlength=len(spans)).clamp(min=1)
        states.append((sums / counts[:, None]).cpu())
    return states


def runs(keep: list[bool], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge runs of consecutive kept words into phrase spans ``(start of first, end of last)``."""
    phrases: list[tuple[int, int]] = []
    previous = False
    for kept, (start, end) in zip(keep, spans):
        if kept and previous:
            phrases[-1] = (phrases[-1][0], end)
        elif kept:
            phrases.append((start, end))
        previous = kept
    return phrases


class KeywordSelector(nn.Module):
    """``Linear(D, 1)`` over word states; a word is a key word when its sigmoid is > ``threshold``.

    Args:
        hidden_size: ``D`` of the frozen LMM.
        threshold: decision threshold on the sigmoid (the paper uses 0.3).
        lmm_id: the LMM whose states it was trained on (checked when loading).
    """

    def __init__(self, hidden_size: int, threshold: float = 0.3, lmm_id: str = "") -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.threshold = float(threshold)
        self.lmm_id = lmm_id

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``W x D`` word states -> ``W`` logits."""
        return self.linear(states.float()).squeeze(-1)

    def select(
        self, lmm, image: np.ndarray, text: str, question: str | None = None
    ) -> list[tuple[int, int]]:
        """Character spans of the key phrases of ``text`` (an assistant turn about ``image``,
        answering ``question``)."""
        return self.select_many(lmm, [image], [text], question)[0]

    @torch.no_grad()
    def select_many(
        self, lmm, images: list[np.ndarray], texts: list[str], question: str | None = None
    ) -> list[list[tuple[int, int]]]:
        """:meth:`select` for several images and texts (answers to ``question``, None: the
        grounding instruction), in one LMM forward."""
        todo = [i for i, text in enumerate(texts) if WORD.search(text)]
        found: list[list[tuple[int, int]]] = [[] for _ in texts]
        if not todo:
            return found
        states = word_states(lmm, [images[i] for i in todo], [texts[i] for i in todo], question)
        for i, words in zip(todo, states):
            spans = word_spans(texts[i])
            keep = (self(words.to(self.linear.weight.device)).sigmoid() > self.threshold).tolist()
            # no punctuation
            keep = [k and texts[i][s:e][0].isalnum() for k, (s, e) in zip(keep, spans)]
            found[i] = runs(keep, spans)
        return found

    def save(self, path: str | Path) -> Path:
        """Write weights and metadata (hidden size, threshold, LMM id) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "hidden_size": self.linear.in_features,
            "threshold": self.threshold,
            "lmm_id": self.lmm_id,
        }
        torch.save({"selector": meta, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, hidden_size: int | None = None) -> KeywordSelector:
        """Load a selector written by :meth:`save`; check it fits an LMM of ``hidden_size``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"keyword selector not found: {path}; "
                "train one with `python -m flmm.chat.train_selector`"
            )
        saved = load_torch_file(path, "keyword selector")
        if not isinstance(saved, dict) or "selector" not in saved:
            raise CheckpointMismatchError(f"{path} is not a keyword selector written by flmm")
        meta = saved["selector"]
        if hidden_size is not None and meta["hidden_size"] != hidden_size:
            raise CheckpointMismatchError(
                f"keyword selector {path} was trained on LMM {meta['lmm_id']!r} (hidden size "
                f"{meta['hidden_size']}), but this LMM's hidden size is {hidden_size}; "
                "retrain it with `python -m flmm.chat.train_selector` for this LMM"
            )
        selector = cls(meta["hidden_size"], meta["threshold"], meta["lmm_id"])
        selector.load_state_dict(saved["state_dict"], strict=True)
        return selector.eval()


def f1_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of boolean word decisions ``pred`` against ``target``."""
    tp = float((pred & target).sum())
    precision = tp / max(1.0, float(pred.sum()))
    recall = tp / max(1.0, float(target.sum()))
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}
