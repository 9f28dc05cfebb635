"""Text prompts for the refiner: phrase-token hidden states mixed over layers and projected."""

from __future__ import annotations

import torch
from torch import nn


class TextPrompt(nn.Module):
    """Softmax-weighted sum of the last ``num_layers`` hidden states, then ``Linear(D, P)``.

    Args:
        hidden_size: the LMM's ``D``.
        num_layers: ``S``, how many layers' hidden states are mixed.
        prompt_dim: ``P``, SAM's prompt embedding size (256 for the released SAMs).
    """

    def __init__(self, hidden_size: int, num_layers: int, prompt_dim: int = 256) -> None:
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))
        self.proj = nn.Linear(hidden_size, prompt_dim)

    def forward(self, hidden: torch.Tensor, layer_dim: int = -2) -> torch.Tensor:
        """Mix ``hidden`` (``S`` layers along ``layer_dim``, ``D`` last) into ``... x P`` prompts.

        With the default ``layer_dim=-2`` the input is ``... x S x D``; for
        ``CaptureOutput.hidden`` (``B x S x R x D``) pass ``layer_dim=1`` to get ``B x R x P``.
        """
        if hidden.shape[layer_dim] != len(self.layer_weights):
            raise ValueError(
                f"hidden states {tuple(hidden.shape)} have {hidden.shape[layer_dim]} entries along "
                f"layer_dim={layer_dim}, expected {len(self.layer_weights)} layers"
            )
        hidden = hidden.movedim(layer_dim, -2)
        weights = self.layer_weights.softmax(dim=0).to(hidden.dtype)
        mixed = (hidden * weights[:, None]).sum(dim=-2)
        return self.proj(mixed.to(self.proj.weight.dtype))
