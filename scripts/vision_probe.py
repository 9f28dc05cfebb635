"""What the tiny LLaVA's image features carry: linear probes for each patch's colour, shape and
place.

    python scripts/vision_probe.py [--lmm DIR] [--train 512] [--test 256] [--output FILE]

The features are what the projector reads (the vision tower's ``vision_feature_layer``), one per
patch, for fresh scenes of their own RNG stream. A patch counts when one object covers at least
half of it; its label is that object's colour (or shape), or the patch's own row (or column) of
the grid. A softmax-regression probe is fitted on the ``--train`` scenes' patches and scored on
the ``--test`` scenes'. Accuracy near the majority share means the features do not say that
attribute, so nothing downstream (captions, existence answers, F-LMM's attention) can. Row and
column are also probed on the projector's output, the image tokens the language model reads
(``tokens``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.data.synthetic.corpus import pixel_labels
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import COLOURS, SHAPES, sample_scene
from flmm.foundation.cache import SHIPPED
from flmm.foundation.pretrain_lmm import first_image_features, make_batch, patch_shares

ATTRIBUTES = {"colour": len(COLOURS), "shape": len(SHAPES)}


def patch_features(model, processor, scenes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``P x C`` features of each scene's patches, and per attribute their ``P x (1 + K)`` pixel
    shares (background, then the attribute's ``K`` values)."""
    feats, shares = [], {name: [] for name in ATTRIBUTES}
    patch = model.config.vision_config.patch_size
    for k in range(0, len(scenes), 32):
        chunk = scenes[k : k + 32]
        batch = make_batch(processor, [([s.image], [("x", "y")]) for s in chunk])
        with torch.no_grad():
            _, f = first_image_features(model, batch, lambda b=batch: model(**b))
        feats.append(f.flatten(0, 1))
        labels = torch.from_numpy(np.stack([pixel_labels(s) for s in chunk]))
        for i, (name, n) in enumerate(ATTRIBUTES.items()):
            shares[name].append(patch_shares(labels[:, i], n + 1, patch).flatten(0, 1))
    return torch.cat(feats), {name: torch.cat(s) for name, s in shares.items()}


def object_patches(feats: torch.Tensor, shares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patches one object covers at least half of, and that object's attribute (0-based)."""
    top = shares[:, 1:].max(-1)
    keep = top.values >= 0.5
    return feats[keep], top.indices[keep]


def object_places(
    feats: torch.Tensor, shares: torch.Tensor, side: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The patches one object covers at least half of (``feats`` row-major, ``side`` x ``side``
    per scene), with each patch's row and column."""
    kept, _ = object_patches(torch.arange(len(feats)), shares)
    place = kept % (side * side)
    return {"row": (feats[kept], place // side), "column": (feats[kept], place % side)}


def probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 500) -> dict:
    """Fit a softmax regression on standardised ``train_x``; its test accuracy and the majority
    share of ``test_y``."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    linear = torch.nn.Linear(train_x.shape[1], int(max(train_y.max(), test_y.max())) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear((train_x - mean) / std), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (linear((test_x - mean) / std).argmax(-1) == test_y).float().mean().item()
    majority = torch.bincount(test_y).max().item() / len(test_y)
    return {"accuracy": round(accuracy, 3), "majority": round(majority, 3), "n": len(test_y)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmm", default=str(SHIPPED["tiny_llava"]))
    parser.add_argument("--train", type=int, default=512, help="scenes to fit the probes on")
    parser.add_argument("--test", type=int, default=256, help="scenes to score them on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    processor = AutoProcessor.from_pretrained(args.lmm)
    model = LlavaForConditionalGeneration.from_pretrained(args.lmm, dtype=torch.float32).eval()
    rng = np.random.default_rng([args.seed, Stream.PROBE])
    size = model.config.vision_config.image_size
    train, test = (
        patch_features(model, processor, [sample_scene(rng, size) for _ in range(n)])
        for n in (args.train, args.test)
    )
    out = {"lmm": args.lmm}
    for name in ATTRIBUTES:
        out[name] = probe_accuracy(
            *object_patches(train[0], train[1][name]), *object_patches(test[0], test[1][name])
        )
    side = size // model.config.vision_config.patch_size
    project = model.model.multi_modal_projector
    with torch.no_grad():
        tokens = [(project(feats), shares) for feats, shares in (train, test)]
    for prefix, (fit, score) in (("", (train, test)), ("tokens_", tokens)):
        fit_at, score_at = (object_places(f, s["colour"], side) for f, s in (fit, score))
        for name in ("row", "column"):
            out[prefix + name] = probe_accuracy(*fit_at[name], *score_at[name])
    text = json.dumps(out, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
