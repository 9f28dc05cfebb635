"""The SAM refiner: coarse mask logits + box + text prompts -> refined logits at image resolution.

Coordinate frames: the *original* frame is the image's ``H x W``; the *input* frame is the image
resized so its longest side is ``sam.image_encoder.img_size`` (``input_size = (h_in, w_in)``) and
padded bottom/right to a square; the *mask-input* frame is SAM's dense-prompt grid, 4x the image
embedding grid (256 x 256 for the released SAMs), covering the padded square.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

PAD_MASK_LOGIT = -20.0  # dense-prompt logit for the padding outside the image (sigmoid ~ 2e-9)


def preprocess_image(sam: Sam, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize an ``H x W x 3`` uint8 image to SAM's input frame, normalise and pad it.

    Returns the ``3 x S x S`` input (``S = img_size``) and ``input_size = (h_in, w_in)``.
    """
    # segment_anything's ResizeLongestSide.apply_image_torch takes the size from image.shape[0]
    # and image.shape[1], i.e. batch and channels of the BCHW tensor it expects (a bug), so the
    # target size is computed here from the image's own H and W.
    height, width = image.shape[:2]
    input_size = ResizeLongestSide.get_preprocess_shape(height, width, sam.image_encoder.img_size)
    x = image.to(sam.pixel_mean.device).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, input_size, mode="bilinear", align_corners=False, antialias=True)
    return sam.preprocess(x)[0], input_size


def boxes_from_masks(masks: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """Tight ``K x 4`` xyxy boxes of ``K x h x w`` bool masks, in the ``input_size`` frame.

    The mask grid is taken to cover the whole input frame; an empty mask gives the whole frame.
    """
    k, h, w = masks.shape
    scale = masks.new_tensor([input_size[1] / w, input_size[0] / h] * 2, dtype=torch.float)
    boxes = masks.new_tensor([[0, 0, w, h]], dtype=torch.float).repeat(k, 1)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):
            boxes[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    return boxes * scale


def coarse_boxes(logits: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """Box prompts of ``K x h x w`` coarse logits over the image: probabilities resized
    (bilinear) to the ``input_size`` frame, ``> 0.5``, tight boxes (as the reference does)."""
    probs = F.interpolate(
        logits.detach()[:, None].float().sigmoid(), input_size, mode="bilinear", align_corners=False
    )
    return boxes_from_masks(probs[:, 0] > 0.5, input_size)


def mask_prompt(sam: Sam, logits: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """Place ``K x h x w`` logits over the image into SAM's ``K x 1 x M x M`` mask-input frame.

    The logits are resized onto the image's part of the frame; the padding gets ``PAD_MASK_LOGIT``.
    """
    frame_h, frame_w = sam.prompt_encoder.mask_input_size
    img_size = sam.image_encoder.img_size
    region = (round(input_size[0] * frame_h / img_size), round(input_size[1] * frame_w / img_size))
    x = F.interpolate(logits[:, None].float(), region, mode="bilinear", align_corners=False)
    return F.pad(x, (0, frame_w - region[1], 0, frame_h - region[0]), value=PAD_MASK_LOGIT)


class SamRefiner(nn.Module):
    """SAM with a frozen image encoder and a trainable prompt encoder and mask decoder.

    Embed images once with ``embed_images``; ``forward`` refines all phrases of a batch.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam
        self.sam.image_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> SamRefiner:
        super().train(mode)
        self.sam.image_encoder.eval()
        return self

    @torch.no_grad()
    def embed_images(
        self, images: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Encode ``B`` images (``H x W x 3`` uint8) with the frozen encoder.

        Returns ``B x C x he x we`` embeddings and the ``B`` input sizes ``(h_in, w_in)``.
        """
        inputs, input_sizes = zip(*(preprocess_image(self.sam, image) for image in images))
        return self.sam.image_encoder(torch.stack(inputs)), list(input_sizes)

    def forward(
        self,
        embeddings: torch.Tensor,
        coarse_logits: list[torch.Tensor],
        text_embeds: list[list[torch.Tensor]],
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[torch.Tensor]:
        """Refine every phrase of a batch of ``B`` images.

        Args:
            embeddings: ``B x C x he x we`` from ``embed_images``.
            coarse_logits: ``B`` tensors ``K_b x h_b x w_b``, mask-head logits over each image
                region (gradient flows through them).
            text_embeds: per image, ``K_b`` tensors ``T_k x P`` of text prompts (``P`` = SAM's
                prompt dim).
            input_sizes: ``(h_in, w_in)`` of each image in SAM's input frame.
            original_sizes: ``(H, W)`` of each image.

        Returns:
            ``B`` tensors ``K_b x H_b x W_b`` of refined logits.
        """
        counts = [len(c) for c in coarse_logits]
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        masks = torch.cat([mask_prompt(self.sam, c, s) for c, s in zip(coarse_logits, input_sizes)])
        boxes = torch.cat([coarse_boxes(c, s) for c, s in zip(coarse_logits, input_sizes)])
        texts = [t for per_image in text_embeds for t in per_image]
        groups = defaultdict(list)
        for k, embeds in enumerate(texts):
            groups[len(embeds)].append(k)
        order, outputs = [], []
        for ks in groups.values():
            text = torch.stack([texts[k] for k in ks])
            outputs.append(self.decode(embeddings[owner[ks]], boxes[ks], masks[ks], text))
            order += ks
        low_res = torch.cat(outputs)[torch.argsort(torch.tensor(order))] if order else masks
        return [
            self.sam.postprocess_masks(m, s, o)[:, 0]
            for m, s, o in zip(low_res.split(counts), input_sizes, original_sizes)
        ]

    def decode(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        text: torch.Tensor,
    ) -> torch.Tensor:
        """SAM's prompt encoder + mask decoder for ``G`` prompts with ``T`` text tokens each.

        ``image_embeddings``: ``G x C x he x we``, the embedding of each prompt's image;
        ``boxes``: ``G x 4``; ``masks``: ``G x 1 x M x M``; ``text``: ``G x T x P``.
        Returns ``G x 1 x M x M`` low-resolution logits.
        """
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=masks)
        sparse = torch.cat([sparse, text.to(sparse.dtype)], dim=1)
        # SAM's decoder adds each dense prompt to ONE image embedding repeated per prompt. Folding
        # every prompt's own image embedding into its dense prompt (and passing zeros as the shared
        # one) is the same sum, and lets one call serve prompts from many images.
        logits, _ = self.sam.mask_decoder(
            image_embeddings=torch.zeros_like(image_embeddings[:1]),
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense + image_embeddings,
            multimask_output=False,
        )
        return logits
