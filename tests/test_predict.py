"""`flmm predict` (batched grounding to COCO-RLE JSON, resumable) and `FLMM.predict_step`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from test_ground_cli import save_flmm

from flmm.chat import ground
from flmm.chat.options import load_chat
from flmm.chat.predict import main
from flmm.chat.selector import KeywordSelector
from flmm.cli import COMMANDS
from flmm.lmm import FrozenLMM

TEXT = "a red circle and a blue square"
PHRASES = ["red circle", "blue square"]


@pytest.fixture(scope="module")
def saved(tiny_llava_dir, tmp_path_factory) -> list[str]:
    """Model options for a saved random F-LMM on the tiny LLaVA, with an every-word selector."""
    root = tmp_path_factory.mktemp("predict_ckpt")
    ckpt, sam = save_flmm(root, tiny_llava_dir)
    selector = KeywordSelector(FrozenLMM.from_pretrained(tiny_llava_dir).hidden_size)
    with torch.no_grad():
        selector.linear.weight.zero_()
        selector.linear.bias.fill_(5.0)  # every word is a key word: phrases run to punctuation
    selector.save(root / "selector.pt")
    return ["--checkpoint", str(ckpt), "--lmm", str(tiny_llava_dir), "--sam", str(sam)]


@pytest.fixture
def images(tiny_run, tmp_path) -> Path:
    """A folder with three of the tiny run's synthetic test images."""
    _, cfg, _ = tiny_run
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(Path(cfg.data.root, "images").glob("*.png"))[-3:]:
        shutil.copy(path, folder)
    return folder


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool)


def test_folder_json_decodes_to_the_masks_flmm_ground_gives(saved, images, tmp_path, capsys):
    out = tmp_path / "out"
    main(
        [str(images), "--text", TEXT, "--phrases", *PHRASES, "--output-dir", str(out)]
        + ["--batch-size", "2", "--save-masks", *saved]
    )
    assert "predicted 3 images (6 phrases)" in capsys.readouterr().out
    chat = load_chat(ground.parser().parse_args(["x.png", TEXT, *saved]))
    found = 0
    for path in sorted(images.iterdir()):
        record = json.loads((out / f"{path.stem}.json").read_text())
        image = ground.load_image(path)
        expected = ground.run(chat, image, TEXT, PHRASES, mode="ground")
        coarse = chat.ground(image, TEXT, PHRASES).coarse > 0.5
        assert (record["height"], record["width"]) == image.shape[:2]
        assert [p["text"] for p in record["phrases"]] == PHRASES
        assert [tuple(p["span"]) for p in record["phrases"]] == expected.spans
        for k, phrase in enumerate(record["phrases"]):
            mask = decode(phrase["mask"])
            np.testing.assert_array_equal(mask, expected.masks[k])
            np.testing.assert_array_equal(decode(phrase["coarse_mask"]), coarse[k].numpy())
            saved_png = np.asarray(Image.open(out / f"{path.stem}_mask{k + 1}.png")) > 0
            np.testing.assert_array_equal(saved_png, mask)
            assert phrase["area"] == mask.sum() and 0 <= phrase["score"] <= 1
            if mask.any():
                x, y, w, h = phrase["box"]
                assert mask[y : y + h, x : x + w].sum() == mask.sum() and phrase["score"] > 0.5
            found += int(mask.any()) + int(coarse[k].any())
        assert (out / f"{path.stem}_overlay.png").is_file()
    assert found  # the comparison is not between empty masks only


def test_jsonl_with_and_without_phrases(saved, images, tmp_path):
    selector = Path(saved[1]).with_name("selector.pt")
    first, second = sorted(images.iterdir())[:2]
    records = [
        {"image": f"images/{first.name}", "text": TEXT, "phrases": ["blue square"]},
        {"image": f"images/{second.name}", "text": "a red circle, a blue square."},
    ]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = tmp_path / "out"
    main(
        [str(jsonl), "--output-dir", str(out), "--selector", str(selector), "--no-overlay", *saved]
    )
    given = json.loads((out / f"{first.stem}.json").read_text())
    picked = json.loads((out / f"{second.stem}.json").read_text())
    assert [(p["text"], p["span"]) for p in given["phrases"]] == [("blue square", [19, 30])]
    assert [p["text"] for p in picked["phrases"]] == ["a red circle", "a blue square"]
    assert not list(out.glob("*.png"))


def test_rerun_skips_finished_images_but_not_half_written_ones(saved, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(images), "--text", TEXT, "--phrases", "red circle", "--output-dir", str(out)]
    main([*args, *saved])
    capsys.readouterr()
    paths = sorted(out.glob("*.json"))
    redo = paths[0]
    gone = subprocess.Popen(["true"])
    gone.wait()  # a run killed outright before the rename leaves its temporary file
    orphan = redo.with_name(f".{redo.name}.{gone.pid}.0f.tmp")
    redo.rename(orphan)
    kept = {p: p.stat().st_mtime_ns for p in paths[1:]}
    main([*args, *saved])
    printed = capsys.readouterr().out
    assert "skipping 2 of 3 images: their JSON is in" in printed
    assert "predicted 1 images (1 phrases)" in printed
    assert redo.is_file() and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert not orphan.exists()
    main([*args, "--checkpoint", str(tmp_path / "absent.ckpt")])  # all done: no model is loaded
    assert "skipping 3 of 3 images" in capsys.readouterr().out


def test_unreadable_images_are_skipped_with_a_warning(saved, images, tmp_path, capsys):
    (images / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(
            [str(images), "--text", TEXT, "--output-dir", str(out), "--phrases", "red circle"]
            + ["--no-overlay", *saved]
        )
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"flmm: warning: skipping {images / 'notes.png'}: cannot read" in err
    assert "1 of 4 images failed and were skipped (exit status 1; the reasons" in err
    assert err.rstrip().endswith(f"are above): {images / 'notes.png'}")
    assert len(list(out.glob("*.json"))) == 3


def jsonl(tmp_path: Path, *lines: str) -> str:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "in.jsonl")


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [str(d / "absent")], "does not exist: pass a folder of images or a JSONL"),
        (lambda d: [str(d)], "a folder of images needs --text"),
        (lambda d: [str(d), "--text", "hi"], "no images (.png, .jpg"),
        (
            lambda d: [str(d), "--text", "a red dot", "--phrases", "blue"],
            "--phrases: phrase 'blue' is not in the text 'a red dot'",
        ),
        (
            lambda d: [jsonl(d, '{"image": "a.png", "text": "t"}', "{oops"), "--text", "x"],
            "--text/--phrases go with a folder of images",
        ),
        (
            lambda d: [jsonl(d, '{"image": "a.png", "text": "t"}', "{oops")],
            "in.jsonl line 2 is not valid JSON",
        ),
        (
            lambda d: [jsonl(d, '{"image": "b.png", "text": "t"}')],
            "in.jsonl line 1: image not found: {d}/b.png",
        ),
        (lambda d: [jsonl(d, '{"image": "a.png"}')], 'line 1 needs "image" and "text" strings'),
        (
            lambda d: [jsonl(d, '{"image": "a.png", "text": "a cat", "phrases": ["dog"]}')],
            "in.jsonl line 1: phrase 'dog' is not in the text 'a cat'",
        ),
        (
            lambda d: [jsonl(d, *['{"image": "a.png", "text": "t"}'] * 2)],
            "line 1 and ",
        ),
    ],
)
def test_bad_inputs_are_one_clear_line(tmp_path, capsys, make_args, message):
    with pytest.raises(SystemExit) as stop:
        main([*make_args(tmp_path), "--checkpoint", str(tmp_path / "x.ckpt")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flmm: error: ")
    assert message.format(d=tmp_path) in err[0]


def test_predict_is_a_command_with_help(capsys):
    assert COMMANDS["predict"][0] == "flmm.chat.predict"
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert stop.value.code == 0 and "--batch-size" in help_text
    assert "--max-new-tokens" not in help_text  # predict grounds given text, it never generates
    with pytest.raises(SystemExit) as stop:  # no abbreviations: --out is not --output-dir
        main(["images", "--out", "x"])
    assert stop.value.code == 2 and "unrecognized arguments: --out x" in capsys.readouterr().err


def test_predict_step_gives_masks_at_image_size(tiny_run):
    import hydra

    from flmm.model import FLMM, FLMMPredictor, load

    root, cfg, _ = tiny_run
    lmm, sam = hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)
    model = FLMM(load(root / "run" / "checkpoints" / "last.ckpt", lmm=lmm, sam=sam))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    loader = loader[0] if isinstance(loader, list) else loader
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, limit_predict_batches=1
    )
    [outputs] = trainer.predict(model, dataloaders=loader)
    batch = next(iter(loader))
    assert len(outputs) == len(batch) > 1
    for b, sample in enumerate(outputs):
        image, text = batch.images[b].numpy(), batch.texts[b]
        assert sample["phrases"] == batch.phrases(b) and sample["spans"] == batch.spans[b]
        shape = (len(batch.spans[b]), *image.shape[:2])
        assert sample["refined"].shape == sample["coarse"].shape == shape
        assert sample["refined"].dtype == torch.bool
        alone = FLMMPredictor(model.model).ground(image, text, sample["phrases"])
        torch.testing.assert_close(sample["refined"], alone.masks)
        torch.testing.assert_close(sample["coarse"], alone.coarse > 0.5)


def test_missing_selector_stops_before_any_image(saved, images, tmp_path, capsys):
    alone = tmp_path / "alone.ckpt"  # no selector.pt beside it
    shutil.copy(saved[1], alone)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(
            [
                str(images),
                "--text",
                TEXT,
                "--output-dir",
                str(out),
                *saved,
                "--checkpoint",
                str(alone),
            ]
        )
    assert stop.value.code == 2
    assert "flmm: error: no keyword selector is loaded" in capsys.readouterr().err
    assert not list(out.glob("*"))


def records(tmp_path: Path, images: Path, texts: list[str]) -> str:
    """A JSONL file of one record per image of ``images``, with ``texts`` and 'red circle'."""
    lines = [
        json.dumps({"image": str(path), "text": text, "phrases": ["red circle"]})
        for path, text in zip(sorted(images.iterdir()), texts)
    ]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "requests.jsonl")


def test_an_over_long_record_is_skipped_and_named_and_its_batch_goes_on(
    saved, images, tmp_path, capsys
):
    long = "the red circle " + "and more " * 2500  # 5,000+ words, 2,048 positions
    jsonl = records(tmp_path, images, ["a red circle", long, "the red circle"])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main([jsonl, "--output-dir", str(out), "--batch-size", "3", "--no-overlay", *saved])
    assert stop.value.code == 1
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"flmm: warning: skipping {jsonl} line 2: "
    )
    assert "more than the 2048 positions" in warnings[0] and "shorten it" in warnings[0]
    assert "predicted 2 images (2 phrases)" in captured.out
    assert "1 of 3 images failed and were skipped (exit status 1" in captured.err
    first, _, third = sorted(images.iterdir())
    assert sorted(p.name for p in out.iterdir()) == [f"{first.stem}.json", f"{third.stem}.json"]


def test_a_records_json_is_written_after_its_pngs_and_atomically(
    saved, images, tmp_path, capsys, monkeypatch
):
    """A failure while writing (here: the disk fills) leaves no JSON for the image it hit, whole
    or half, so a rerun recomputes it; the images finished before it stay and are skipped."""
    from flmm.chat import predict

    jsonl = records(tmp_path, images, ["a red circle"] * 3)
    args = [jsonl, "--output-dir", str(tmp_path / "out"), "--batch-size", "3", *saved]
    out, stems = tmp_path / "out", [p.stem for p in sorted(images.iterdir())]
    write_png, write_text = predict.save_png_atomic, Path.write_text

    def full_at_second_png(path: Path, array) -> None:
        if path.name.startswith(stems[1]):
            raise OSError(28, "No space left on device")
        write_png(path, array)

    def full_halfway_through_second_json(path: Path, text: str, *a, **k) -> int:
        if path.name.lstrip(".").startswith(f"{stems[1]}.json"):  # the file or its temporary
            write_text(path, text[: len(text) // 2])
            raise OSError(28, "No space left on device")
        return write_text(path, text, *a, **k)

    for name, target, fake in (
        ("save_png_atomic", predict, full_at_second_png),
        ("write_text", Path, full_halfway_through_second_json),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, fake)
            with pytest.raises(OSError, match="No space left"):
                main(args)
        names = {p.name for p in out.iterdir()}  # the second image's PNG, if written, stays
        assert {f"{stems[0]}.json", f"{stems[0]}_overlay.png"} <= names
        assert not {f"{stems[1]}.json", f"{stems[2]}.json"} & names
        assert not [n for n in names if n.endswith(".tmp")]
    main(args)
    assert "skipping 1 of 3 images: their JSON is in" in capsys.readouterr().out
    assert all(json.loads((out / f"{stem}.json").read_text())["phrases"] for stem in stems)
