"""Shared fixtures: a tiny LLaVA-1.5 saved to disk once per session, and grounding batches."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from flmm.entry import CONFIG_PATH, setup_configs
from flmm.foundation.cache import LATER_STAGES
from flmm.foundation.tiny_llava import build_tiny_llava
from flmm.train import train
from flmm.types import GroundingBatch, GroundingSample

# as every command does before it composes: model=<family>_tiny, the resolvers, ./conf first
setup_configs()


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


# No test writes into the user's flmm home (~/.cache/flmm): a test that forgets paths_at() used
# to leave a tiny world there, which a later `make run` refused as "a different synthetic world".
os.environ["FLMM_HOME"] = tempfile.mkdtemp(prefix="flmm-home-")


def load_script(relative: str):
    """A script of the repository (``scripts/x.py``, ``benchmarks/x.py``) imported as a module."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    sys.path.insert(0, str(path.parent))  # as `python <script>` does: its siblings import by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def paths_at(root: Path) -> list[str]:
    """Overrides that put everything a run reads or writes under ``root``: its home (the world,
    the foundation cache) and its runs."""
    return [f"paths.home_dir={root}", f"paths.root_dir={root}"]


def run_flmm(
    module: str, root: Path, *overrides: str, timeout: int = 900, home: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """``python -m flmm.<module> <paths_at(root)> ...`` in ``root``: offline, one thread,
    output captured; ``env`` adds environment variables. ``home=False``: flmm's own home (the
    user's cache folder or $FLMM_HOME), as a user's command has."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    paths = paths_at(root) if home else []
    cmd = [sys.executable, "-m", f"flmm.{module}", *paths, *overrides]
    return subprocess.run(
        cmd, cwd=root, env=environ, capture_output=True, text=True, timeout=timeout, check=False
    )


# ------------------------------------------------------------ the real configs, at a tiny size
CONF = Path(CONFIG_PATH)
# Small enough for the fast suite, through every real code path: world generation, tiny LLaVA
# build + vision, language and every later stage (instruction, VQA, negatives), tiny SAM build +
# pretraining, F-LMM fit, checkpoint, test.
TINY = [
    "data.n_train=24",
    "data.n_val=8",
    "data.n_test=8",
    "data.batch_size=4",
    "model.lmm.name_or_path.pretrain_steps=2",
    *[f"model.lmm.name_or_path.{stage}.steps=2" for stage in LATER_STAGES],
    "model.lmm.name_or_path.vision_stage.steps=2",
    "model.lmm.name_or_path.batch_size=4",
    "model.sam.checkpoint.pretrain_steps=2",
    "model.base_channels=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
]


def compose_cfg(root: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*paths_at(root), *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.hydra.runtime.output_dir = str(root / "run")
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flmm")
    cfg = compose_cfg(root, TINY)
    metrics = train(cfg)
    return root, cfg, metrics
