"""Heads as model folders: what training writes, save/load round trips, the card, the hub wiring."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF
from huggingface_hub import ModelCard
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from safetensors.torch import load_file

from flmm.chat.conversation import NOUN_RULE, GroundedChat
from flmm.chat.fallback import noun_phrases
from flmm.chat.options import load_chat
from flmm.errors import CheckpointMismatchError, FlmmUserError
from flmm.evaluate import evaluate
from flmm.foundation.cache import SHIPPED
from flmm.lmm import FrozenLMM
from flmm.model import FLMMModel, FLMMPredictor, load, loader
from flmm.model.checkpoint import portable, read_checkpoint, resolve
from flmm.model.pretrained import FLMMHead, add_scores

ROWS = {"refined (SAM)": "", "coarse (mask head)": "coarse_"}


@pytest.fixture(scope="module")
def run(tiny_run):
    """The tiny run's folder, its config, its best checkpoint and a test sample."""
    root, cfg, _ = tiny_run
    folder = root / "run" / "model"
    config = json.loads((folder / "config.json").read_text())
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    sample = datamodule.test_sets[0][0]
    best = root / "run" / "checkpoints" / config["training"]["checkpoint"]
    return root, cfg, folder, best, sample


@pytest.fixture(scope="module")
def head(run) -> FLMMHead:
    return FLMMHead.from_pretrained(run[2])


def ground(model: FLMMModel, sample):
    phrases = [sample.text[s:e] for s, e in sample.spans]
    return FLMMPredictor(model).ground(sample.image, sample.text, phrases)


def assert_same_masks(a, b) -> None:
    assert torch.equal(a.coarse, b.coarse) and torch.equal(a.refined, b.refined)


def test_training_writes_a_model_folder_from_the_best_checkpoint(run):
    _, _, folder, best, _ = run
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    weights = load_file(str(folder / "model.safetensors"))
    saved = read_checkpoint(best)["state_dict"]
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)
    config = json.loads((folder / "config.json").read_text())
    assert config["sam"]["variant"] == "tiny" and config["sam"]["file_name"].endswith(".pth")
    assert (
        config["lmm"]["family"] == "llava" and config["training"]["frozen_lmm_check"]["unchanged"]
    )
    assert config["lmm"]["remote_code"] is False  # recorded for the reader; never obeyed


def test_from_pretrained_gives_the_checkpoints_masks(run, head):
    _, cfg, _, best, sample = run
    lmm, sam = hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)
    reference = load(best, lmm=lmm, sam=sam)
    assert_same_masks(ground(head.model, sample), ground(reference, sample))


def test_one_loader_serves_a_checkpoint_a_folder_and_a_hub_id_alike(run, monkeypatch):
    """``flmm.model.load`` of the run's best ``.ckpt``, of its model folder and of a hub id
    (served here from that folder) give the same masks, each with the LMM and SAM it records."""
    _, _, folder, best, sample = run
    asked = []
    monkeypatch.setattr(
        loader, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(folder)
    )
    masks = [ground(load(source), sample) for source in (best, folder, "someone/shared-head")]
    assert asked == ["someone/shared-head"]
    for other in masks[1:]:
        assert_same_masks(other, masks[0])


def test_save_pretrained_round_trip(run, head, tmp_path):
    sample = run[4]
    head.save_pretrained(tmp_path / "copy")
    again = FLMMHead.from_pretrained(
        tmp_path / "copy", lmm=head.model.lmm, sam=head.model.refiner.sam
    )
    assert_same_masks(ground(again.model, sample), ground(head.model, sample))
    assert again.config == head.config


def test_card_holds_the_runs_real_test_scores(run):
    root, _, folder, _, _ = run
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    text = (folder / "README.md").read_text()
    for stage, prefix in ROWS.items():
        row = re.search(rf"^\| {re.escape(stage)} \| ([^|]+) \| ([^|]+) \|$", text, re.MULTILINE)
        giou, ciou = (float(v) for v in row.groups())
        assert giou == round(metrics[f"test/{prefix}giou"], 2)
        assert ciou == round(metrics[f"test/{prefix}ciou"], 2)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "flmm" and card.data.license == "apache-2.0"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["giou"] == round(metrics["test/giou"], 4)
    assert "**passed**" in text and "Intended use" in text and "toy" in text


def test_a_mismatched_lmm_is_a_clear_error(run, tiny_llava_dir):
    other = FrozenLMM.from_pretrained(tiny_llava_dir, text_layers=2)
    with pytest.raises(CheckpointMismatchError, match="head folder .*attention shapes differ"):
        FLMMHead.from_pretrained(run[2], lmm=other)


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="head folder not found"):
        FLMMHead.from_pretrained(tmp_path / "nothing")


def test_grounded_chat_and_the_cli_load_a_folder_alone(run, head, tmp_path, monkeypatch):
    _, _, folder, _, sample = run
    chat = GroundedChat.from_pretrained(str(folder))
    assert_same_masks(ground(chat.model, sample), ground(head.model, sample))
    args = argparse.Namespace(
        checkpoint=str(folder),
        lmm=None,
        sam=None,
        selector=None,
        device="cpu",
        family="llava",
        trust_remote_code=False,
    )
    assert_same_masks(ground(load_chat(args).model, sample), ground(head.model, sample))
    shutil.copytree(folder, tmp_path / "logs" / "train" / "runs" / "x" / "model")
    monkeypatch.chdir(tmp_path)  # no --checkpoint: the newest run's model folder under logs/
    args.checkpoint = None
    assert_same_masks(ground(load_chat(args).model, sample), ground(head.model, sample))


def test_the_cards_chat_snippet_grounds_noun_phrases_without_a_selector(run, tmp_path):
    """The card's own snippet on a folder fresh from training (no keyword selector trained):
    the answer's noun phrases are grounded, and the result says so. The folder names the
    shipped tiny LLaVA (the default run's; the tiny run's own LMM, pretrained for 2 steps,
    answers "left left ...", which has no noun phrase)."""
    _, _, trained, _, sample = run
    folder = Path(shutil.copytree(trained, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    config["lmm"]["id"] = portable(str(SHIPPED["tiny_llava"]))
    (folder / "config.json").write_text(json.dumps(config))
    card = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    scope = {"image": sample.image}
    exec(snippet.replace("path/to/this/folder", str(folder)), scope)  # noqa: S102 (flmm's own card)
    result = scope["result"]
    assert result.phrases_from == NOUN_RULE and result.phrases == noun_phrases(result.answer)
    assert result.phrases, f"no noun phrase in the answer {result.answer!r}"
    assert all(result.answer[s:e] == p for p, (s, e) in zip(result.phrases, result.spans))
    assert result.masks.shape == (len(result.phrases), *sample.image.shape[:2])


def test_a_checkpoint_alone_names_its_sam_and_family(run, head, tmp_path):
    """A .ckpt records the SAM it was trained with: --checkpoint X.ckpt needs no --sam/--family."""
    root, _, _, best, sample = run
    saved = read_checkpoint(best)["flmm"]
    assert saved["sam"] == {"variant": "tiny", "checkpoint": head.config["sam"]["checkpoint"]}
    args = argparse.Namespace(
        checkpoint=str(best), lmm=None, sam=None, sam_variant=None, selector=None, family=None
    )
    args.device, args.dtype, args.trust_remote_code = "cpu", "float32", False
    assert_same_masks(ground(load_chat(args).model, sample), ground(head.model, sample))
    moved = torch.load(best, weights_only=True)
    moved["flmm"]["sam"] = {"variant": "vit_l", "checkpoint": str(tmp_path / "sam_vit_l.pth")}
    torch.save(moved, tmp_path / "moved.ckpt")
    with pytest.raises(FlmmUserError, match="trained with SAM vit_l from .*pass the SAM"):
        GroundedChat.from_checkpoint(str(root / "unused"), str(tmp_path / "moved.ckpt"))


def test_shipped_models_are_recorded_relative_to_the_package():
    ref = portable(str(SHIPPED["tiny_sam"]))
    assert ref == "flmm:foundation/shipped/tiny_sam.pth"
    assert Path(resolve(ref)) == SHIPPED["tiny_sam"]
    assert portable("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_evaluation_scores_go_into_config_and_card(run, tmp_path):
    folder = shutil.copytree(run[2], tmp_path / "model")
    add_scores(folder, {"synthetic/val/reference": {"giou": 12.345, "ciou": 67.891}})
    config = json.loads((folder / "config.json").read_text())
    assert config["scores"]["evaluation"]["synthetic/val/reference"]["giou"] == 12.345
    assert "| refined (SAM) | 12.35 | 67.89 |" in (folder / "README.md").read_text()


def test_flmm_evaluate_adds_its_scores_to_a_folder(run, tmp_path):
    root = run[0]
    folder = shutil.copytree(run[2], tmp_path / "model")
    data = ["data.n_train=24", "data.n_val=8", "data.n_test=8", "data.batch_size=4"]
    overrides = [*data, "trainer.accelerator=cpu", "protocols=[reference]", f"checkpoint={folder}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", [f"paths.root_dir={root}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(tmp_path / "eval")
    HydraConfig.instance().set_config(cfg)
    figures = evaluate(cfg)
    scores = json.loads((folder / "config.json").read_text())["scores"]["evaluation"]
    test = scores["synthetic/test/reference"]
    assert test["giou"] == figures["synthetic/test/reference/refined/giou"]
    assert test["coarse_ciou"] == figures["synthetic/test/reference/coarse/ciou"]
    card = (folder / "README.md").read_text()
    assert f"| refined (SAM) | {test['giou']:.2f} | {test['ciou']:.2f} |" in card


def test_push_to_hub_uploads_the_folder(head, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls["repo"] = repo_id
            return argparse.Namespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kw):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return "https://huggingface.co/me/head/commit/1"

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    assert head.push_to_hub("me/head").endswith("/commit/1")
    assert calls["repo"] == "me/head"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "library_name: flmm" in calls["card"]
