"""scripts/vision_probe.py: linear probes for each patch's colour and shape in the image features."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script

from flmm.data.synthetic.corpus import vocabulary
from flmm.foundation.tiny_llava import build_tiny_llava


@pytest.fixture(scope="module")
def probe():
    return load_script("scripts/vision_probe.py")


def test_probe_reads_what_the_features_say_and_nothing_more(probe):
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (600,))
    noise = torch.randn(600, 16)
    said = torch.cat([torch.nn.functional.one_hot(labels, 5).float(), noise], 1)
    train, test = slice(0, 400), slice(400, 600)
    exact = probe.probe_accuracy(said[train], labels[train], said[test], labels[test])
    assert exact["accuracy"] == 1.0 and exact["n"] == 200
    blind = probe.probe_accuracy(noise[train], labels[train], noise[test], labels[test])
    assert blind["accuracy"] < blind["majority"] + 0.1


def test_object_patches_keep_half_covered_patches_and_their_value(probe):
    feats = torch.arange(3.0)[:, None]
    # background, value 0, value 1 shares of three patches
    shares = torch.tensor([[0.9, 0.1, 0.0], [0.4, 0.0, 0.6], [0.5, 0.5, 0.0]])
    kept, values = probe.object_patches(feats, shares)
    assert kept.flatten().tolist() == [1.0, 2.0] and values.tolist() == [1, 0]


def test_object_places_are_each_patchs_row_and_column(probe):
    feats = torch.arange(8.0)[:, None]  # two scenes of a 2 x 2 grid, row-major
    shares = torch.zeros(8, 2)
    shares[[1, 2, 7], 1] = 1.0  # covered patches: (0, 1) and (1, 0) of scene 1, (1, 1) of scene 2
    places = probe.object_places(feats, shares, side=2)
    kept, rows = places["row"]
    assert kept.flatten().tolist() == [1.0, 2.0, 7.0] and rows.tolist() == [0, 1, 1]
    assert places["column"][1].tolist() == [1, 0, 1]


def test_vision_probe_runs_end_to_end(probe, tmp_path):
    lmm = build_tiny_llava(tmp_path / "lmm", vocabulary(), num_layers=1, vision_layers=1)
    out = probe.main(
        ["--lmm", str(lmm), "--train", "6", "--test", "3", "--output", str(tmp_path / "p.json")]
    )
    assert json.loads((tmp_path / "p.json").read_text()) == out
    for name in ("colour", "shape", "row", "column", "tokens_row", "tokens_column"):
        assert out[name]["n"] > 0 and 0 <= out[name]["accuracy"] <= 1
    assert out["row"]["n"] == out["colour"]["n"] == out["tokens_column"]["n"]
    # colour is in a patch's pixels, so even a random linear patch embedding carries it
    assert out["colour"]["accuracy"] > out["colour"]["majority"] + 0.3
