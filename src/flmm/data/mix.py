"""A weighted mixture of grounding DataModules: the paper's PNG + RefCOCO + RefCOCO+ + RefCOCOg.

Training draws from every component's train split; component ``c`` with weight ``w_c`` gives
``round(w_c * len_c)`` samples per epoch (weight 1: each sample once, as the paper's plain
concatenation; 2: every sample twice; 0.5: a seeded random half, drawn once per run). Validation,
test and evaluation sets are the components' own, one loader / evaluation set each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from flmm.data.datamodule import EvalSet, GroundingDataModule
from flmm.errors import ConfigError
from flmm.types import GroundingSample


class WeightedMixture(Dataset):
    """Samples of several datasets, each repeated or subsampled by its weight (module docstring).

    Args:
        datasets: name -> dataset.
        weights: name -> non-negative weight (missing names weigh 1).
        seed: seeds the subsampled part of fractional weights.
    """

    def __init__(
        self, datasets: Mapping[str, Dataset], weights: Mapping[str, float], seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.datasets = dict(datasets)
        self.index: list[tuple[str, int]] = []
        self.counts: dict[str, int] = {}
        for name, data in self.datasets.items():
            picks = repeat_by_weight(len(data), weights.get(name, 1.0), rng)
            self.index += [(name, int(i)) for i in picks]
            self.counts[name] = len(picks)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> GroundingSample:
        name, j = self.index[i]
        return self.datasets[name][j]


def repeat_by_weight(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``0..n-1``: ``floor(weight)`` full passes plus a random part for the fraction."""
    whole, frac = divmod(float(weight), 1.0)
    extra = rng.choice(n, size=round(frac * n), replace=False) if n else np.zeros(0, int)
    return np.concatenate([np.tile(np.arange(n), int(whole)), np.sort(extra)]).astype(int)


class MixDataModule(GroundingDataModule):
    """Train on a weighted mixture of ``components``; validate and evaluate on each of them.

    Args:
        components: name -> a built :class:`GroundingDataModule` (their own batch sizes and
            loaders are not used: this module's are).
        weights: name -> weight (default 1 each: plain concatenation).
        batch_size, num_workers, seed, max_train_samples: as :class:`GroundingDataModule`;
            ``max_eval_samples`` also applies to every component that sets none itself.
    """

    name = "mix"

    def __init__(
        self,
        components: Mapping[str, GroundingDataModule],
        weights: Mapping[str, float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.components = dict(components)
        self.weights = dict(weights or {})
        unknown = sorted(set(self.weights) - set(self.components))
        negative = sorted(k for k, w in self.weights.items() if w < 0)
        if unknown or negative or not self.components:
            raise ConfigError(
                f"data.weights must give a weight >= 0 to components of {sorted(self.components)}"
                f" (got unknown {unknown}, negative {negative})"
            )
        for component in self.components.values():  # a limit on the mix limits every component
            if component.max_eval_samples is None:
                component.max_eval_samples = self.max_eval_samples
        self.eval_splits = [
            f"{c.name}/{s}" for c in self.components.values() for s in c.eval_splits
        ]

    def prepare_data(self) -> None:
        for component in self.components.values():
            component.prepare_data()

    def prepare_eval(self) -> None:
        for component in self.components.values():
            component.prepare_eval()

    def setup(self, stage: str | None = None) -> None:
        for component in self.components.values():
            component.setup(stage)
        if stage in ("fit", None) and self.train_set is None:
            train = {n: c.train_set for n, c in self.components.items()}
            self.train_set = WeightedMixture(train, self.weights, self.seed)
            if self.max_train_samples is not None:
                self.train_set.index = self.train_set.index[: self.max_train_samples]
        if stage in ("fit", "validate", None):
            self.val_sets = [d for c in self.components.values() for d in c.val_sets]
        if stage in ("test", None):
            self.test_sets = [d for c in self.components.values() for d in c.test_sets]

    def eval_sets(self, protocols: Sequence[str]) -> list[EvalSet]:
        return [s for c in self.components.values() for s in c.eval_sets(protocols)]
