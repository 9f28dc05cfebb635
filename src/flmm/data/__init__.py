"""Datasets and datamodules: the ``refer`` layout (RefCOCO family) and the synthetic world."""

from flmm.data.datamodule import ReferDataModule
from flmm.data.masks import mask_to_rle, segmentation_to_mask
from flmm.data.refer import ReferAnnotations, ReferDataset, join_sentences, load_refer

__all__ = [
    "ReferAnnotations",
    "ReferDataModule",
    "ReferDataset",
    "join_sentences",
    "load_refer",
    "mask_to_rle",
    "segmentation_to_mask",
]
