"""The ``"crops"`` grid rule (SmolVLM, Idefics3) against the real processors at the published
settings (processors only, no weights): the crop canvas it reads from the processor's
``<row_r_col_c>`` markers is the image processor's own ``rows x cols`` (the model's own placement
of each crop's features is checked by ``grid_checks.crops`` in the registry tests)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from flmm.errors import ModelLoadError
from flmm.foundation.real_shape import real_processor
from flmm.foundation.tiny_models import EXTRA_TOKENS, SPECIAL_TOKENS, family_tokenizer
from flmm.lmm import get_family
from flmm.lmm.grids import GRIDS, crop_canvas
from flmm.lmm.loading import check_crop_markers
from flmm.lmm.processing import process

CROP_FAMILIES = ["idefics3", "smolvlm"]
# SmolVLM-256M / SmolVLM2-500M: the longest side resized to 2048 px, crops of 512 px
SIZES = [(1, 1), (10, 300), (300, 10), (100, 100), (480, 640), (640, 480), (512, 1537), (900, 700)]


@pytest.fixture(scope="module")
def published_lmm():
    """``family -> `` what the grid rule reads of a FrozenLMM, at the published processor."""
    built = {}

    def get(family: str) -> SimpleNamespace:
        if family not in built:
            tokenizer = family_tokenizer(SPECIAL_TOKENS[family], None, EXTRA_TOKENS[family])
            processor = real_processor(family, tokenizer)
            built[family] = SimpleNamespace(
                processor=processor,
                image_token_id=processor.image_token_id,
                family=get_family(family),
            )
        return built[family]

    return get


def encoded(lmm, image: np.ndarray) -> dict:
    return process(lmm.processor, lmm.family, [image], ["User:<image>hi"])


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("family", CROP_FAMILIES)
def test_crop_canvas_is_the_image_processors_rows_and_cols(family, size, published_lmm):
    lmm = published_lmm(family)
    image = np.zeros((*size, 3), np.uint8)
    own = lmm.processor.image_processor(
        images=[[image]], return_row_col_info=True, input_data_format="channels_last"
    )
    rows, cols = own["rows"][0][0], own["cols"][0][0]
    enc = encoded(lmm, image)
    count = int((enc["input_ids"][0] == lmm.image_token_id).sum())
    grids = GRIDS["crops"](lmm, enc, 0, count)
    side = int(lmm.processor.image_seq_len**0.5)
    assert sum(g.num_tokens for g in grids) == count
    if rows == 0:  # not split: the global image only
        assert [(g.height, g.width) for g in grids] == [(side, side)]
    else:
        assert grids[0].tiles == (rows, cols) and (grids[0].height, grids[0].width) == (
            rows * side,
            cols * side,
        )


def test_crops_without_their_markers_are_refused(published_lmm):
    """Image tokens that no ``<row_r_col_c>`` marker frames (a tokenizer without the markers
    splits them into pieces) get one clear error, not a wrong grid."""
    lmm = published_lmm("idefics3")
    enc = encoded(lmm, np.zeros((600, 1100, 3), np.uint8))
    ids = enc["input_ids"][0].clone()
    first_marker = lmm.processor.tokenizer.convert_tokens_to_ids("<row_1_col_2>")
    ids[ids == first_marker] = lmm.processor.tokenizer.unk_token_id
    with pytest.raises(RuntimeError, match="not 64-token crops framed by <row_r_col_c> markers"):
        crop_canvas(lmm, ids, 64)
    assert crop_canvas(lmm, enc["input_ids"][0], 64) == (3, 4)  # 1118 x 2048 px


def test_a_tokenizer_without_the_crop_markers_is_refused_at_load():
    """A checkpoint whose tokenizer lacks the markers fails at load, not at its first forward."""
    family = get_family("smolvlm")
    bare = SimpleNamespace(tokenizer=family_tokenizer(SPECIAL_TOKENS["smolvlm"], None))
    with pytest.raises(ModelLoadError, match="of 'ckpt' has no token <row_1_col_1>: the 'smolvlm'"):
        check_crop_markers(bare, family, "ckpt")
    tokenizer = family_tokenizer(SPECIAL_TOKENS["smolvlm"], None, EXTRA_TOKENS["smolvlm"])
    check_crop_markers(SimpleNamespace(tokenizer=tokenizer), family, "ckpt")
    check_crop_markers(bare, get_family("llava"), "ckpt")  # other rules read no markers
