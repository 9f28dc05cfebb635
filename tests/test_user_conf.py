"""The user's layer: ./conf of the folder a command runs in is searched before the packaged configs."""

from __future__ import annotations

import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir

from flmm.entry import CONFIG_PATH

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(overrides: list[str]):
    """``train`` composed as a command run in the current folder composes it."""
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("train", overrides=overrides)


def test_a_user_file_replaces_the_packaged_one(tmp_path, monkeypatch):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    own = "defaults:\n  - _frozen_lmm\n  - lmm: llava15_7b\n  - _self_\n\nlr: 7e-5\n"
    (tmp_path / "conf" / "model" / "llava.yaml").write_text(own)
    monkeypatch.chdir(tmp_path)
    assert composed(["model=llava"]).model.lr == 7e-5


def test_the_repository_example_experiment_is_found(tmp_path, monkeypatch):
    shutil.copytree(REPO_CONF / "experiment", tmp_path / "conf" / "experiment")
    monkeypatch.chdir(tmp_path)
    cfg = composed(["experiment=example"])
    assert (cfg.task_name, cfg.model.lmm.family, cfg.data.dataset) == (
        "example",
        "llava",
        "refcoco",
    )


def test_local_paths_are_merged(tmp_path, monkeypatch):
    local = tmp_path / "conf" / "local"
    local.mkdir(parents=True)
    shutil.copy(REPO_CONF / "local" / "default.yaml.example", local / "default.yaml")
    monkeypatch.chdir(tmp_path)
    assert composed([]).paths.refer_root == "/data/refer"


def test_without_a_conf_folder_the_packaged_configs_compose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert composed(["model=llava"]).model.lr == 1e-4
