"""Trainable heads on top of the frozen LMM: the U-Net mask head, text prompts, the SAM refiner."""

from flmm.heads.mask_head import MaskHead
from flmm.heads.sam_build import SAM_VARIANTS, build_sam
from flmm.heads.sam_refiner import SamRefiner
from flmm.heads.text_prompt import TextPrompt

__all__ = ["SAM_VARIANTS", "MaskHead", "SamRefiner", "TextPrompt", "build_sam"]
