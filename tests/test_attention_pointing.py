"""scripts/attention_pointing.py: where the captured attention maps point, by phrase kind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script

from flmm.data.synthetic import write_world
from flmm.types import GroundingBatch


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/attention_pointing.py")


def test_a_map_points_where_its_largest_patch_is(script):
    mask = torch.zeros(8, 8, dtype=bool)
    mask[:4, :4] = True  # the top-left patch of a 2 x 2 grid
    maps = torch.tensor([[[3.0, 1.0], [0.0, 0.0]], [[1.0, 3.0], [0.0, 0.0]]])
    points, mass, share = script.pointing(maps, mask)
    assert points.tolist() == [True, False] and share == 0.25
    torch.testing.assert_close(mass, torch.tensor([0.75, 0.25]))


def test_last_words_cuts_each_phrase_to_its_last_word(script):
    text = "the object on the left. the red circle."
    batch = GroundingBatch([], [text], [[(0, 22), (24, 38)]], [], [{}])
    spans = script.last_words(batch).spans[0]
    assert [text[s:e] for s, e in spans] == ["left", "circle"]


def test_runs_end_to_end_on_a_small_world(script, tiny_llava_dir, tmp_path):
    world = write_world(tmp_path / "world", 2, 2, 3, seed=3)
    out = tmp_path / "pointing.json"
    table = script.main(["--lmm", str(tiny_llava_dir), "--world", str(world), "--output", str(out)])
    assert json.loads(out.read_text()) == table
    assert sum(row["phrases"] for row in table.values()) >= 3
    for row in table.values():
        assert 0 < row["grid_share"] < 1
        assert all(0 <= row[k] <= 1 for k in ("merged_points", "merged_mass", "last_word_mass"))


def test_a_missing_world_is_a_clear_error(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--world", str(tmp_path / "nowhere")])
    assert "no synthetic world at" in capsys.readouterr().err
