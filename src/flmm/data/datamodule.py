"""LightningDataModules over grounding datasets: train, validation, test and evaluation splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset

from flmm.data.distributed import build_loader
from flmm.data.refer import ReferAnnotations, ReferDataset, check_refer_layout, load_refer
from flmm.types import GroundingBatch


def _as_list(splits: str | Sequence[str] | None) -> list[str]:
    if splits is None:
        return []
    return [splits] if isinstance(splits, str) else list(splits)


@dataclass
class EvalSet:
    """One split of one dataset under one evaluation protocol (what ``flmm.evaluate`` scores)."""

    dataset_name: str
    split: str
    protocol: str
    data: Dataset

    @property
    def skipped(self) -> Counter:
        """Records the reader skipped (reason -> count), e.g. refs whose sentences are all empty."""
        base = self.data.dataset if isinstance(self.data, Subset) else self.data
        return Counter(getattr(base, "skipped", {}))


class GroundingDataModule(L.LightningDataModule):
    """What every grounding DataModule shares: splits, protocols, sample limits and loaders.

    Subclasses implement :meth:`make_dataset` (one split under one protocol) and ``prepare_data``
    (fail fast when files are missing). Batches are :class:`~flmm.types.GroundingBatch` es; under
    DDP the loaders shard by rank (:mod:`flmm.data.distributed`: seeded per epoch, resumable
    mid-epoch, evaluation shards unpadded). ``val_split`` / ``test_split``
    may list several splits, giving one loader each; ``eval_splits`` are the splits
    ``flmm.evaluate`` scores (default: the test splits).

    Args:
        val_protocol / test_protocol: an evaluation protocol of :attr:`eval_protocols`;
            ``test_protocol`` defaults to ``val_protocol``.
        max_train_samples / max_eval_samples: keep only the first samples of each split.
        max_phrases: at most this many phrases per sample (images with more give several).
        cache_dir: folder of the frozen-feature cache (:mod:`flmm.model.feature_cache`); None: off.
    """

    name = "grounding"
    eval_protocols: tuple[str, ...] = ("reference", "per_sentence")

    def __init__(
        self,
        train_split: str = "train",
        val_split: str | Sequence[str] = "val",
        test_split: str | Sequence[str] = "test",
        eval_splits: str | Sequence[str] | None = None,
        val_protocol: str = "reference",
        test_protocol: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_phrases: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.cache_dir = cache_dir  # frozen-feature cache; flmm.train passes it to the model
        self.train_split = train_split
        self.val_splits, self.test_splits = _as_list(val_split), _as_list(test_split)
        self.eval_splits = _as_list(eval_splits) or list(self.test_splits)
        self.val_protocol, self.test_protocol = val_protocol, test_protocol or val_protocol
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.max_phrases = max_phrases
        self.train_set: Dataset | None = None
        self.val_sets: list[Dataset] = []
        self.test_sets: list[Dataset] = []

    def prepare_eval(self) -> None:
        """Check the files :meth:`eval_sets` reads (default: those ``prepare_data`` checks)."""
        self.prepare_data()

    def make_dataset(self, split: str, protocol: str) -> Dataset:
        """The samples of ``split`` under ``protocol`` (``train`` or an evaluation protocol)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_dataset")

    def _split(self, split: str, protocol: str, limit: int | None) -> Dataset:
        data = self.make_dataset(split, protocol)
        return data if limit is None else Subset(data, range(min(limit, len(data))))

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._split(self.train_split, "train", self.max_train_samples)
        if stage in ("fit", "validate", None) and not self.val_sets:
            self.val_sets = [
                self._split(s, self.val_protocol, self.max_eval_samples) for s in self.val_splits
            ]
        if stage in ("test", None) and not self.test_sets:
            self.test_sets = [
                self._split(s, self.test_protocol, self.max_eval_samples) for s in self.test_splits
            ]

    def eval_sets(self, protocols: Sequence[str]) -> list[EvalSet]:
        """Every evaluation split under each of ``protocols`` this dataset defines, in order."""
        return [
            EvalSet(self.name, split, protocol, self._split(split, protocol, self.max_eval_samples))
            for split in self.eval_splits
            for protocol in protocols
            if protocol in self.eval_protocols
        ]

    def loader(self, data: Dataset, shuffle: bool = False) -> DataLoader:
        """A loader of ``GroundingBatch`` es over ``data`` with this module's batch size."""
        return build_loader(
            data,
            self.batch_size,
            shuffle,
            self.seed,
            num_workers=self.num_workers,
            collate_fn=GroundingBatch.collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self.loader(d) for d in self.val_sets]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self.loader(d) for d in self.test_sets]
        return loaders[0] if len(loaders) == 1 else loaders


class ReferDataModule(GroundingDataModule):
    """Splits of one ``refer``-layout ``<dataset>/refs(<split_by>)`` pair (RefCOCO, +, g).

    ``prepare_data`` checks the files exist; a subclass may generate the data there first (see
    ``flmm.data.synthetic.SyntheticDataModule``).

    Args:
        root: folder holding ``<dataset>/instances.json`` and ``<dataset>/refs(<split_by>).p``.
        image_dir: folder of the images.
        val_protocol: ``reference`` (F-LMM: first sentence, all objects of an image together)
            or ``per_sentence`` (LISA-style); ``test_protocol`` defaults to it.
        **kwargs: splits, batch size, limits: see :class:`GroundingDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str | Path,
        dataset: str = "refcoco",
        split_by: str = "unc",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.image_dir = Path(root), Path(image_dir)
        self.dataset, self.split_by = dataset, split_by
        self.name = dataset
        self._annotations: ReferAnnotations | None = None

    def prepare_data(self) -> None:
        """Fail fast, before any model loads, when annotation files or the image folder are missing."""
        check_refer_layout(self.root, self.dataset, self.split_by)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} does not exist; point `paths.coco_train2014=...` "
                "(or `data.image_dir=...`) at the folder holding the images named in instances.json"
            )

    def make_dataset(self, split: str, protocol: str) -> ReferDataset:
        if self._annotations is None:
            self._annotations = load_refer(self.root, self.dataset, self.split_by)
        return ReferDataset(
            self.root,
            self.image_dir,
            self.dataset,
            self.split_by,
            split,
            protocol,
            seed=self.seed,
            max_phrases=self.max_phrases,
            annotations=self._annotations,
        )
