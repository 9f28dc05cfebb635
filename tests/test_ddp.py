"""Lightning DDP with 2 CPU processes (gloo) through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    cmd = [
        sys.executable,
        "-m",
        "flmm.train",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *overrides,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/giou"] <= 100.0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
