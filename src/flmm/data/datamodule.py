"""LightningDataModule over ``refer``-layout datasets: train, validation and test splits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset

from flmm.data.refer import ReferAnnotations, ReferDataset, check_refer_layout, load_refer
from flmm.types import GroundingBatch


class ReferDataModule(L.LightningDataModule):
    """Train / val / test :class:`ReferDataset` s of one ``<dataset>/refs(<split_by>)`` pair.

    Batches are :class:`~flmm.types.GroundingBatch` es. Under DDP, Lightning wraps the loaders
    with its distributed sampler. ``val_split`` / ``test_split`` may list several splits (e.g.
    ``[val, testA, testB]``), giving one loader each. ``prepare_data`` checks the files exist; a
    subclass may generate the data there first (see ``flmm.data.synthetic.SyntheticDataModule``).

    Args:
        root: folder holding ``<dataset>/instances.json`` and ``<dataset>/refs(<split_by>).p``.
        image_dir: folder of the images.
        val_protocol: ``reference`` (F-LMM: first sentence, all objects of an image together)
            or ``per_sentence`` (LISA-style); ``test_protocol`` defaults to it.
        max_train_samples / max_eval_samples: keep only the first samples of each split.
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str | Path,
        dataset: str = "refcoco",
        split_by: str = "unc",
        train_split: str = "train",
        val_split: str | Sequence[str] = "val",
        test_split: str | Sequence[str] = "test",
        val_protocol: str = "reference",
        test_protocol: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_phrases: int | None = None,
    ) -> None:
        super().__init__()
        self.root, self.image_dir = Path(root), Path(image_dir)
        self.dataset, self.split_by = dataset, split_by
        self.train_split = train_split
        self.val_splits = [val_split] if isinstance(val_split, str) else list(val_split)
        self.test_splits = [test_split] if isinstance(test_split, str) else list(test_split)
        self.val_protocol, self.test_protocol = val_protocol, test_protocol or val_protocol
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.max_phrases = max_phrases
        self._annotations: ReferAnnotations | None = None
        self.train_set: Dataset | None = None
        self.val_sets: list[Dataset] = []
        self.test_sets: list[Dataset] = []

    def prepare_data(self) -> None:
        """Fail fast, before any model loads, when annotation files or the image folder are missing."""
        check_refer_layout(self.root, self.dataset, self.split_by)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} does not exist; point `paths.coco_train2014=...` "
                "(or `data.image_dir=...`) at the folder holding the images named in instances.json"
            )

    def _split(self, split: str, protocol: str, limit: int | None) -> Dataset:
        if self._annotations is None:
            self._annotations = load_refer(self.root, self.dataset, self.split_by)
        data = ReferDataset(
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

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=GroundingBatch.collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(d, shuffle=False) for d in self.val_sets]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(d, shuffle=False) for d in self.test_sets]
        return loaders[0] if len(loaders) == 1 else loaders
