"""The training-throughput benchmark runs end to end, and its reference-style case computes what
this project computes (same attention maps, same refined masks), only the reference's way."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from conftest import TINY, load_script, paths_at

from flmm.heads import MaskHead
from flmm.lmm import FrozenLMM
from flmm.lmm.families import FAMILIES
from flmm.lmm.grids import PARTS
from flmm.model.feature_cache import split_capture, to_storage


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


def test_compiled_heads_train_alike_and_leave_the_reference_eager(bench, rig, tmp_path):
    compiled = bench.Rig.build(
        dataclasses.replace(bench.PRESETS["tiny"], compile="eager"), tmp_path
    )
    assert not isinstance(compiled.model.mask_head, MaskHead)  # a wrapper, not compiled in place
    assert isinstance(compiled.reference.mask_head, MaskHead)
    assert "decode" in vars(compiled.model.refiner) and "decode" not in vars(
        compiled.reference.refiner
    )
    shared = {id(p) for p in compiled.reference.mask_head.parameters()}
    assert shared == {id(p) for p in compiled.model.mask_head.parameters()}
    losses = []
    for r in (rig, compiled):
        batch = r.batches[0]
        with torch.no_grad():
            losses.append(r.model.losses(batch, r.model(batch))["loss"])
    torch.testing.assert_close(losses[0], losses[1])


@pytest.fixture(scope="module")
def sizing(bench):
    return load_script("benchmarks/gpu_sizing.py")


def test_gpu_sizing_smoke_measures_bf16_and_marks_the_rest(sizing, tmp_path, capsys):
    out = tmp_path / "sizing.json"
    sizing.main(["--smoke", "--budget-s", "600", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["schema"] == "flmm-gpu-sizing/1" and report["finished"]
    rows = {(r["precision"], r["case"]): r for r in report["rows"]}
    assert set(rows) >= {(p, c) for p in ("bf16", "4bit", "8bit") for c in sizing.TRAIN_CASES}
    for (precision, case), row in rows.items():
        numbers = [row["peak_gib"], row["samples_per_s"], row["seconds_per_pass"]]
        if row["status"] == "measured":
            assert precision in ("bf16", "int8") and all(n > 0 for n in numbers), row
        else:
            assert row["status"].startswith("not measured: ") and numbers == [None] * 3, row
    assert (
        rows["4bit", "train-b8"]["status"] == "not measured: bitsandbytes 8-bit / 4-bit needs CUDA"
    )
    assert {c for (p, c), r in rows.items() if r["status"] == "measured"} >= {
        *sizing.TRAIN_CASES,
        "reference-b1",
        "cached-b8",
    }
    assert report["cached_step"]["eager"] > 0
    assert report["families"]["llava"]["shape"]["as_cache_size_assumes"] is False  # tiny, not 7B
    assert report["feature_cache"]["families"]["llava"]["mix_bytes"] > 1e12
    table = capsys.readouterr().out
    assert "|  | 4bit | not measured | not measured | not measured |  |  |" in table


def test_gpu_sizing_skips_what_the_budget_cannot_hold(sizing, tmp_path, capsys):
    out = tmp_path / "sizing.json"
    sizing.main(["--smoke", "--budget-s", "0", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"].startswith("not measured: budget") for r in rows)
    assert "| bf16 | not measured yet | not measured yet | not measured yet |" in (
        capsys.readouterr().out
    )


def test_gpu_sizing_writes_every_row_as_it_goes(sizing, tmp_path, monkeypatch):
    def killed(*args):
        raise SystemExit("killed")  # what a timeout does to the process: nothing after it runs

    monkeypatch.setitem(sizing.MEASURE, "train-b1", killed)
    out = tmp_path / "sizing.json"
    with pytest.raises(SystemExit):
        sizing.main(["--smoke", "--precisions", "bf16", "--budget-s", "600", "--json", str(out)])
    report = json.loads(out.read_text())
    status = {r["case"]: r["status"] for r in report["rows"]}
    assert status["train-b8"] == "measured" and status["ground"] == "not measured: not reached"
    assert not report["finished"]


def test_cache_size_counts_what_the_cache_stores(tiny_llava_dir, ragged_batch):
    sizes = load_script("benchmarks/cache_size.py")
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir, family="llava")
    capture = lmm(ragged_batch)
    overhead = sizes.container_overhead()
    for b, entry in enumerate(split_capture(capture)):
        tokens = int((capture.token_phrase[b] >= 0).sum())
        expected = sizes.lmm_entry_bytes(sizes.shape_of(lmm), ragged_batch.num_phrases[b], tokens)
        assert sum(t.numel() * t.element_size() for t in entry.values()) == expected
        saved = io.BytesIO()
        torch.save(entry, saved)
        assert abs(saved.tell() - expected - overhead["lmm"]) < 256  # zip records' alignment
    embedding = torch.zeros(4, 6, 6)
    entry = {"embedding": to_storage(embedding), "input_size": torch.tensor((24, 20))}
    stored = sum(t.numel() * t.element_size() for t in entry.values())
    assert stored == sizes.sam_entry_bytes(tuple(embedding.shape))


def test_cache_size_has_every_family_s_headline_checkpoint():
    sizes = load_script("benchmarks/cache_size.py")
    assert set(sizes.HEADLINE) == set(FAMILIES)
    for family, shape in sizes.HEADLINE.items():
        assert shape.checkpoint in FAMILIES[family].checkpoints
        assert shape.parts == PARTS[FAMILIES[family].grid]


def test_quantization_benchmark_runs_end_to_end(tiny_run, capsys):
    """int8 vs float32 side by side on the tiny run's head and world: every figure printed."""
    root, _, _ = tiny_run
    bench = load_script("benchmarks/quantization.py")
    argv = ["--head", str(root / "run" / "model"), "--capture-samples", "4", "--answers", "1"]
    bench.main([*argv, "--max-new-tokens", "4", *paths_at(root), *TINY])
    out = capsys.readouterr().out
    for line in ("test giou", "maps correlation", "hidden relative L2 diff", "of 2:"):
        assert line in out  # two questions about one image
