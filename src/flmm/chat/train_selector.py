"""`flmm train-selector [overrides]` (`python -m flmm.chat.train_selector`): train the keyword selector on grounded words.

The synthetic world's captions ("a large red circle at the top left. ...") name every object; the
object nouns (size, colour, shape) are the grounded words, the rest (articles, positions,
punctuation) are not. The frozen LMM's word states are computed once per split; a linear layer is
fit with BCE; precision / recall / F1 at the threshold (0.3) are reported on val and test and
written to ``metrics.json``; the weights go to ``output`` (put them beside an F-LMM checkpoint as
``selector.pt`` and :class:`flmm.chat.conversation.GroundedChat` loads them).
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from flmm.chat.selector import KeywordSelector, f1_scores, word_spans, word_states
from flmm.data.synthetic import sample_scene
from flmm.data.synthetic.corpus import CAPTION_PROMPT, region
from flmm.entry import hydra_entry
from flmm.errors import exit_on_user_error
from flmm.training.run_folder import write_metrics

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def grounded_caption(scene, rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """A caption naming every object of ``scene`` and the character spans of the object nouns."""
    text, spans = "", []
    for i in rng.permutation(len(scene.objects)):
        obj = scene.objects[i]
        sized = rng.random() < 0.5
        noun = f"{obj.size} {obj.colour} {obj.shape}" if sized else f"{obj.colour} {obj.shape}"
        article = "an" if noun[0] in "aeiou" else "a"
        start = len(text) + len(article) + 1
        spans.append((start, start + len(noun)))
        text += f"{article} {noun} {region(obj, scene.image.shape[0])}. "
    return text.strip(), spans


def word_labels(text: str, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``W`` bool: is each word of ``text`` inside one of the grounded ``spans``."""
    return torch.tensor(
        [any(s <= a and b <= e for s, e in spans) for a, b in word_spans(text)], dtype=torch.bool
    )


def split_data(
    lmm, n: int, seed: int, image_size: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``N_words x D`` word states and ``N_words`` labels of ``n`` fresh captioned scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, image_size) for _ in range(n)]
    captions = [grounded_caption(scene, rng) for scene in scenes]
    states, labels = [], []
    for i in range(0, n, batch_size):
        part = slice(i, i + batch_size)
        images = [s.image for s in scenes[part]]
        states += word_states(lmm, images, [t for t, _ in captions[part]], CAPTION_PROMPT)
    labels = [word_labels(text, spans) for text, spans in captions]
    return torch.cat(states), torch.cat(labels)


def fit_selector(
    selector: KeywordSelector,
    states: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    epochs: int,
    weight_decay: float,
) -> KeywordSelector:
    """Full-batch AdamW on BCE over the word states (they are few and precomputed)."""
    optimizer = torch.optim.AdamW(selector.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            selector(states), labels.float()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    log.info("keyword selector: final training BCE %.4f", loss.item())
    return selector.eval()


def train_selector(cfg: DictConfig) -> dict[str, float]:
    """Build word states for every split, fit the selector, report P/R/F1, save the weights."""
    L.seed_everything(cfg.seed)
    lmm = hydra.utils.instantiate(cfg.model.lmm).to(cfg.device)
    size, batch = cfg.data.image_size, cfg.data.batch_size
    data = {
        split: split_data(lmm, cfg.data[f"n_{split}"], cfg.data.seed + i, size, batch)
        for i, split in enumerate(SPLITS)
    }
    selector = KeywordSelector(lmm.hidden_size, cfg.threshold, lmm.model_id)
    fit_selector(selector, *data["train"], cfg.lr, cfg.epochs, cfg.weight_decay)
    metrics = {}
    with torch.no_grad():
        for split, (states, labels) in data.items():
            pred = selector(states).sigmoid() > selector.threshold
            scores = f1_scores(pred, labels)
            metrics.update({f"{split}/{k}": v for k, v in scores.items()})
            metrics[f"{split}/words"] = float(len(labels))
    path = selector.save(cfg.output)
    log.info("keyword selector written to %s", path)
    return write_metrics(metrics, cfg.paths.output_dir)


@hydra_entry("selector")
def main(cfg: DictConfig) -> float | None:
    metrics = exit_on_user_error(train_selector, cfg)
    return metrics.get("val/f1")


if __name__ == "__main__":
    main()
