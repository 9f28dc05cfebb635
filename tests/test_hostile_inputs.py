"""Hostile but fair inputs: no code runs from data files, each mistake is one line (exit code 2)
or a counted skip, nothing finished is lost. One case per probe of issue 18."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from refer_fixtures import _refs, write_refer_fixture

from flmm.data import ReferDataset, load_refer
from flmm.runtime import exit_on_user_error


def one_line_error(capsys, fn, *args, **kwargs) -> str:
    """Run ``fn`` as an entry point does; assert it ends with exit code 2 and a one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(fn, *args, **kwargs)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flmm: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------- refer files
@pytest.fixture
def refer(tmp_path) -> Path:
    write_refer_fixture(tmp_path)
    return tmp_path


def write_refs(root: Path, refs) -> None:
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)


def edit_instances(root: Path, edit) -> None:
    path = root / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    edit(instances)
    path.write_text(json.dumps(instances))


def train_set(root: Path) -> ReferDataset:
    return ReferDataset(root, root / "images", "refcoco", "unc", "train", "reference")


class Payload:
    """Pickles as "call ``fn(*args)``": what a crafted refs file runs under ``pickle.load``."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
def test_refs_pickle_payload_does_not_run(refer, tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    call = (
        Payload(os.system, f"touch {marker}")
        if payload == "os.system"
        else Payload(open, str(marker), "w")
    )
    write_refs(refer, [*_refs(), {"ref_id": 99, "evil": call}])
    err = one_line_error(capsys, load_refer, refer)
    assert not marker.exists()
    assert (
        "refs(unc).p" in err and ("system" in err or "open" in err) and "nothing in it ran" in err
    )


def test_refs_file_that_is_not_a_pickle(refer, capsys):
    (refer / "refcoco" / "refs(unc).p").write_text("ref_id,ann_id\n1,11\n")
    err = one_line_error(capsys, load_refer, refer)
    assert "refs(unc).p is not a readable refs pickle" in err


def test_truncated_refs_file(refer, capsys):
    path = refer / "refcoco" / "refs(unc).p"
    path.write_bytes(path.read_bytes()[:100])
    assert "truncated" in one_line_error(capsys, load_refer, refer)


def test_ref_without_split(refer, capsys):
    refs = _refs()
    del refs[3]["split"]
    write_refs(refer, refs)
    err = one_line_error(capsys, load_refer, refer)
    assert "ref #3 (ref_id 4) has no 'split'" in err


def test_refs_file_holding_a_dict(refer, capsys):
    write_refs(refer, {"refs": _refs()})
    assert "holds a dict, not the list of refs" in one_line_error(capsys, load_refer, refer)


def test_invalid_instances_json(refer, capsys):
    (refer / "refcoco" / "instances.json").write_text('{"images": [')
    assert "instances.json is not valid JSON" in one_line_error(capsys, load_refer, refer)


def test_instances_json_without_annotations(refer, capsys):
    edit_instances(refer, lambda d: d.pop("annotations"))
    assert "has no list 'annotations'" in one_line_error(capsys, load_refer, refer)


def test_empty_dict_segmentation(refer, capsys):
    edit_instances(refer, lambda d: d["annotations"][0].update(segmentation={}))
    err = one_line_error(capsys, train_set, refer)
    assert "annotation 11" in err and "unsupported COCO segmentation" in err


def test_polygon_with_odd_coordinate_count(refer, capsys):
    edit_instances(refer, lambda d: d["annotations"][0]["segmentation"][0].append(7.0))
    err = one_line_error(capsys, train_set, refer)
    assert "annotation 11" in err and "odd number of coordinates (9)" in err


def test_ref_pointing_at_another_images_annotation_is_skipped_and_counted(refer):
    refs = _refs()
    refs[0]["ann_id"] = 21  # ref 1 is on image 1; annotation 21 belongs to image 2
    write_refs(refer, refs)
    data = train_set(refer)
    assert data.skipped["annotation_of_another_image"] == 1
    assert all(p.ref["ref_id"] != 1 for record in data.records for p in record)
