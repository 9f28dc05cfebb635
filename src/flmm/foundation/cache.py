"""The synthetic world's foundation models: the shipped files, or built once and cached.

Each function returns the path a user's real model would have (a ``save_pretrained`` folder, a SAM
state dict), so the configs hand it to the ordinary loaders. When the recipe asked for is the one
the package's shipped files were built from (``shipped/recipe.json``), that is the shipped path;
otherwise the model is built into the cache. Builds are seeded, atomic (written to a temporary
folder, then renamed) and guarded by a file lock, so concurrent ranks build once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from flmm.data.synthetic.corpus import INSTRUCT_STREAM, vocabulary
from flmm.data.synthetic.world import sample_scene
from flmm.errors import ConfigError
from flmm.foundation.pretrain_lmm import pretrain_tiny_llava, pretrain_vision_tower
from flmm.foundation.pretrain_sam import pretrain_tiny_sam
from flmm.foundation.tiny_llava import build_tiny_llava

log = logging.getLogger(__name__)
# bump when the tiny models' architecture, vocabulary or training code changes what a recipe builds
TINY_VERSION = 3
# the synthetic world's tiny LLaVA: a 2-layer vision tower read at its penultimate layer, as
# LLaVA-1.5 reads CLIP's (F-LMM test gIoU 43.0; the last of 3 layers: 35.3; docs/tiny_llava.md)
WORLD_LLAVA = {"vision_layers": 2, "vision_feature_layer": -2}
SHIPPED_DIR = Path(__file__).with_name("shipped")
SHIPPED = {"tiny_llava": SHIPPED_DIR / "tiny_llava", "tiny_sam": SHIPPED_DIR / "tiny_sam.pth"}
RECIPE_FILE = SHIPPED_DIR / "recipe.json"


def llava_recipe(
    pretrain_steps: int = 2000,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = 96,
    lr: float = 1e-3,
    corpus: dict | None = None,
    vision_aux: float = 0.0,
    instruct: dict | None = None,
    vision_stage: dict | None = None,
) -> dict:
    """What a tiny LLaVA build depends on: its arguments, :data:`TINY_VERSION`, the vision
    tower (:data:`WORLD_LLAVA`) and a digest of the vocabulary (the training settings only when
    it is pretrained; the vision and instruction stages only when they have steps)."""
    words = hashlib.sha256(" ".join(vocabulary()).encode()).hexdigest()[:12]
    recipe = {"version": TINY_VERSION, "vocabulary": words, "image_size": image_size}
    recipe |= {"vision": dict(WORLD_LLAVA), "pretrain_steps": pretrain_steps, "seed": seed}
    if pretrain_steps:
        recipe |= {"batch_size": batch_size, "lr": lr, "corpus": dict(corpus or {})}
        recipe |= {"vision_aux": vision_aux} if vision_aux else {}
        recipe |= {"instruct": stage} if (stage := instruct_stage(instruct)) else {}
        recipe |= {"vision_stage": stage} if (stage := tower_stage(vision_stage)) else {}
    return recipe


def instruct_stage(instruct: dict | None) -> dict | None:
    """The instruction stage's ``{"steps", "lr", "corpus"}`` (None when it has no steps)."""
    found = _stage("instruct", instruct, ("steps", "lr", "corpus"))
    return found and found | {"corpus": dict(found.get("corpus") or {})}


def tower_stage(vision: dict | None) -> dict | None:
    """The vision-tower stage's ``{"steps", "lr"}`` (None when it has no steps)."""
    return _stage("vision_stage", vision, ("steps", "lr"))


def _stage(name: str, settings: dict | None, keys: tuple[str, ...]) -> dict | None:
    if not settings or not settings.get("steps"):
        return None
    if set(settings) - set(keys) or "lr" not in settings:
        raise ConfigError(
            f"model.lmm.name_or_path.{name} takes {', '.join(keys)}; got {sorted(settings)}"
        )
    return dict(settings) | {"steps": int(settings["steps"]), "lr": float(settings["lr"])}


def sam_recipe(pretrain_steps: int = 600, seed: int = 0, image_size: int = 96) -> dict:
    """What a tiny SAM build depends on."""
    return {
        "version": TINY_VERSION,
        "pretrain_steps": pretrain_steps,
        "seed": seed,
        "image_size": image_size,
    }


def shipped_path(name: str, recipe: dict) -> str | None:
    """The shipped file of ``name`` (``tiny_llava`` or ``tiny_sam``) if it was built from
    ``recipe``, else None."""
    built = json.loads(RECIPE_FILE.read_text()) if RECIPE_FILE.is_file() else {}
    found = built.get(name, {}).get("recipe")
    same = json.dumps(found, sort_keys=True) == json.dumps(recipe, sort_keys=True)
    return str(SHIPPED[name]) if same and SHIPPED[name].exists() else None


def shipped_tiny_sam() -> str:
    """The synthetic world's tiny SAM shipped with flmm; a clear error if the file is missing."""
    path = SHIPPED["tiny_sam"]
    if not path.is_file():
        raise FileNotFoundError(
            f"no SAM checkpoint given and the tiny SAM shipped with flmm is missing at {path}; "
            "pass sam=/path/to/sam_vit_l_0b3195.pth, or rebuild it with `make foundation`"
        )
    return str(path)


def recipe_digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]


def ensure_tiny_llava(
    cache_dir: str,
    pretrain_steps: int = 2000,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = 96,
    lr: float = 1e-3,
    corpus: dict | None = None,
    vision_aux: float = 0.0,
    instruct: dict | None = None,
    vision_stage: dict | None = None,
) -> str:
    """Path of the tiny LLaVA pretrained for ``pretrain_steps`` (0: random weights): the shipped
    one if it was built from this recipe, else built into ``cache_dir`` if missing.

    ``corpus`` holds the keyword arguments of
    :func:`~flmm.data.synthetic.corpus.pretraining_pairs`; ``vision_aux`` weighs the vision
    tower's patch probe (:class:`~flmm.foundation.pretrain_lmm.PatchProbe`). ``instruct``
    (``steps``, ``lr``, ``corpus``): a second stage, as LLaVA's visual instruction tuning
    follows its caption pretraining, that goes on training the pretrained model on scenes of its
    own stream. ``vision_stage`` (``steps``, ``lr``): a stage before them that trains the vision
    tower alone on each patch's colour and shape, as CLIP is trained before LLaVA
    (:func:`~flmm.foundation.pretrain_lmm.pretrain_vision_tower`). A stage without steps is
    skipped. The folder name carries a digest of the whole recipe, so a changed recipe builds a
    new model instead of reusing a stale one.
    """
    args = (pretrain_steps, seed, batch_size, image_size, lr, dict(corpus or {}), vision_aux)
    args += (instruct, vision_stage)
    recipe = llava_recipe(*args)
    return shipped_path("tiny_llava", recipe) or cached_tiny_llava(cache_dir, *args)


def cached_tiny_llava(
    cache_dir: str,
    pretrain_steps: int,
    seed: int,
    batch_size: int,
    image_size: int,
    lr: float,
    corpus: dict,
    vision_aux: float = 0.0,
    instruct: dict | None = None,
    vision_stage: dict | None = None,
    fresh: bool = False,
) -> str:
    """Path of the tiny LLaVA of this recipe in ``cache_dir`` (float32), built if missing (or
    rebuilt, if ``fresh``); an interrupted pretraining resumes from its state file there."""
    args = (pretrain_steps, seed, batch_size, image_size, lr, corpus, vision_aux)
    args += (instruct_stage(instruct), tower_stage(vision_stage))
    name = f"tiny_llava_seed{seed}_steps{pretrain_steps}_{recipe_digest(llava_recipe(*args))}"
    out = Path(cache_dir) / name
    state = Path(cache_dir) / f".{name}.state.pt"
    if fresh:
        _remove(out)
    return _build_once(out, lambda tmp: _build_llava(tmp, *args, state_path=state))


def ensure_tiny_sam(
    cache_dir: str, pretrain_steps: int = 600, seed: int = 0, image_size: int = 96
) -> str:
    """Path of the tiny SAM state dict pretrained on the world's promptable segmentation: the
    shipped one if it was built from this recipe, else built into ``cache_dir`` if missing."""
    recipe = sam_recipe(pretrain_steps, seed, image_size)
    return shipped_path("tiny_sam", recipe) or cached_tiny_sam(
        cache_dir, pretrain_steps, seed, image_size
    )


def cached_tiny_sam(
    cache_dir: str, pretrain_steps: int, seed: int, image_size: int, fresh: bool = False
) -> str:
    """Path of the tiny SAM of this recipe in ``cache_dir`` (float32), built if missing (or
    rebuilt, if ``fresh``)."""
    digest = recipe_digest(sam_recipe(pretrain_steps, seed, image_size))
    out = Path(cache_dir) / f"tiny_sam_seed{seed}_steps{pretrain_steps}_{digest}.pth"
    if fresh:
        _remove(out)
    scenes = world_scenes(image_size)
    return _build_once(
        out,
        lambda tmp: pretrain_tiny_sam(
            tmp, scenes, steps=pretrain_steps, seed=seed, max_seconds=None
        ),
    )


def world_scenes(image_size: int):
    """A scene sampler for SAM pretraining: ``rng -> (image, list of object masks)``."""

    def sample(rng: np.random.Generator):
        scene = sample_scene(rng, image_size=image_size)
        return scene.image, [obj.mask for obj in scene.objects]

    return sample


def _build_llava(
    tmp: Path,
    steps: int,
    seed: int,
    batch_size: int,
    image_size: int,
    lr: float,
    corpus: dict,
    vision_aux: float,
    instruct: dict | None,
    vision_stage: dict | None,
    state_path: Path | None = None,
) -> None:
    """Build into ``tmp``: the vision stage, the language stage, the instruction stage (each
    ``None`` or ``{"steps", ...}`` stage as :func:`instruct_stage` / :func:`tower_stage` give
    it). A finished first part (vision and language stages) is kept for a rerun."""
    if not steps:
        build_tiny_llava(tmp, vocabulary(), image_size=image_size, seed=seed, **WORLD_LLAVA)
        return
    first = tmp.parent / f"{tmp.name}-pretrained" if instruct else tmp
    init = tmp.parent / f"{tmp.name}-init"
    if not (first / "pretraining.json").is_file():
        _remove(init)
        build_tiny_llava(init, vocabulary(), image_size=image_size, seed=seed, **WORLD_LLAVA)
        if vision_stage:
            pretrain_vision_tower(init, vision_stage["steps"], lr=vision_stage["lr"], seed=seed)
        pretrain_tiny_llava(
            init,
            first,
            steps,
            batch_size,
            lr,
            seed=seed,
            image_size=image_size,
            corpus=corpus,
            state_path=state_path,
            vision_aux=vision_aux,
        )
    _remove(init)
    if instruct:
        second = state_path.with_name(state_path.name + ".instruct") if state_path else None
        pretrain_tiny_llava(
            first,
            tmp,
            instruct["steps"],
            batch_size,
            instruct["lr"],
            seed=seed,
            image_size=image_size,
            corpus=instruct["corpus"],
            state_path=second,
            stream=INSTRUCT_STREAM,
        )
        _record_first_stage(first, tmp)
        shutil.rmtree(first)


def _record_first_stage(first: Path, model_dir: Path) -> None:
    """Keep the first stage's ``pretraining.json`` inside the finished model's, under
    ``"first_stage"``, so the shipped folder says how both stages trained it."""
    info_file = model_dir / "pretraining.json"
    info = json.loads(info_file.read_text())
    info["first_stage"] = json.loads((first / "pretraining.json").read_text())
    info_file.write_text(json.dumps(info, indent=2))


def _build_once(out: Path, build) -> str:
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            tmp = out.parent / f".{out.name}.partial"
            _remove(tmp)
            log.info("building %s (cached for later runs)", out)
            # the global RNGs are left as they were, so a run that builds the models first
            # initialises its heads exactly like a later run that finds them cached
            with torch.random.fork_rng():
                build(tmp)
            tmp.rename(out)
    return str(out)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
