"""Datasets and datamodules: the ``refer`` layout (RefCOCO family), Panoptic Narrative Grounding,
their weighted mixture, and the synthetic world."""

from flmm.data.datamodule import EvalSet, GroundingDataModule, ReferDataModule
from flmm.data.masks import mask_to_rle, segmentation_to_mask
from flmm.data.mix import MixDataModule
from flmm.data.png import PNGDataModule, PNGDataset, load_png
from flmm.data.refer import ReferAnnotations, ReferDataset, join_sentences, load_refer

__all__ = [
    "EvalSet",
    "GroundingDataModule",
    "MixDataModule",
    "PNGDataModule",
    "PNGDataset",
    "ReferAnnotations",
    "ReferDataModule",
    "ReferDataset",
    "join_sentences",
    "load_png",
    "load_refer",
    "mask_to_rle",
    "segmentation_to_mask",
]
