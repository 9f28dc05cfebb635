"""Loading, freezing, geometry and error messages of the FrozenLMM adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flmm.errors import ConfigError
from flmm.lmm import FrozenLMM, get_family, list_lmms
from flmm.types import GroundingBatch, GroundingSample


@pytest.fixture(scope="module")
def lmm(tiny_llava_dir) -> FrozenLMM:
    return FrozenLMM.from_pretrained(tiny_llava_dir, text_layers=2)


def test_registry_lists_llava_and_rejects_unknown():
    assert "llava" in list_lmms()
    with pytest.raises(ConfigError, match="known families: .*llava"):
        get_family("no-such-family")


def test_output_shapes_and_geometry(lmm, ragged_batch):
    out = lmm(ragged_batch)
    assert (lmm.channels, lmm.grid, lmm.hidden_size, lmm.num_text_layers) == (16, (12, 12), 128, 2)
    assert out.maps.shape == (3, 3, 16, 12, 12) and out.maps.dtype == torch.float32
    assert out.phrase_mask.tolist() == [
        [True, True, False],
        [True, True, True],
        [True, False, False],
    ]
    assert out.maps[~out.phrase_mask].abs().sum() == 0
    rows = out.token_phrase.shape[1]
    assert out.hidden.shape == (3, 2, rows, 128)
    assert out.hidden[:, :, out.token_phrase[0] < 0][0].abs().sum() == 0
    assert torch.allclose(
        out.region,
        torch.tensor([[15, 0, 60, 90], [0, 25, 90, 40], [0, 0, 1, 1]])
        / torch.tensor([[90.0], [90.0], [1.0]]),
    )


def test_all_parameters_frozen_and_eval(lmm):
    assert not any(p.requires_grad for p in lmm.parameters())
    lmm.train()
    assert not lmm.training and not any(m.training for m in lmm.modules())


def test_save_pretrained_round_trip(lmm, ragged_batch, tmp_path):
    lmm.model.save_pretrained(tmp_path)
    lmm.processor.save_pretrained(tmp_path)
    again = FrozenLMM.from_pretrained(tmp_path, text_layers=2)
    assert again.model_id == str(tmp_path)
    first, second = lmm(ragged_batch), again(ragged_batch)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.hidden, second.hidden)


def test_missing_path_error_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="model.lmm.name_or_path") as info:
        FrozenLMM.from_pretrained(str(missing))
    assert str(missing) in str(info.value)


def test_phrase_without_tokens_is_rejected(lmm):
    image, masks = np.zeros((32, 32, 3), dtype=np.uint8), np.zeros((1, 32, 32), dtype=bool)
    sample = GroundingSample(image, "red  circle", [(3, 5)], masks)  # the span is the double space
    with pytest.raises(ValueError, match="yields no tokens"):
        lmm(GroundingBatch.collate([sample]))
