"""The notebook runs top to bottom on a trained synthetic-world checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "synthetic_world.ipynb"


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_notebook_executes(tiny_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    root, _, _ = tiny_run
    monkeypatch.setenv("FLMM_HOME", str(root))
    monkeypatch.setenv("FLMM_CKPT", str(root / "run" / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("FLMM_SAM", str(next((root / "foundation").glob("tiny_sam*.pth"))))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    assert any(
        "IoU coarse" in "".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells
    )
