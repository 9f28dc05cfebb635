"""Checks of a composed run config's numbers (batch size, workers, epochs, limits, learning rate),
made before anything is built: a wrong value is one :class:`ConfigError` naming the key, the
value and one that works, not a ``ValueError`` from a DataLoader after the models have loaded."""

from __future__ import annotations

import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from flmm.errors import ConfigError


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


# what a value must be: (description, test)
POSITIVE_INT = ("a positive integer", lambda v: _int(v) and v >= 1)
COUNT = ("an integer >= 0", lambda v: _int(v) and v >= 0)
NO_LIMIT = ("an integer >= -1 (-1: no limit)", lambda v: _int(v) and v >= -1)
POSITIVE = ("a positive number", lambda v: _number(v) and v > 0)
NON_NEGATIVE = ("a number >= 0", lambda v: _number(v) and v >= 0)
FRACTION = ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
BATCHES = (
    "an integer >= 0 (batches) or a fraction in [0.0, 1.0]",
    lambda v: (_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
)

# key -> (rule, a value to suggest, whether null is allowed); keys a config lacks are skipped
SETTINGS: dict[str, tuple[tuple[str, Callable], str, bool]] = {
    "data.batch_size": (POSITIVE_INT, "8", False),
    "data.num_workers": (COUNT, "4", False),
    "data.max_train_samples": (POSITIVE_INT, "1000", True),
    "data.max_eval_samples": (POSITIVE_INT, "1000", True),
    "data.max_phrases": (POSITIVE_INT, "8", True),
    "data.n_train": (POSITIVE_INT, "700", False),
    "data.n_val": (COUNT, "200", False),
    "data.n_test": (COUNT, "400", False),
    "data.image_size": (POSITIVE_INT, "96", False),
    "trainer.max_epochs": (NO_LIMIT, "8", True),
    "trainer.min_epochs": (COUNT, "1", True),
    "trainer.max_steps": (NO_LIMIT, "-1", True),
    "trainer.limit_train_batches": (BATCHES, "100", True),
    "trainer.limit_val_batches": (BATCHES, "1.0", True),
    "trainer.limit_test_batches": (BATCHES, "1.0", True),
    "trainer.accumulate_grad_batches": (POSITIVE_INT, "1", False),
    "trainer.log_every_n_steps": (POSITIVE_INT, "10", True),
    "trainer.check_val_every_n_epoch": (POSITIVE_INT, "1", True),
    "trainer.num_sanity_val_steps": (NO_LIMIT, "0", True),
    "trainer.gradient_clip_val": (NON_NEGATIVE, "1.0", True),
    "model.lr": (POSITIVE, "1e-4", False),
    "model.weight_decay": (NON_NEGATIVE, "0.01", False),
    "model.warmup_ratio": (FRACTION, "0.03", False),
}


def check_numbers(cfg: DictConfig) -> None:
    """A :class:`ConfigError` for the first key of :data:`SETTINGS` whose value ``cfg`` gives
    wrong, e.g. ``data.batch_size must be a positive integer, got -1 (set data.batch_size=8)``."""
    for key, ((description, valid), example, nullable) in SETTINGS.items():
        missing = object()
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing or (value is None and nullable) or valid(value):
            continue
        raise ConfigError(f"{key} must be {description}, got {value!r} (set {key}={example})")
