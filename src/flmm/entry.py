"""What every Hydra command does before it composes a config: :func:`setup_configs` (the
``<family>_tiny`` models, the ``flmm.*`` resolvers, the user's ``conf/`` searched first), the check
of the command line's spellings (:func:`hydra_entry`) and of the run folder (:class:`WritableRunFolder`).

The commands (train, evaluate, ``flmm.chat.evaluate_pope``, ``flmm.chat.train_selector``,
``python -m flmm.foundation``) and the tests' compose helpers import this module; nothing below
them does.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from flmm.errors import ConfigError, MissingExtraError, exit_on_user_error
from flmm.files import check_writable, flmm_home
from flmm.lmm import get_family, list_lmms

# the packaged configs (in the wheel)
CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")
# the user's layer: conf/ of the folder a command runs in (conf/README.md)
USER_CONF = "conf"

# options spelled as in an earlier version or for another kind of command -> what to write here
RESPELLED = {
    "ckpt_path": "checkpoint=PATH",
    "save_to": "output=PATH",
    "device": "trainer.accelerator=cpu|gpu (or trainer=gpu)",
    "dtype": "model.lmm.dtype=NAME",
}


class UserConfFirst(SearchPathPlugin):
    """Search ``./conf`` (where it exists) before the packaged configs, as lightning-hydra-template
    searches its ``configs/``: a user's ``conf/model/llava.yaml`` replaces the packaged one, and
    ``conf/experiment/mine.yaml`` is ``experiment=mine``. Other Hydra apps are left alone."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        user = Path.cwd() / USER_CONF
        main = [e for e in search_path.get_path() if e.provider == "main"]
        ours = bool(main) and Path(main[0].path.removeprefix("file://")) == Path(CONFIG_PATH)
        if ours and user.is_dir() and user.resolve() != Path(CONFIG_PATH):
            search_path.prepend(
                "flmm user conf", f"file://{user}", SearchPathQuery(provider="main")
            )


def register_tiny_configs() -> None:
    """``model=<family>_tiny`` for every family of the registry: the template
    ``model/family_tiny.yaml`` with the family (and its tiny grid) filled in, so a new family
    needs its registry row, its tiny builder and its real-model config, nothing more."""
    store = ConfigStore.instance()
    for family in list_lmms():
        lmm = {"family": family, "grid_size": get_family(family).tiny_grid_size}
        node = {"defaults": ["family_tiny", "_self_"], "lmm": lmm}
        store.store(group="model", name=f"{family}_tiny", node=node)


def run_name(task_name: str, overrides: str) -> str:
    """A run's name: the task and its command line's overrides, e.g.
    ``train:data=refcoco,model=llava`` (``${flmm.run_name:${task_name},${hydra:job.override_dirname}}``)."""
    return f"{task_name}:{overrides}" if overrides else task_name


def wandb_offline() -> bool:
    """``logger.wandb.offline``: True unless the user set ``WANDB_MODE`` (W&B then obeys it), so
    a run never reaches the network unasked."""
    return "WANDB_MODE" not in os.environ


def setup_configs() -> None:
    """Make the configs compose as the commands do: the ``<family>_tiny`` models, the ``flmm.run_name``
    and ``flmm.home`` and ``flmm.wandb_offline`` resolvers, ``./conf`` searched first. Call it before ``compose`` or
    ``@hydra.main``; calling it again changes nothing."""
    register_tiny_configs()
    OmegaConf.register_new_resolver("flmm.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("flmm.home", lambda: str(flmm_home()), replace=True)
    OmegaConf.register_new_resolver("flmm.wandb_offline", wandb_offline, replace=True)
    Plugins.instance().register(UserConfFirst)


def check_spellings(config_name: str, overrides: list[str]) -> None:
    """A :class:`ConfigError` naming the spelling to use for an override of an option this
    command does not have but :data:`RESPELLED` knows (Hydra's own message would only say it
    cannot override it)."""
    options = OmegaConf.load(Path(CONFIG_PATH) / f"{config_name}.yaml")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" in override and key in RESPELLED and key not in options:
            raise ConfigError(f"{key}= is not an option of this command: use {RESPELLED[key]}")


def hydra_entry(config_name: str) -> Callable:
    """``@hydra.main`` with the package's config ``config_name``, after :func:`setup_configs`,
    :func:`check_spellings` and :func:`check_extras` of the command line."""

    def decorate(task: Callable) -> Callable:
        run = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)

        @functools.wraps(task)
        def main():
            setup_configs()
            exit_on_user_error(check_spellings, config_name, sys.argv[1:])
            exit_on_user_error(check_extras, sys.argv[1:])
            return run()

        return main

    return decorate


class WritableRunFolder(Callback):
    """Hydra callback (conf/hydra/default.yaml): before Hydra makes the run folder, one line and
    exit code 2 if it cannot be written (a file in its way, a read-only folder), instead of
    Hydra's traceback from deep in its own code."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        exit_on_user_error(check_writable, config.hydra.run.dir, "output_dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        exit_on_user_error(check_writable, config.hydra.sweep.dir, "hydra.sweep.dir")


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
