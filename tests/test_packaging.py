"""The package a user installs: declared dependencies and extras, the `flmm` command, the configs
inside the package, and the optional dependencies' one-line errors."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from graphlib import TopologicalSorter
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from flmm import cli
from flmm.entry import CONFIG_PATH
from flmm.errors import MissingExtraError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "flmm"
# modules allowed to import an optional dependency (guarded, with a MissingExtraError)
OPTIONAL_IMPORTS = {
    "gradio": ("web", {"web.py"}),
    # only with logger=wandb, which flmm.training.trainer.require_extras checks first
    "wandb": ("wandb", {"callbacks.py"}),
    # only with quantization="int8", which lmm.loading.quantization_config checks first
    "torchao": ("quant", {"loading.py"}),
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {normalise(Requirement(r).name) for r in project["dependencies"]}
    extras = {
        extra: {normalise(Requirement(r).name) for r in reqs}
        for extra, reqs in project["optional-dependencies"].items()
    }
    return core, extras


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"flmm", "__future__"}


# the commands: only they import flmm.entry, and no module below them imports one of them
COMMANDS = {
    "flmm.entry",
    "flmm.train",
    "flmm.evaluate",
    "flmm.cli",
    "flmm.__main__",
    "flmm.foundation.__main__",
    "flmm.chat.evaluate_pope",
    "flmm.chat.train_selector",
}


def flmm_modules() -> dict[str, Path]:
    """``{"flmm.data.mix": path, ...}`` for every module of the package."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = ("flmm", *path.relative_to(SRC).with_suffix("").parts)
        modules[".".join(parts).removesuffix(".__init__")] = path
    return modules


def flmm_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The flmm modules ``path`` imports, anywhere in it (``from flmm.x import y``: ``flmm.x.y``
    where that is a module, else ``flmm.x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            names |= (subs & modules.keys()) or {node.module}
    return names & modules.keys()


def test_only_commands_import_the_commands():
    modules = flmm_modules()
    upward = {
        (name, imported)
        for name, path in modules.items()
        if name not in COMMANDS
        for imported in flmm_imports(path, modules) & COMMANDS
    }
    assert not upward


def test_no_import_cycles_between_packages():
    """Packages (``flmm.data``, ``flmm.model``...) and loose modules import each other one way."""
    modules = flmm_modules()

    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    edges = {unit(n): set() for n in modules}
    for name, path in modules.items():
        edges[unit(name)] |= {unit(m) for m in flmm_imports(path, modules)} - {unit(name), "flmm"}
    graph = TopologicalSorter(edges)
    graph.prepare()  # raises CycleError naming the cycle


def test_every_import_is_a_declared_dependency():
    """Each third-party module flmm imports comes from a core dependency; optional ones only in
    the modules that guard them, from the extra their error names."""
    core, extras = declared()
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for path in sorted(SRC.rglob("*.py")):
        for name in sorted(imports_of(path)):
            dists = {normalise(d) for d in distributions.get(name, [name])}
            extra, allowed_in = OPTIONAL_IMPORTS.get(name, (None, set()))
            if dists & core or (path.name in allowed_in and dists & extras[extra]):
                continue
            undeclared.append(f"{path.relative_to(ROOT)}: {name} ({', '.join(sorted(dists))})")
    assert not undeclared, "imports not declared in pyproject.toml:\n" + "\n".join(undeclared)


def test_extras_and_lower_bounds():
    core, extras = declared()
    assert {"gradio", "wandb", "hydra-submitit-launcher", "hydra-optuna-sweeper"}.isdisjoint(core)
    assert {"web", "wandb", "sweep", "notebook", "test", "all"} <= set(extras)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch>"))
    # torch.distributed.fsdp.fully_shard, imported by every entry point, is public from 2.6
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0")
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")


def test_optuna_study_saves_to_sqlite(tmp_path):
    """hparams_search=optuna recommends sqlite storage; the pinned optuna 2.x needs SQLAlchemy 1.x."""
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("lr", 0.0, 1.0), n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 2


def test_configs_live_inside_the_package():
    assert Path(CONFIG_PATH) == SRC / "conf"
    assert (SRC / "conf" / "train.yaml").is_file()
    # ./conf is the user's layer (conf/README.md): examples, never a packaged config
    assert not list((ROOT / "conf").glob("*.yaml"))


def test_flmm_command_lists_every_entry_point(capsys):
    assert cli.main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in cli.COMMANDS)
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main)


def test_missing_web_extra_is_one_line(monkeypatch, capsys):
    from flmm.chat import web

    monkeypatch.setattr(web, "gr", None)
    with pytest.raises(SystemExit) as stop:
        web.main([])
    assert stop.value.code == 2
    assert "pip install 'flmm[web]'" in capsys.readouterr().err


def test_missing_wandb_extra_is_one_line(monkeypatch):
    from omegaconf import OmegaConf

    from flmm.training import trainer

    monkeypatch.setattr(trainer.importlib.util, "find_spec", lambda name: None)
    group = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger"}})
    with pytest.raises(MissingExtraError, match=r"pip install 'flmm\[wandb\]'"):
        trainer.instantiate_group(group)


def hide(monkeypatch, module: str) -> None:
    """Simulate a missing optional package: ``find_spec`` does not find ``module``."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == module else find_spec(name, *a),
    )


@pytest.fixture
def no_optuna_sweeper(monkeypatch):
    """The sweep extra's Optuna sweeper missing, for Hydra too: its config is gone from Hydra's
    config store (where the plugin put it), so composing hparams_search=optuna fails as it does
    without the package."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        compose("train")  # Hydra has scanned its plugins: the sweeper's config is stored
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["sweeper"], "optuna.yaml")
    hide(monkeypatch, "hydra_plugins.hydra_optuna_sweeper")


def test_hydra_alone_cannot_compose_a_search_without_the_sweeper(no_optuna_sweeper):
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    missing = pytest.raises(MissingConfigException, match="Could not find 'hydra/sweeper/optuna'")
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"), missing:
        compose("train", overrides=["hparams_search=optuna"])


@pytest.mark.parametrize(
    "override, package, extra",
    [
        ("hparams_search=optuna", "hydra-optuna-sweeper", "sweep"),
        ("hydra/launcher=slurm", "hydra-submitit-launcher", "sweep"),
        ("logger=wandb", "wandb", "wandb"),
    ],
)
def test_a_missing_extra_stops_flmm_train_in_one_line_before_anything_runs(
    override, package, extra, no_optuna_sweeper, monkeypatch, capsys
):
    from flmm import train

    hide(monkeypatch, "hydra_plugins.hydra_submitit_launcher")
    hide(monkeypatch, "wandb")
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail("the run started"))
    monkeypatch.setattr(sys, "argv", ["flmm train", "-m", override])
    with pytest.raises(SystemExit) as stop:
        train.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        (
            f"flmm: error: {override} needs {package}, which is not installed: "
            f"pip install 'flmm[{extra}]'"
        )
    ]


def test_flmm_web_without_gradio_is_one_line():
    """gradio unimportable (``sys.modules`` entry None) when ``flmm web`` starts."""
    import subprocess

    code = "import sys; sys.modules['gradio'] = None; from flmm import cli; cli.main(['web'])"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "flmm: error: the web page needs gradio, which is not installed: pip install 'flmm[web]'"
    ]


@pytest.mark.slow
def test_the_built_wheel_runs_from_any_folder(tmp_path):
    """A built (not editable) wheel, used from an unrelated folder through its `flmm` script:
    configs found inside the package, every entry point answers --help, the Hydra ones print
    their composed job, flmm's home is the user's cache folder, runs go under the folder."""
    import subprocess

    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    subprocess.run(build, check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("flmm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = {
        "PATH": f"{target / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": str(target),
        "HOME": str(tmp_path),
    }

    def flmm(*args: str) -> str:
        out = subprocess.run(
            ["flmm", *args], check=False, cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    location = [sys.executable, "-c", "import flmm; print(flmm.__file__)"]
    where = subprocess.run(
        location, check=True, cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(target))
    from flmm.chat.web import EXAMPLES

    assert all((target / "flmm/chat/examples" / name).is_file() for name, *_ in EXAMPLES)
    for command in ("train", "evaluate", "pope", "train-selector"):
        assert "_target_" in flmm(command, "--cfg", "job")
    for command in cli.COMMANDS:
        assert flmm(command, "--help")
    assert "checkpoint=PATH|last" in flmm("train", "--help")
    assert "--checkpoint CHECKPOINT" in flmm("ground", "--help")
    paths = flmm("train", "--cfg", "job", "--resolve", "--package", "paths")
    assert f"home_dir: {tmp_path}/.cache/flmm" in paths and "log_dir: ./logs" in paths
    assert not any(elsewhere.iterdir())  # nothing written where the command ran
