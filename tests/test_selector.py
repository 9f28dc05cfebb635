"""Keyword selector: word spans, phrase runs, grounded captions, training, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import paths_at
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from flmm.chat.fallback import noun_phrase_spans, noun_phrases
from flmm.chat.selector import KeywordSelector, f1_scores, runs, word_spans
from flmm.chat.train_selector import grounded_caption, train_selector, word_labels
from flmm.data.synthetic import sample_scene
from flmm.entry import CONFIG_PATH
from flmm.errors import CheckpointMismatchError
from flmm.lmm import FrozenLMM


@pytest.mark.parametrize(
    "answer, phrases",
    [
        ("A large red circle at the top left. A blue square.", ["large red circle", "blue square"]),
        ("The dog is sitting on a couch next to two cats.", ["dog", "couch", "two cats"]),
        ("There is a purple triangle, and it is red.", ["purple triangle"]),
        ("Yes, there is.", []),
    ],
)
def test_without_a_selector_the_noun_phrases_are_runs_of_content_words(answer, phrases):
    """Function words, punctuation and the word after an auxiliary verb end a phrase."""
    assert noun_phrases(answer) == phrases
    assert [answer[s:e] for s, e in noun_phrase_spans(answer)] == phrases


def test_word_spans_and_runs():
    text = "a red circle, at the top."
    spans = word_spans(text)
    assert [text[s:e] for s, e in spans] == ["a", "red", "circle", ",", "at", "the", "top", "."]
    keep = [False, True, True, False, False, False, True, False]
    assert [text[s:e] for s, e in runs(keep, spans)] == ["red circle", "top"]
    assert runs([False] * len(spans), spans) == []


def test_grounded_caption_labels_the_object_nouns():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, 96)
    text, spans = grounded_caption(scene, rng)
    nouns = [text[s:e] for s, e in spans]
    assert len(nouns) == len(scene.objects)
    for noun in nouns:
        assert noun.split()[-1] in {o.shape for o in scene.objects}
    labels = word_labels(text, spans)
    words = [text[s:e] for s, e in word_spans(text)]
    assert sum(len(n.split()) for n in nouns) == int(labels.sum())
    assert not any(labelled for w, labelled in zip(words, labels) if w in {"a", "an", "."})


def test_f1_scores():
    pred = torch.tensor([True, True, False, False])
    target = torch.tensor([True, False, True, False])
    assert f1_scores(pred, target) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


def test_save_load_roundtrip_and_mismatch(tmp_path):
    selector = KeywordSelector(16, threshold=0.3, lmm_id="tiny")
    path = selector.save(tmp_path / "selector.pt")
    loaded = KeywordSelector.load(path, hidden_size=16)
    assert loaded.threshold == 0.3 and loaded.lmm_id == "tiny"
    torch.testing.assert_close(loaded.linear.weight, selector.linear.weight)
    with pytest.raises(CheckpointMismatchError, match="hidden size 16.*is 32"):
        KeywordSelector.load(path, hidden_size=32)
    with pytest.raises(FileNotFoundError, match="train_selector"):
        KeywordSelector.load(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="not a keyword selector"):
        KeywordSelector.load(tmp_path / "other.pt")


def test_train_selector_learns_the_grounded_words(tiny_llava_dir, tmp_path: Path):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(
            "selector",
            overrides=[
                *paths_at(tmp_path),
                "data.n_train=48",
                "data.n_val=12",
                "data.n_test=16",
                "epochs=300",
                "lr=0.05",
            ],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.model.lmm.name_or_path = str(tiny_llava_dir)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    metrics = train_selector(cfg)
    assert metrics["test/f1"] > 0.9 and metrics["test/words"] > 100
    assert json.loads((tmp_path / "run/metrics.json").read_text())["val/f1"] == metrics["val/f1"]
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    selector = KeywordSelector.load(tmp_path / "run/selector.pt", lmm.hidden_size)
    text = "a large red circle at the top left. a blue square on the right."
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    spans = selector.select(lmm, image, text, "please give me a description of the image.")
    phrases = [text[s:e] for s, e in spans]
    # the nouns are picked; articles and punctuation never start or end a phrase
    assert any("large red circle" in p for p in phrases), phrases
    assert any("blue square" in p for p in phrases), phrases
    assert not any(p.split()[0] in {"a", "the"} or not p[-1].isalnum() for p in phrases)
