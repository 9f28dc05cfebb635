"""The mask head: a small U-Net that turns per-phrase attention maps into coarse mask logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two ``3x3 conv + GroupNorm(1 group) + ReLU`` layers."""
    layers = []
    for c_in in (in_channels, out_channels):
        layers += [
            nn.Conv2d(c_in, out_channels, 3, padding=1),
            nn.GroupNorm(1, out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class Up(nn.Module):
    """Bilinear x2 upsampling, a 1x1 conv, concatenation with the skip, then a conv block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, 1)
        self.block = conv_block(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x``: ``N x C_in x h x w``; ``skip``: ``N x C_out x 2h x 2w``."""
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.block(torch.cat([skip, self.reduce(x)], dim=1))


class MaskHead(nn.Module):
    """U-Net over word-to-image attention maps (4 stages, 3 max-pool downsamples).

    Args:
        in_channels: attention channels ``C`` (``L*H`` of the frozen LMM).
        base_channels: width of the first stage; stages use 1x, 2x, 4x, 8x of it.
        target_size: maps are upsampled by ``max(1, target_size / max(h, w))`` before the U-Net.
    """

    def __init__(self, in_channels: int, base_channels: int = 64, target_size: int = 64) -> None:
        super().__init__()
        self.base_channels, self.target_size = base_channels, target_size
        widths = [base_channels * 2**i for i in range(4)]
        self.down = nn.ModuleList(
            [conv_block(c_in, c_out) for c_in, c_out in zip([in_channels, *widths], widths)]
        )
        self.up = nn.ModuleList([Up(widths[i + 1], widths[i]) for i in reversed(range(3))])
        self.out = nn.Conv2d(base_channels, 1, 1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h', w')`` of the logits for an ``h x w`` attention grid."""
        scale = max(1.0, self.target_size / max(h, w))
        return round(h * scale), round(w * scale)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Map ``N x C x h x w`` attention to ``N x h' x w'`` mask logits (see ``output_size``)."""
        x = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
        out_h, out_w = self.output_size(*maps.shape[-2:])
        if (out_h, out_w) != tuple(maps.shape[-2:]):
            x = F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, math.ceil(out_w / 8) * 8 - out_w, 0, math.ceil(out_h / 8) * 8 - out_h))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return self.out(x)[:, 0, :out_h, :out_w]
