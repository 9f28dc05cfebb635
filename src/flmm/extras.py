"""Optional packages a command line needs, checked before Hydra composes anything.

``hparams_search=optuna`` needs the Optuna sweeper of the ``sweep`` extra; without it Hydra would
stop composing with "Could not find 'hydra/sweeper/optuna'". :func:`check_extras` reads the
config groups the command line picks (and those the picked package configs pick in their
defaults lists) and raises one :class:`MissingExtraError` naming the ``pip install`` instead.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf

from flmm.errors import MissingExtraError

CONF = Path(__file__).resolve().parent / "conf"

# a picked config (GROUP/NAME) -> (module it needs, the distribution that brings it, the extra)
NEEDS = {
    "hydra/sweeper/optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "sweep"),
    "hydra/launcher/submitit_local": (
        "hydra_plugins.hydra_submitit_launcher",
        "hydra-submitit-launcher",
        "sweep",
    ),
    "hydra/launcher/submitit_slurm": (
        "hydra_plugins.hydra_submitit_launcher",
        "hydra-submitit-launcher",
        "sweep",
    ),
    "logger/wandb": ("wandb", "wandb", "wandb"),
}


def picked(overrides: list[str]) -> Iterator[tuple[str, str]]:
    """``(GROUP/NAME, override)`` for each config group choice of the command line, and for
    the choices in the defaults lists of the package configs it picks (one level down)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+~").strip("/")
        if not sep or not group or "." in group or "," in value:
            continue
        choice = f"{group}/{value}"
        yield choice, override
        yield from ((inner, override) for inner in defaults_of(choice))


def defaults_of(choice: str) -> Iterator[str]:
    """GROUP/NAME of the entries of the defaults list of the package config ``choice``."""
    path = CONF / f"{choice}.yaml"
    data = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None
    entries = data.get("defaults", []) if isinstance(data, dict) else []
    home = choice.rsplit("/", 1)[0]
    for entry in entries:
        if isinstance(entry, str) and entry != "_self_":
            yield f"{home}/{entry}"
        for key, value in entry.items() if isinstance(entry, dict) else ():
            group = key.removeprefix("override").strip()
            where = group.lstrip("/") if group.startswith("/") else f"{home}/{group}"
            yield f"{where}/{value}"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (its parent package too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_extras(overrides: list[str]) -> None:
    """A :class:`MissingExtraError` for the first choice of ``overrides`` whose package is
    missing, e.g. ``hparams_search=optuna needs hydra-optuna-sweeper, which is not installed:
    pip install 'flmm[sweep]'``."""
    for choice, override in picked(overrides):
        module, distribution, extra = NEEDS.get(choice, (None, None, None))
        if module and not installed(module):
            raise MissingExtraError(distribution, extra, override)
