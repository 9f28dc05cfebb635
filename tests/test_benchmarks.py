"""The training-throughput benchmark runs end to end, and its reference-style case computes what
this project computes (same attention maps, same refined masks), only the reference's way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, load_script, paths_at


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/train_throughput.py")


@pytest.fixture(scope="module")
def rig(bench, tmp_path_factory):
    return bench.Rig.build(bench.PRESETS["tiny"], tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
def test_reference_capture_matches_flmm_capture(bench, preset, tmp_path):
    rig = bench.Rig.build(bench.PRESETS[preset], tmp_path)
    lmm, batch = rig.model.lmm, rig.singles[0]
    bench.set_attention(lmm, "eager", "eager")
    reference = bench.reference_capture(lmm, batch)
    bench.set_attention(lmm, bench.IMPLEMENTATION, "sdpa")
    ours = lmm(batch)
    assert reference.maps.shape == ours.maps.shape
    tolerance = 1e-4 if lmm.model.dtype == torch.float32 else 1e-2  # eager rounds to bf16
    torch.testing.assert_close(reference.maps, ours.maps, rtol=tolerance, atol=tolerance / 100)
    assert torch.equal(reference.token_phrase, ours.token_phrase)


def test_per_phrase_refiner_matches_the_batched_one(bench, rig):
    torch.manual_seed(0)
    embeddings, sizes = rig.model.refiner.embed_images(rig.batches[0].images)
    coarse = [torch.randn(n, 6, 8) for n in rig.batches[0].num_phrases]
    texts = [[torch.randn(3, 64) for _ in range(n)] for n in rig.batches[0].num_phrases]
    originals = [tuple(image.shape[:2]) for image in rig.batches[0].images]
    batched = rig.model.refiner(embeddings, coarse, texts, sizes, originals)
    per_phrase = rig.reference.refiner(embeddings, coarse, texts, sizes, originals)
    for a, b in zip(batched, per_phrase):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])  # tiny-next: the GPU presets' path
def test_smallest_configuration_runs_end_to_end(bench, preset, tmp_path, capsys):
    out = tmp_path / "bench.json"
    (report,) = bench.main(["--preset", preset, "--in-process", "--json", str(out)])
    assert json.loads(out.read_text())[0]["preset"] == preset
    assert set(report["rows"]) == set(bench.CASES)
    assert all(row["samples_per_s"] > 0 for row in report["rows"].values())
    assert set(report["ratios"]) == set(bench.TARGETS)
    assert "| (a) reference | 1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_subprocess_per_case(bench, tmp_path):
    (report,) = bench.main(["--preset", "tiny", "--cases", "flmm", "floor"])
    assert report["isolated_processes"]
    assert report["rows"]["flmm"]["peak_mib"] > report["rows"]["flmm"]["step_mib"] > 0


def test_quantization_benchmark_runs_end_to_end(tiny_run, capsys):
    """int8 vs float32 side by side on the tiny run's head and world: every figure printed."""
    root, _, _ = tiny_run
    bench = load_script("benchmarks/quantization.py")
    argv = ["--head", str(root / "run" / "model"), "--capture-samples", "4", "--answers", "1"]
    bench.main([*argv, "--max-new-tokens", "4", *paths_at(root), *TINY])
    out = capsys.readouterr().out
    for line in ("test giou", "maps correlation", "hidden relative L2 diff", "of 2:"):
        assert line in out  # two questions about one image
