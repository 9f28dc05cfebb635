"""Samplers and loaders that make data order a function of (seed, epoch, rank) only.

* Training: one permutation per epoch, seeded with ``seed + epoch``, dealt round-robin to the
  ranks (padded so every rank takes the same number of steps). With ``W`` ranks and per-rank batch
  ``b``, step ``i`` sees exactly the samples a single process with batch ``W * b`` sees at step
  ``i``: the global batch does not depend on the number of processes.
* Evaluation: shards without padding, so no sample is scored twice when metrics are summed over
  ranks (Lightning's own distributed sampler repeats samples to even out the shards).
* :class:`ResumableLoader` records how many batches of the epoch the trainer consumed, in
  Lightning's checkpoints, so a run resumed mid-epoch continues with the next batch instead of
  restarting the epoch.

Both samplers subclass ``DistributedSampler``, so Lightning keeps them instead of injecting its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ShardSampler(DistributedSampler):
    """This rank's share of a per-epoch permutation (``shuffle``) or of the dataset order.

    Args:
        dataset: the dataset to index.
        shuffle: permute with ``seed + epoch`` (Lightning calls ``set_epoch`` every epoch).
        seed: the permutation seed, the same on every rank.
        pad: repeat the first indices so all ranks get equally many (training needs equal step
            counts); without it, rank ``r`` gets indices ``r, r + W, ...`` and nothing twice.
        num_replicas, rank: the process group's by default.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        seed: int = 0,
        pad: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        size, rank = (num_replicas, rank) if num_replicas is not None else world()
        super().__init__(dataset, num_replicas=size, rank=rank, shuffle=shuffle, seed=seed)
        self.pad = pad
        if not pad:
            self.num_samples = len(range(rank, len(dataset), size))
            self.total_size = len(dataset)
        self.skip = 0  # indices to drop at the start of the next iteration (mid-epoch resume)
        self.skip_epoch: int | None = None

    def __iter__(self) -> Iterator[int]:
        if self.pad:
            indices = list(super().__iter__())
        else:
            order = range(len(self.dataset))
            indices = list(order)[self.rank :: self.num_replicas]
        skip = self.skip if self.skip_epoch == self.epoch else 0
        self.skip, self.skip_epoch = 0, None
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ShardSampler` whose position in the epoch is checkpointed.

    Lightning saves ``state_dict()`` with its loop state and calls ``load_state_dict`` before
    iterating again when it resumes; the sampler then skips the batches already trained on.
    Lightning does not fetch ahead from loaders that have a length, so the batches yielded so far
    are the batches trained on (tests/test_resume.py checks the resumed run matches).
    """

    def __init__(self, dataset: Dataset, sampler: ShardSampler, **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._yielded = 0

    def __iter__(self):
        self._yielded = self.sampler.skip // self.batch_size if self._skipping() else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def _skipping(self) -> bool:
        # ``trainer.predict`` rebuilds the loader around a wrapped batch sampler: nothing to skip
        return (
            isinstance(self.sampler, ShardSampler) and self.sampler.skip_epoch == self.sampler.epoch
        )

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches the trainer has consumed."""
        return {"epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the ``batches`` already consumed when ``epoch`` is iterated next."""
        self.sampler.skip = int(state["batches"]) * self.batch_size
        self.sampler.skip_epoch = int(state["epoch"])


class LoaderPosition(L.Callback):
    """Carries the training loader's position through checkpoints, so a resumed fit continues
    mid-epoch with the next batch.

    Lightning restores a stateful loader only if it builds the loader after loading the
    checkpoint; F-LMM's ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``,
    which builds it before. The position therefore travels as this callback's state and is put
    back when training starts (Lightning skips ``on_train_epoch_start`` when it resumes
    mid-epoch), before the first batch is drawn.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _loader(self) -> ResumableLoader | None:
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        return loader if isinstance(loader, ResumableLoader) else None

    def state_dict(self) -> dict[str, int]:
        loader = self._loader()
        return loader.state_dict() if loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._pending = dict(state_dict) or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = self._loader()
        if self._pending is not None and loader is not None:
            loader.load_state_dict(self._pending)
        self._pending = None


def build_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, **kwargs
) -> ResumableLoader:
    """Training (``shuffle``: seeded, padded shards) or evaluation (ordered, unpadded) loader."""
    sampler = ShardSampler(dataset, shuffle=shuffle, seed=seed, pad=shuffle)
    return ResumableLoader(dataset, sampler, batch_size=batch_size, **kwargs)


def gather_records(records: list) -> list:
    """Every rank's records (rank order) under DDP; ``records`` unchanged in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return records
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]
