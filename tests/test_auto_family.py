"""``model.lmm.family=auto``: with a family's row removed from the registry, auto derives the same
row from the tiny model and gives the same maps and masks; a type auto cannot serve, or no row can,
is refused with one line; a Hydra run with ``model.lmm.family=auto`` trains."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY, compose_cfg, load_script

from flmm.errors import ModelLoadError
from flmm.foundation.tiny_models import build_tiny_lmm
from flmm.heads import build_sam
from flmm.lmm import FAMILIES, Family, FrozenLMM, derive
from flmm.lmm.families import family_of_model_type
from flmm.model.checkpoint import check_family
from flmm.model.module import FLMM
from flmm.train import train

# row fields no model shows: the hub checkpoints and the tiny builder's frame
NOT_DERIVABLE = ("checkpoints", "tiny_grid_size")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """``family -> folder`` of a random tiny model of a registered family, built once."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_lmm(tmp_path_factory.mktemp(f"auto_{family}"), family)
        return built[family]

    return get


def masks(lmm: FrozenLMM, batch) -> torch.Tensor:
    """The coarse masks of an F-LMM on ``lmm`` with a mask head of fixed random weights."""
    torch.manual_seed(0)
    model = FLMM.build(lmm, build_sam("tiny"), base_channels=8, lr=1e-3).eval()
    with torch.no_grad():
        return model(batch).coarse


@pytest.mark.parametrize(
    "family",
    [
        "qwen2_5_vl",
        # 30-60 s each on the shared machine: two loads, the self-check, two F-LMMs
        pytest.param("llava", marks=pytest.mark.slow),
        pytest.param("llava_next", marks=pytest.mark.slow),
    ],
)
def test_auto_derives_the_removed_row(family, tiny_dir, ragged_batch, monkeypatch):
    """Field by field the row auto derives is the registry's (but for the non-derivable fields),
    and the maps, hidden states and masks are the same."""
    row = FAMILIES[family]
    registered = FrozenLMM.from_pretrained(tiny_dir(family), family=family)
    monkeypatch.delitem(FAMILIES, family)
    auto = FrozenLMM.from_pretrained(tiny_dir(family), family="auto")
    assert derive.is_derived(auto.family)
    kept = {name: getattr(row, name) for name in NOT_DERIVABLE}
    assert replace(auto.family, **kept) == row
    ours, theirs = auto(ragged_batch), registered(ragged_batch)
    assert torch.equal(ours.maps, theirs.maps) and torch.equal(ours.hidden, theirs.hidden)
    assert torch.equal(masks(auto, ragged_batch), masks(registered, ragged_batch))


def test_auto_and_unset_use_the_row_of_a_known_type(tiny_dir):
    """A model type with a row uses that row (no derivation, no self-check)."""
    assert FrozenLMM.from_pretrained(tiny_dir("qwen2_5_vl")).family is FAMILIES["qwen2_5_vl"]
    lmm = FrozenLMM.from_pretrained(tiny_dir("qwen2_5_vl"), family="auto")
    assert lmm.family is FAMILIES["qwen2_5_vl"]


def test_auto_prints_a_row_to_paste(tiny_dir, monkeypatch, caplog):
    monkeypatch.delitem(FAMILIES, "qwen2_5_vl")
    with caplog.at_level("INFO", logger="flmm.lmm.derive"):
        lmm = FrozenLMM.from_pretrained(tiny_dir("qwen2_5_vl"), family="auto")
    source = derive.family_source(lmm.family)
    assert source in caplog.text
    call = ast.parse(source).body[0].value
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert call.func.id == "Family" and Family(*args, **kwargs) == lmm.family


def test_auto_refuses_a_row_that_fails_its_self_check(tiny_dir, monkeypatch):
    """A wrong grid rule (Qwen2.5-VL's native-resolution tokens read as one square grid: a square
    64 x 64 image loads, a 60 x 90 one does not fit) is caught by the self-check, before anything
    trains: one line naming the fields to set."""
    monkeypatch.delitem(FAMILIES, "qwen2_5_vl")
    monkeypatch.setattr(derive, "grid_fields", lambda *a: {"grid": "square"})
    with pytest.raises(ModelLoadError) as caught:
        FrozenLMM.from_pretrained(tiny_dir("qwen2_5_vl"), family="auto")
    line = str(caught.value)
    assert "\n" not in line and "failed its self-check" in line
    assert "setting text_config, decoder_layers, final_norm, grid" in line


def test_auto_refuses_a_type_it_cannot_derive(tmp_path, monkeypatch):
    """Mistral 3 (Pixtral's rows of image tokens, a break token after each, one count per aspect
    ratio) fits no grid rule auto knows: one line naming the row fields to set."""
    known = family_of_model_type("mistral3")
    if known is not None:  # a row serves it; auto is asked without one
        monkeypatch.delitem(FAMILIES, known)
    load_script("scripts/tiny_any.py").build_tiny_any("mistral3", tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        FrozenLMM.from_pretrained(tmp_path, family="auto")
    line = str(caught.value)
    assert "\n" not in line and "model_type 'mistral3'" in line and "fit no grid rule" in line
    assert "setting grid, grid_size, pad_to_square, processor_kwargs" in line


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (transformers.MllamaConfig, "cross-attention"),
        (transformers.Florence2Config, "encoder-decoder"),
    ],
)
def test_unservable_types_are_refused_by_their_config(config, reason, tmp_path):
    """No row can serve these: the loader says why from the config alone, loading no weights."""
    config().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=reason) as caught:
        FrozenLMM.from_pretrained(tmp_path, family="auto")
    assert "\n" not in str(caught.value)


def test_checkpoint_family_is_not_compared_for_auto():
    """``family=auto`` knows its row only once the LMM loads: any saved family passes."""
    check_family({"family": "gemma3", "grid": [8, 8]}, "auto", None, "last.ckpt")


@pytest.mark.slow
def test_hydra_run_with_family_auto(tmp_path, monkeypatch):
    """``model=qwen2_5_vl_tiny model.lmm.family=auto`` with the row removed: auto's derived row
    trains, checkpoints and tests."""
    monkeypatch.delitem(FAMILIES, "qwen2_5_vl")
    overrides = [o for o in TINY if not o.startswith("model.lmm.")]
    lmm = ["model.lmm.family=auto", "model.lmm.name_or_path.family=qwen2_5_vl"]
    metrics = train(compose_cfg(tmp_path, ["model=qwen2_5_vl_tiny", *lmm, *overrides]))
    assert 0.0 <= metrics["test/giou"] <= 100.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["flmm"]["family"] == "qwen2_5_vl"


def test_reach_rewrites_its_table_between_the_markers(tmp_path):
    """``scripts/family_reach.py`` run again replaces its table (the docs keep one); a type is
    classified in a forked child, the unservable ones from the package's table."""
    reach = load_script("scripts/family_reach.py")
    doc = tmp_path / "families.md"
    doc.write_text("# Families\n\nkept\n")
    reach.write_docs(doc, "first run")
    reach.write_docs(doc, "second run")
    text = doc.read_text()
    assert text.startswith("# Families\n\nkept\n") and text.count(reach.BEGIN) == 1
    assert "second run" in text and "first run" not in text
    status, detail, _ = reach.run_one("mllama", timeout=60, memory=2**32)
    assert (status, detail) == (reach.UNSERVED, derive.UNSERVABLE["mllama"])
