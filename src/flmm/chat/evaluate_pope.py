"""`flmm pope [overrides]` (`python -m flmm.chat.evaluate_pope`): POPE object hallucination, plain vs visual CoT.

Loads the frozen LMM, SAM and an F-LMM checkpoint as :class:`flmm.chat.conversation.GroundedChat`, answers
every question of each POPE file plainly and with visual chain of thought (answers appended to
``answers/<file>.<mode>.jsonl`` as they come; a rerun with the same ``output_dir`` resumes), and
writes ``pope_metrics.json`` and ``pope_table.md``. See conf/evaluate_pope.yaml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from flmm.chat.conversation import GroundedChat
from flmm.chat.pope import check_modes, check_settings, evaluate, format_table, read_sets
from flmm.data.synthetic.pope import ensure_pope
from flmm.entry import hydra_entry
from flmm.errors import exit_on_user_error
from flmm.foundation.cache import ensure_tiny_llava, llava_recipe
from flmm.lmm.loading import HOW

log = logging.getLogger(__name__)
# the `_target_` of a tiny LLaVA config node (conf/model/lmm/tiny.yaml)
TINY_LLAVA = f"{ensure_tiny_llava.__module__}.{ensure_tiny_llava.__qualname__}"


def resolve_path(node) -> str:
    """A config value that is a path, or a ``_target_`` node building one (the tiny models)."""
    return str(hydra.utils.instantiate(node) if OmegaConf.is_dict(node) else node)


def build_chat(cfg: DictConfig) -> GroundedChat:
    """:class:`GroundedChat` from ``cfg.model`` (LMM, SAM) and ``cfg.checkpoint``."""
    if not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(
            f"F-LMM checkpoint {cfg.checkpoint!r} not found; pass checkpoint=... (a run's "
            "logs/train/runs/<time>/checkpoints/*.ckpt)"
        )
    return GroundedChat.from_checkpoint(
        resolve_path(cfg.model.lmm.name_or_path),
        cfg.checkpoint,
        resolve_path(cfg.model.sam.checkpoint),
        family=cfg.model.lmm.family,
        sam_variant=cfg.model.sam.variant,
        device=cfg.device,
        lmm_revision=cfg.model.lmm.get("revision"),
        cot_in_turn=cfg.cot_in_turn,
        **{k: cfg.model.lmm[k] for k in ("dtype", *HOW) if k in cfg.model.lmm},
    )


def same_model(settings: dict) -> dict:
    """``settings`` with a tiny LLaVA's config node (``ensure_tiny_llava``'s arguments) replaced
    by the recipe it builds, so a run recorded before a config key with a neutral default was
    added (``steps_scale``) or with another cache folder resumes."""
    lmm = settings.get("lmm") or {}
    node = lmm.get("name_or_path")
    if not isinstance(node, dict) or node.get("_target_") != TINY_LLAVA:
        return settings
    args = {k: v for k, v in node.items() if k not in ("_target_", "cache_dir")}
    return settings | {"lmm": lmm | {"name_or_path": {"tiny_llava_recipe": llava_recipe(**args)}}}


def evaluate_pope(cfg: DictConfig) -> dict:
    """Run the POPE evaluation as configured; returns ``metrics[file][mode]``."""
    if cfg.synthetic_world:
        ensure_pope(cfg.synthetic_world)
    questions = read_sets(cfg.pope_dir, cfg.files, cfg.limit)
    modes = check_modes(cfg.modes)
    out = Path(cfg.paths.output_dir)
    lmm = OmegaConf.to_container(cfg.model.lmm, resolve=True)
    settings = {"checkpoint": str(cfg.checkpoint), "lmm": lmm, "max_new_tokens": cfg.max_new_tokens}
    settings |= {"cot_in_turn": cfg.cot_in_turn}
    check_settings(out, settings, same_model)
    results = evaluate(build_chat(cfg), questions, cfg.image_dir, out, modes, cfg.max_new_tokens)
    table = format_table(results)
    (out / "pope_metrics.json").write_text(json.dumps(results, indent=2))
    (out / "pope_table.md").write_text(table + "\n")
    print(table)
    log.info("POPE metrics written to %s", out / "pope_metrics.json")
    return results


@hydra_entry("evaluate_pope")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(evaluate_pope, cfg)


if __name__ == "__main__":
    main()
