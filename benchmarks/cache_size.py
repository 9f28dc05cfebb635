"""Disk size of the frozen-feature cache for each family's headline checkpoint: per sample and
for the paper's training mix (PNG + RefCOCO + RefCOCO+ + RefCOCOg). Shapes and dtypes only, no
GPU and no data.

What :mod:`flmm.model.feature_cache` stores (``split_capture`` / ``to_storage``):

    LMM entry, one per sample       maps          K x C x F x F  fp16  (K phrases; C = parts x L x
                                                                       H channels; F x F frame)
                                    hidden        S x R x D      fp16  (S = text layers kept: all
                                                                       L by default; R phrase tokens)
                                    token_phrase  R              int64
                                    region        4              float32
    SAM entry, one per distinct     embedding     256 x 64 x 64  fp16  (SAM ViT-B/L/H at 1024 px)
    image                           input_size    2              int64

Each entry is one ``torch.save`` file; its container overhead is measured here by saving one.
A tensor that would overflow fp16 is stored as float32 (twice the bytes): not counted here.

    python benchmarks/cache_size.py            # the table, markdown
    python benchmarks/cache_size.py --json cache_size.json
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flmm.lmm import grids

FP16, INT64, FP32 = 2, 8, 4
SAM_EMBEDDING = (256, 64, 64)  # SAM's image embedding at 1024 px, every released variant


@dataclass(frozen=True)
class Shape:
    """What sets a family's cache entry size: text decoder ``layers`` x ``heads``, width
    ``hidden``, attention frame side ``grid`` and ``parts`` grids per phrase (2: any-res)."""

    checkpoint: str
    layers: int
    heads: int
    hidden: int
    grid: int
    parts: int = 1

    @property
    def channels(self) -> int:
        return self.parts * self.layers * self.heads


# Each headline checkpoint's config.json (text decoder: num_hidden_layers, num_attention_heads,
# hidden_size) and its family's frame rule (flmm.lmm.grids): LLaVA-1.5 CLIP-L/336 24 x 24 tokens;
# NeXT 2 x its 24 base side; DeepSeek-VL SigLIP-L/384 at patch 16: 24; InternVL3 448 px / 14
# after pixel shuffle 0.5: 16; Qwen2.5-VL, Qwen3-VL and GLM-4V the family's fixed 32; OneVision 2 x SigLIP 384/14 = 27;
# SmolVLM2 / SmolVLM (Idefics3) crops: the families' fixed 32.
# Gemma 3 SigLIP 896/14 = 64 pooled 4 x 4: 16; PaliGemma 2 SigLIP 448/14: 32.
# Mistral 3 (Pixtral) its fixed 32; Aya Vision its fixed 26 (2 x 364 / 28).
HEADLINE = {
    "llava": Shape("llava-hf/llava-1.5-7b-hf", 32, 32, 4096, 24),
    "llava_next": Shape("llava-hf/llava-v1.6-vicuna-7b-hf", 32, 32, 4096, 48, 2),
    "deepseek_vl_hybrid": Shape("deepseek-community/deepseek-vl-7b-chat", 30, 32, 4096, 24),
    "deepseek_vl": Shape("deepseek-community/deepseek-vl-1.3b-chat", 24, 16, 2048, 24),
    "qwen2_5_vl": Shape("Qwen/Qwen2.5-VL-7B-Instruct", 28, 28, 3584, 32),
    "internvl": Shape("OpenGVLab/InternVL3-8B-hf", 28, 28, 3584, 32, 2),
    "llava_onevision": Shape("llava-hf/llava-onevision-qwen2-7b-ov-hf", 28, 28, 3584, 54, 2),
    "smolvlm": Shape("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", 32, 15, 960, 32, 2),
    "idefics3": Shape("HuggingFaceTB/SmolVLM-256M-Instruct", 30, 9, 576, 32, 2),
    "gemma3": Shape("google/gemma-3-4b-it", 34, 8, 2560, 16),
    "paligemma": Shape("google/paligemma2-3b-mix-448", 26, 8, 2304, 32),
    "mistral3": Shape("mistralai/Mistral-Small-3.1-24B-Instruct-2503", 40, 32, 5120, 32),
    "aya_vision": Shape("CohereLabs/aya-vision-8b", 32, 32, 4096, 26, 2),
    "qwen3_vl": Shape("Qwen/Qwen3-VL-8B-Instruct", 36, 32, 4096, 32),
    "qwen3_vl_moe": Shape("Qwen/Qwen3-VL-30B-A3B-Instruct", 48, 32, 2048, 32),
    "glm4v": Shape("zai-org/GLM-4.1V-9B-Thinking", 40, 32, 4096, 32),
    "glm4v_moe": Shape("zai-org/GLM-4.5V", 46, 96, 4096, 32),
}


@dataclass(frozen=True)
class Component:
    """One training set of the mix: ``samples`` as its data module builds them (one per image for
    the RefCOCO family, one per narrative for PNG), mean ``phrases`` per sample, mean ``words``
    per phrase, and where these numbers come from."""

    name: str
    samples: int
    phrases: float
    words: float
    source: str


TFDS = "TFDS ref_coco catalog (refer's refs(*).p)"
MIX = (
    Component(
        "png",
        133_103,
        5.0,
        2.5,
        "train2017 narratives as the PNG paper is quoted (count yours: len(PNGDataset(root, "
        "'train2017', 'train'))); 5 grounded phrases of 2.5 words a narrative: assumed",
    ),
    Component("refcoco", 16_994, 42_404 / 16_994, 3.5, f"unc train: 42,404 objects, {TFDS}"),
    Component("refcoco+", 16_992, 42_278 / 16_992, 3.5, f"unc train: 42,278 objects, {TFDS}"),
    Component("refcocog", 21_899, 42_226 / 21_899, 8.4, f"umd train: 42,226 objects, {TFDS}"),
)
TOKENS_PER_WORD = 1.3  # assumed: sub-word tokenizers on English referring expressions
# distinct images of the whole mix: COCO train2017 holds every train2014 image RefCOCO uses, and
# SAM entries are keyed by the decoded pixels, so each image is embedded once
COCO_TRAIN2017_IMAGES = 118_287


def shape_of(lmm) -> Shape:
    """The :class:`Shape` of a loaded :class:`~flmm.lmm.FrozenLMM`."""
    heads = lmm.text_config.num_attention_heads
    parts = grids.PARTS[lmm.family.grid]
    return Shape(lmm.model_id, lmm.num_layers, heads, lmm.hidden_size, lmm.grid[0], parts)


def lmm_entry_bytes(shape: Shape, phrases: float, tokens: float, text_layers: int | None = None):
    """Tensor bytes of one sample's LMM entry (``phrases`` phrases of ``tokens`` tokens in all)."""
    kept = text_layers or shape.layers
    maps = phrases * shape.channels * shape.grid**2 * FP16
    return maps + tokens * (kept * shape.hidden * FP16 + INT64) + 4 * FP32


def sam_entry_bytes(embedding: tuple[int, ...] = SAM_EMBEDDING) -> int:
    """Tensor bytes of one image's SAM entry."""
    return int(torch.Size(embedding).numel()) * FP16 + 2 * INT64


def container_overhead() -> dict[str, int]:
    """Bytes a ``torch.save`` file adds to its tensors' bytes, for each kind of entry."""
    lmm = {
        "maps": torch.zeros(1, 8, 4, 4, dtype=torch.float16),
        "hidden": torch.zeros(2, 3, 8, dtype=torch.float16),
        "token_phrase": torch.zeros(3, dtype=torch.long),
        "region": torch.zeros(4),
    }
    sam = {"embedding": torch.zeros(4, 2, 2, dtype=torch.float16), "input_size": torch.zeros(2)}
    out = {}
    for name, entry in (("lmm", lmm), ("sam", sam)):
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        out[name] = buffer.tell() - sum(t.numel() * t.element_size() for t in entry.values())
    return out


def family_sizes(family: str, overhead: dict[str, int]) -> dict:
    """Bytes per sample of each mix component and the whole mix's cache for ``family``."""
    shape = HEADLINE[family]
    sam = sam_entry_bytes() + overhead["sam"]
    parts = {}
    for c in MIX:
        tokens = c.phrases * c.words * TOKENS_PER_WORD
        lmm = lmm_entry_bytes(shape, c.phrases, tokens) + overhead["lmm"]
        parts[c.name] = {"samples": c.samples, "lmm_bytes": lmm, "sample_bytes": lmm + sam}
    samples = sum(c.samples for c in MIX)
    lmm_total = sum(p["samples"] * p["lmm_bytes"] for p in parts.values())
    mix = lmm_total + min(samples, COCO_TRAIN2017_IMAGES) * sam
    return {
        **asdict(shape),
        "channels": shape.channels,
        "bytes_per_phrase": shape.channels * shape.grid**2 * FP16,
        "bytes_per_token": shape.layers * shape.hidden * FP16 + INT64,
        "components": parts,
        "mix_samples": samples,
        "mix_bytes_per_sample": mix / samples,
        "mix_bytes": mix,
    }


def report() -> dict:
    """Every headline family's sizes, with the mix's numbers and their sources."""
    overhead = container_overhead()
    return {
        "mix": [asdict(c) for c in MIX],
        "tokens_per_word": TOKENS_PER_WORD,
        "sam_entries": COCO_TRAIN2017_IMAGES,
        "container_overhead_bytes": overhead,
        "families": {f: family_sizes(f, overhead) for f in HEADLINE},
    }


def markdown(sizes: dict) -> str:
    """The families' table: per phrase, per token, per sample of each component, the mix."""
    names = [c.name for c in MIX]
    lines = [
        "| family (checkpoint) | MB/phrase | MB/token | "
        + " | ".join(f"MB/sample {n}" for n in names)
        + " | MB/sample mix | mix TB |",
        "|---|" + "---|" * (len(names) + 4),
    ]
    for family, s in sizes["families"].items():
        per = [f"{s['components'][n]['sample_bytes'] / 1e6:.1f}" for n in names]
        lines.append(
            f"| {family} ({s['checkpoint']}) | {s['bytes_per_phrase'] / 1e6:.2f} | "
            f"{s['bytes_per_token'] / 1e6:.3f} | {' | '.join(per)} | "
            f"{s['mix_bytes_per_sample'] / 1e6:.1f} | {s['mix_bytes'] / 1e12:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the sizes here")
    args = parser.parse_args(argv)
    sizes = report()
    print(markdown(sizes))
    if args.json:
        args.json.write_text(json.dumps(sizes, indent=1) + "\n")
    return sizes


if __name__ == "__main__":
    main()
