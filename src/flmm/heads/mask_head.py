"""The mask head: a small U-Net that turns per-phrase attention maps into coarse mask logits.

The module tree mirrors the head the reference implementation trains (mmseg's ``UNet`` with
GroupNorm(1 group), ``InterpConv`` up-sampling and a ``conv_seg`` output conv), so its state-dict
keys are the reference's: ``encoder.0.0.convs.0.conv.weight``, ``encoder.1.0`` (max-pool),
``decoder.0.upsample.interp_upsample.1.gn.weight``, ``decoder.0.conv_block.convs.1.conv.weight``,
``conv_seg.weight``. Initialisation follows mmseg's UNet default: Kaiming normal (fan_out, ReLU)
with zero bias on every conv, GroupNorm weight 1 and bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvGN(nn.Module):
    """``k x k`` conv without bias (a norm follows), GroupNorm(1 group), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.gn = nn.GroupNorm(1, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(self.conv(x)), inplace=True)


class ConvBlock(nn.Module):
    """Two ``3x3 ConvGN`` layers (mmseg's ``BasicConvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[
                ConvGN(in_channels if i == 0 else out_channels, out_channels, 3)
                for i in range(num_convs)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class InterpConv(nn.Module):
    """Bilinear x2 up-sampling, then a ``1x1 ConvGN`` (mmseg's ``InterpConv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.interp_upsample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
            ConvGN(in_channels, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interp_upsample(x)


class UpBlock(nn.Module):
    """Up-sample the deeper features to the skip's width, concatenate ``[skip, up]``, convolve."""

    def __init__(self, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.upsample = InterpConv(in_channels, skip_channels)
        self.conv_block = ConvBlock(2 * skip_channels, skip_channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``skip``: ``N x C_skip x 2h x 2w``; ``x``: ``N x C_in x h x w``."""
        return self.conv_block(torch.cat([skip, self.upsample(x)], dim=1))


def init_like_mmseg(module: nn.Module) -> None:
    """Kaiming normal (fan_out, ReLU) and zero bias on every conv; GroupNorm to 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskHead(nn.Module):
    """U-Net over word-to-image attention maps (4 stages, 3 max-pool downsamples).

    Args:
        in_channels: attention channels ``C`` (``L*H`` of the frozen LMM).
        base_channels: width of the first stage; stages use 1x, 2x, 4x, 8x of it.
        target_size: maps are upsampled by ``max(1, target_size / max(h, w))`` before the U-Net.
    """

    num_stages = 4

    def __init__(self, in_channels: int, base_channels: int = 64, target_size: int = 64) -> None:
        super().__init__()
        self.in_channels, self.base_channels, self.target_size = (
            in_channels,
            base_channels,
            target_size,
        )
        widths = [base_channels * 2**i for i in range(self.num_stages)]
        self.encoder = nn.ModuleList([nn.Sequential(ConvBlock(in_channels, widths[0]))])
        self.encoder.extend(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[i - 1], widths[i]))
            for i in range(1, self.num_stages)
        )
        self.decoder = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i]) for i in range(self.num_stages - 1)
        )
        self.conv_seg = nn.Conv2d(base_channels, 1, 1)
        init_like_mmseg(self)

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
        multiple = 2 ** (self.num_stages - 1)
        x = F.pad(
            x,
            (
                0,
                math.ceil(out_w / multiple) * multiple - out_w,
                0,
                math.ceil(out_h / multiple) * multiple - out_h,
            ),
        )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
        return self.conv_seg(x)[:, 0, :out_h, :out_w]
