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

from flmm.data.synthetic.corpus import (
    vocabulary,
)
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import sample_scene
from flmm.errors import ConfigError
from flmm.files import home_or, locked
from flmm.foundation.pretrain_lmm import pretrain_tiny_llava, pretrain_vision_tower
from flmm.foundation.pretrain_sam import pretrain_tiny_sam
from flmm.foundation.tiny_llava import build_tiny_llava

log = logging.getLogger(__name__)
# bump when the tiny models' architecture, vocabulary or training code changes what a recipe builds
TINY_VERSION = 3
# the synthetic world's tiny LLaVA: a 2-layer vision tower read at its penultimate layer, as
# LLaVA-1.5 reads CLIP's (F-LMM test gIoU 43.0; the last of 3 layers: 35.3), 128 wide (at 64 a
# linear probe reads shape on 55.7% of object patches after the vision stage, at 128 on 86.3%;
# docs/development/tiny_llava.md, "A wider vision tower")
WORLD_LLAVA = {"vision_layers": 2, "vision_feature_layer": -2, "vision_hidden": 128}
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
    vqa: dict | None = None,
    negatives: dict | None = None,
    steps_scale: float = 1.0,
) -> dict:
    """What a tiny LLaVA build depends on: its arguments, :data:`TINY_VERSION`, the vision
    tower (:data:`WORLD_LLAVA`) and a digest of the vocabulary (the training settings only when
    it is pretrained; each optional stage only when it has steps). The build reads this dict
    alone (:func:`_build_llava`), so what is recorded is what was built.

    ``steps_scale`` multiplies the steps of every stage (at least one step each), for a quick
    build of the whole recipe; the recipe records the scaled steps, not the scale."""
    stages = {"instruct": instruct, "vqa": vqa, "negatives": negatives}
    stages |= {"vision_stage": vision_stage}
    if steps_scale != 1.0:
        pretrain_steps, stages = scaled_steps(steps_scale, pretrain_steps, stages)
    words = hashlib.sha256(" ".join(vocabulary()).encode()).hexdigest()[:12]
    recipe = {"version": TINY_VERSION, "vocabulary": words, "image_size": image_size}
    recipe |= {"vision": dict(WORLD_LLAVA), "pretrain_steps": pretrain_steps, "seed": seed}
    if pretrain_steps:
        recipe |= {"batch_size": batch_size, "lr": lr, "corpus": dict(corpus or {})}
        recipe |= {"vision_aux": vision_aux} if vision_aux else {}
        for name in LATER_STAGES:
            recipe |= {name: stage} if (stage := language_stage(name, stages[name])) else {}
        recipe |= {"vision_stage": stage} if (stage := tower_stage(stages["vision_stage"])) else {}
    return recipe


# the stages that go on training a finished model, in build order, and their scenes' RNG streams
LATER_STAGES = {"instruct": Stream.INSTRUCT, "vqa": Stream.VQA, "negatives": Stream.NEGATIVES}


def scaled_steps(scale: float, pretrain_steps: int, stages: dict) -> tuple[int, dict]:
    """``pretrain_steps`` and each stage's settings (None for a stage left out) with their steps
    times ``scale``; a stage with steps keeps at least one."""
    if not 0 < scale <= 1:
        raise ConfigError(
            f"model.lmm.name_or_path.steps_scale must be in (0, 1] (1: the whole recipe), got {scale}"
        )

    def times(steps) -> int:
        return max(1, round(int(steps) * scale)) if steps else 0

    scaled = {k: s and dict(s) | {"steps": times(s.get("steps"))} for k, s in stages.items()}
    return times(pretrain_steps), scaled


def language_stage(name: str, settings: dict | None) -> dict | None:
    """A later stage's ``{"steps", "lr", "corpus"}`` (None when it has no steps)."""
    found = _stage(name, settings, ("steps", "lr", "corpus"))
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
    vqa: dict | None = None,
    negatives: dict | None = None,
    steps_scale: float = 1.0,
) -> str:
    """Path of the tiny LLaVA pretrained for ``pretrain_steps`` (0: random weights): the shipped
    one if it was built from this recipe, else built into ``cache_dir`` if missing.

    Stages, in build order (one without steps is skipped):

    - ``vision_stage`` (``steps``, ``lr``): the vision tower alone learns each patch's colour
      and shape, as CLIP is trained before LLaVA
      (:func:`~flmm.foundation.pretrain_lmm.pretrain_vision_tower`);
    - the language stage: ``pretrain_steps`` at ``lr`` on ``corpus`` (the keyword arguments of
      :func:`~flmm.data.synthetic.corpus.pretraining_pairs`), ``vision_aux`` weighing the
      tower's patch probe (:class:`~flmm.foundation.pretrain_lmm.PatchProbe`);
    - ``instruct`` (``steps``, ``lr``, ``corpus``): goes on on conversations, as LLaVA's visual
      instruction tuning follows its caption pretraining;
    - ``vqa`` (the same keys): goes on on short answers, as LLaVA-1.5 adds short-answer VQA data;
    - ``negatives`` (the same keys): goes on on existence questions whose "no"s are near misses of
      the scene's objects (the corpus's ``near_prob``) and whose crops may show another object
      (``decoy_prob``), as hallucination-targeted tuning follows instruction tuning.

    ``steps_scale`` (in (0, 1]) shortens every stage alike, for a quick build of the whole recipe
    (``pretrain_steps`` alone shortens only the language stage). The folder name carries a digest
    of the whole recipe, so a changed recipe builds a new model instead of reusing a stale one.
    """
    recipe = llava_recipe(**{k: v for k, v in locals().items() if k != "cache_dir"})
    return shipped_path("tiny_llava", recipe) or _cached_llava(Path(cache_dir), recipe, False)


def cached_tiny_llava(cache_dir: str, fresh: bool = False, **args) -> str:
    """Path of the tiny LLaVA of this recipe (the arguments of :func:`ensure_tiny_llava`) in
    ``cache_dir`` (float32), built if missing (or rebuilt with every stage, if ``fresh``)."""
    return _cached_llava(Path(cache_dir), llava_recipe(**args), fresh)


def _cached_llava(cache_dir: Path, recipe: dict, fresh: bool) -> str:
    """A later stage goes on from the cached model of the recipe without it, so the stages
    before it are built once and kept; an interrupted stage resumes from its state file."""
    steps, seed = recipe["pretrain_steps"], recipe["seed"]
    name = f"tiny_llava_seed{seed}_steps{steps}_{recipe_digest(recipe)}"
    out, state = cache_dir / name, cache_dir / f".{name}.state.pt"
    if fresh:
        _remove(out)
    return _build_once(out, lambda tmp: _build_llava(tmp, recipe, state, fresh))


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


def _build_llava(tmp: Path, recipe: dict, state_path: Path, fresh: bool) -> None:
    """Build ``recipe`` into ``tmp``: its last later stage on the cached model of the recipe
    without that stage, or (none) the vision and language stages on a new model."""
    later = [name for name in LATER_STAGES if name in recipe]
    if later:
        _go_on(tmp, recipe, later[-1], state_path, fresh)
    else:
        _build_first(tmp, recipe, state_path)


def _go_on(tmp: Path, recipe: dict, name: str, state_path: Path, fresh: bool) -> None:
    """Stage ``name`` of ``recipe`` on the cached model of the recipe without it."""
    previous = _cached_llava(tmp.parent, {k: v for k, v in recipe.items() if k != name}, fresh)
    stage = recipe[name]
    pretrain_tiny_llava(
        previous,
        tmp,
        stage["steps"],
        recipe["batch_size"],
        stage["lr"],
        seed=recipe["seed"],
        image_size=recipe["image_size"],
        corpus=stage["corpus"],
        state_path=state_path,
        stream=LATER_STAGES[name],
    )
    _record_previous_stage(Path(previous), tmp)


def _build_first(tmp: Path, recipe: dict, state_path: Path) -> None:
    """A new model (random weights without pretraining steps), then the vision and language
    stages."""
    seed, size = recipe["seed"], recipe["image_size"]
    if not recipe["pretrain_steps"]:
        build_tiny_llava(tmp, vocabulary(), image_size=size, seed=seed, **WORLD_LLAVA)
        return
    init = tmp.parent / f"{tmp.name}-init"
    _remove(init)
    build_tiny_llava(init, vocabulary(), image_size=size, seed=seed, **WORLD_LLAVA)
    if (vision := recipe.get("vision_stage")) and not state_path.is_file():  # else resumed below
        pretrain_vision_tower(init, vision["steps"], lr=vision["lr"], seed=seed)
    pretrain_tiny_llava(
        init,
        tmp,
        recipe["pretrain_steps"],
        recipe["batch_size"],
        recipe["lr"],
        seed=seed,
        image_size=size,
        corpus=recipe["corpus"],
        state_path=state_path,
        vision_aux=recipe.get("vision_aux", 0.0),
    )
    _remove(init)


def _record_previous_stage(previous: Path, model_dir: Path) -> None:
    """Keep the ``pretraining.json`` of the model a stage went on from inside the new model's,
    under ``"previous_stage"``, so the shipped folder says how every stage trained it."""
    info_file = model_dir / "pretraining.json"
    info = json.loads(info_file.read_text())
    info["previous_stage"] = json.loads((previous / "pretraining.json").read_text())
    info_file.write_text(json.dumps(info, indent=2))


def _build_once(out: Path, build) -> str:
    if out.exists():
        return str(out)
    with locked(out, home_or(out, "paths.foundation_dir")):
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
