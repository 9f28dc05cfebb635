"""Where the frozen LMM's attention points, by phrase kind: what F-LMM's mask head is given.

    python scripts/attention_pointing.py [--lmm DIR] [--world $FLMM_HOME/synthetic_world]
        [--limit N] [--output logs/attention_pointing.json]

For each phrase of the synthetic world's test split (the first ``--limit`` images), the captured
word-to-image attention maps, one per layer-head, exactly as the mask head reads them (the
phrase's rows merged by the LMM's ``merge``), and the maps of the phrase's last word alone. A map
*points* at the referent when its largest patch touches the object; its *mass* is the share of
the map on the patches the object touches. Per phrase kind, for the layer-head that does best on
that kind: the share of phrases it points at and its mean mass, beside the share of the grid the
referents touch (a map spread evenly has that mass). The world's images are square, so the
attention frame is the image. Writes the table as JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flmm.data.synthetic import SyntheticDataModule
from flmm.data.synthetic.write import DATASET
from flmm.errors import FlmmUserError, exit_on_user_error
from flmm.files import flmm_home
from flmm.foundation.cache import SHIPPED
from flmm.lmm import FrozenLMM
from flmm.types import GroundingBatch

BATCH = 8  # test images per forward


def split_loader(world: Path, batch_size: int = BATCH):
    """The test split of the world at ``world`` (as written, never regenerated)."""
    manifest = world / DATASET / "world.json"
    if not manifest.is_file():
        raise FlmmUserError(
            f"no synthetic world at {world} ({manifest} is missing): `make run` writes it, or "
            "pass --world DIR"
        )
    spec = json.loads(manifest.read_text())
    seed = spec.pop("seed")
    data = SyntheticDataModule(world, world_seed=seed, batch_size=batch_size, **spec)
    data.prepare_data()
    data.setup("test")
    loader = data.test_dataloader()
    return loader[0] if isinstance(loader, list) else loader


def last_words(batch: GroundingBatch) -> GroundingBatch:
    """``batch`` with each phrase span cut down to its last word."""
    spans = []
    for text, phrase_spans in zip(batch.texts, batch.spans):
        cut = []
        for start, end in phrase_spans:
            word = list(re.finditer(r"\w+", text[start:end]))[-1]
            cut.append((start + word.start(), start + word.end()))
        spans.append(cut)
    return GroundingBatch(batch.images, batch.texts, spans, batch.masks, batch.meta)


def pointing(maps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """For ``C x h x w`` maps and an ``H x W`` bool mask: per map, whether its largest patch
    touches the object and its mass on the patches the object touches; and their share of the
    grid."""
    touched = F.adaptive_max_pool2d(mask.float()[None, None], maps.shape[-2:])[0, 0] > 0
    flat, inside = maps.flatten(1), touched.flatten()
    points = inside[flat.argmax(1)]
    mass = (flat * inside).sum(1) / flat.sum(1).clamp_min(1e-12)
    return points, mass, float(inside.float().mean())


def measure(lmm: FrozenLMM, batches) -> dict[str, dict]:
    """Per phrase kind, the best layer-head's pointing share and mass (merged rows and last
    word), and the referents' share of the grid."""
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for batch in batches:
        merged, last = lmm(batch).maps, lmm(last_words(batch)).maps
        for b, (masks, meta) in enumerate(zip(batch.masks, batch.meta)):
            tags = meta.get("tags") or [{} for _ in masks]
            for k, mask in enumerate(masks):
                into = found[tags[k].get("kind", "all")]
                for name, maps in (("merged", merged), ("last_word", last)):
                    points, mass, area = pointing(maps[b, k], mask)
                    into[f"{name}_points"].append(points.float())
                    into[f"{name}_mass"].append(mass)
                into["area"].append(area)
    return {kind: summary(values) for kind, values in sorted(found.items())}


def summary(values: dict[str, list]) -> dict:
    out = {"phrases": len(values["area"]), "grid_share": round(float(np.mean(values["area"])), 3)}
    for name in ("merged", "last_word"):
        points = torch.stack(values[f"{name}_points"]).mean(0)
        mass = torch.stack(values[f"{name}_mass"]).mean(0)
        out[f"{name}_points"] = round(float(points.max()), 3)
        out[f"{name}_mass"] = round(float(mass.max()), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmm", default=str(SHIPPED["tiny_llava"]))
    parser.add_argument("--world", type=Path, default=flmm_home() / "synthetic_world")
    parser.add_argument(
        "--limit", type=int, help=f"test images, rounded up to batches of {BATCH} (default: all)"
    )
    parser.add_argument("--output", type=Path, default=Path("logs/attention_pointing.json"))
    args = parser.parse_args(argv)
    batches = exit_on_user_error(split_loader, args.world)
    if args.limit is not None:
        batches = islice(batches, -(-args.limit // BATCH))
    lmm = FrozenLMM.from_pretrained(args.lmm, dtype="float32").eval()
    with torch.no_grad():
        table = measure(lmm, batches)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(table, indent=1))
    for kind, row in table.items():
        print(kind, row)
    return table


if __name__ == "__main__":
    main()
