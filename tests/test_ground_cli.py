"""`python -m flmm.chat.ground`: transcript, overlay PNG with a legend, modes, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flmm.chat import ground as ground_cli
from flmm.chat import options
from flmm.chat.conversation import NOUN_RULE, ChatResult
from flmm.chat.ground import load_image, main, marked, transcript
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.module import FLMM
from flmm.overlay import phrase_colour, render_overlay


def save_flmm(root: Path, lmm_dir: Path) -> tuple[Path, Path]:
    """An F-LMM checkpoint (random heads) and a tiny SAM file, written as training writes them."""
    torch.manual_seed(0)
    sam = build_sam("tiny")
    model = FLMM.build(FrozenLMM.from_pretrained(lmm_dir), sam, base_channels=8)
    ckpt = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, root / "last.ckpt")
    torch.save(sam.state_dict(), root / "tiny_sam.pth")
    return root / "last.ckpt", root / "tiny_sam.pth"


@pytest.fixture(scope="module")
def saved(tiny_llava_dir, tmp_path_factory) -> list[str]:
    """The model options of the CLI for a saved random F-LMM on the tiny LLaVA."""
    ckpt, sam = save_flmm(tmp_path_factory.mktemp("ckpt"), tiny_llava_dir)
    return ["--checkpoint", str(ckpt), "--lmm", str(tiny_llava_dir), "--sam", str(sam)]


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    image = np.random.default_rng(2).integers(0, 256, (36, 50, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return path


def test_ground_mode_prints_phrases_and_writes_the_overlay(saved, image_file, tmp_path, capsys):
    out = tmp_path / "overlay.png"
    main(
        [
            str(image_file),
            "a red circle and a blue square",
            "--phrases",
            "red circle",
            "blue square",
            "--output",
            str(out),
            *saved,
        ]
    )
    printed = capsys.readouterr().out
    assert "text:   a [red circle]{1} and a [blue square]{2}" in printed
    assert "1. 'red circle' chars 2-12" in printed and f"overlay: {out}" in printed
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[1] == 50 * 8 and picture.shape[0] == 36 * 8 + 2 * 18 + 4
    for k in range(2):  # the legend's colour swatches
        top = 36 * 8 + 2 + k * 18
        np.testing.assert_array_equal(picture[top + 8, 10], phrase_colour(k).astype(np.uint8))


def test_chat_mode_answers_then_grounds(saved, image_file, tmp_path, capsys):
    main(
        [
            str(image_file),
            "what colour is the circle?",
            "--phrases",
            "not said",
            "--output",
            str(tmp_path / "o.png"),
            "--max-new-tokens",
            "6",
            *saved,
        ]
    )
    printed = capsys.readouterr().out
    assert printed.startswith("question: what colour is the circle?\nanswer:   ")
    assert "not in the answer, not grounded: 'not said'" in printed


def test_repetition_penalty_reaches_the_answer(saved, image_file, tmp_path, monkeypatch):
    loaded = []

    def answer(chat, *args):
        loaded.append(chat)
        return ChatResult("what colour?", "red", [], [], np.zeros((0, 36, 50), dtype=bool))

    monkeypatch.setattr(ground_cli, "run", answer)
    out = str(tmp_path / "o.png")
    main([str(image_file), "what colour?", "--repetition-penalty", "1.3", "--output", out, *saved])
    assert loaded[0].decoding == {"repetition_penalty": 1.3}


def test_a_bad_repetition_penalty_is_refused_before_models_load(image_file, capsys, monkeypatch):
    monkeypatch.setattr(options, "chosen_checkpoint", lambda given: pytest.fail("models loaded"))
    with pytest.raises(SystemExit):
        main([str(image_file), "what colour?", "--repetition-penalty", "0"])
    assert "--repetition-penalty must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["cot", "reason"])
def test_reasoning_modes_run(saved, image_file, tmp_path, capsys, mode):
    main(
        [
            str(image_file),
            "what colour is the circle?",
            "--mode",
            mode,
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "o.png"),
            *saved,
        ]
    )
    printed = capsys.readouterr().out
    assert "answer:" in printed and (tmp_path / "o.png").is_file()
    if mode == "cot":
        assert "The object most relevant to the question is" in printed


def test_overlay_and_marking():
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    masks = np.zeros((1, 10, 20), dtype=bool)
    masks[0, :5] = True
    picture = render_overlay(image, masks, ["top half"], min_side=40)
    assert picture.shape == (10 * 2 + 18 + 4, 40, 3)
    np.testing.assert_allclose(picture[5, 11], 0.5 * phrase_colour(0), atol=1)  # inside
    np.testing.assert_array_equal(picture[0, 0], phrase_colour(0))  # its outline
    np.testing.assert_array_equal(picture[19, 39], [0, 0, 0])
    result = ChatResult("q", "a dog and a cat", ["dog", "cat"], [(2, 5), (12, 15)], masks)
    assert marked(result) == "a [dog]{1} and a [cat]{2}"


def test_the_transcript_says_when_the_noun_phrase_rule_chose_the_phrases():
    masks = np.zeros((1, 4, 4), dtype=bool)
    result = ChatResult("q?", "a dog", ["dog"], [(2, 5)], masks, phrases_from=NOUN_RULE)
    said = "phrases: the answer's noun phrases (noun-phrase rule; no keyword selector loaded)"
    assert said in transcript(result, None).splitlines()
    result.phrases_from = "keyword selector"
    assert "phrases:" not in transcript(result, None)


def test_bad_image_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(Exception, match="cannot read .*notes.png as an image"):
        load_image(bad)
    with pytest.raises(SystemExit) as stop:
        main([str(bad), "what?", "--checkpoint", "x.ckpt"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flmm: error: cannot read {bad} as an image")
    assert err[0].endswith("pass a PNG, JPEG or other PIL-readable file")
