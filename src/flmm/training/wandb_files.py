"""W&B with ``logger=wandb``: its files in the run folder (its mode follows the user's
``WANDB_MODE``, else offline: :func:`flmm.entry.wandb_offline`).

W&B stages the files of logged tables (their images) in its
data folder, ``~/.local/share/wandb`` by default; :func:`keep_in_run_folder` points it, and the
cache, into ``<run>/wandb/`` unless the user set those folders.
"""

from __future__ import annotations

import os
from pathlib import Path

# W&B's folders outside its run directory -> their place under <run>/wandb/
FOLDERS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}
USER_SET = {name for name in FOLDERS if name in os.environ}


def keep_in_run_folder(output_dir: str) -> None:
    """Point W&B's data and cache folders into ``<output_dir>/wandb/`` (per run, also in a
    multirun), except those the user set."""
    for name, sub in FOLDERS.items():
        if name not in USER_SET:
            os.environ[name] = str(Path(output_dir) / "wandb" / sub)
