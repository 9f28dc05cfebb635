"""Shared fixtures: a tiny LLaVA-1.5 saved to disk once per session, and grounding batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flmm.foundation.tiny_llava import build_tiny_llava
from flmm.types import GroundingBatch, GroundingSample


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA-1.5 (4 layers x 4 heads, 12 x 12 image grid) saved with save_pretrained."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def make_sample(
    text: str, phrases: list[str], height: int, width: int, seed: int = 0
) -> GroundingSample:
    """A random image of ``height x width`` and ``text`` with the first occurrence of each phrase."""
    rng = np.random.default_rng(seed)
    spans = [(text.index(p), text.index(p) + len(p)) for p in phrases]
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return GroundingSample(image, text, spans, np.zeros((len(spans), height, width), dtype=bool))


@pytest.fixture
def sample_factory():
    """``make_sample(text, phrases, height, width, seed=0)`` as a fixture."""
    return make_sample


@pytest.fixture
def ragged_batch() -> GroundingBatch:
    """Three samples with 2, 3 and 1 phrases, different text lengths and image shapes."""
    return GroundingBatch.collate(
        [
            make_sample("The red circle, left.", ["red circle", "left"], 60, 90, seed=0),
            make_sample(
                "a blue square and a green star on the right top",
                ["blue square", "green star", "right top"],
                90,
                40,
                seed=1,
            ),
            make_sample("red", ["red"], 50, 50, seed=2),
        ]
    )
