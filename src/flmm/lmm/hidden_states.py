"""The phrase tokens' hidden states of the last decoder layers, kept by forward hooks.

Only the phrase rows are kept (``B x R x D`` per layer), and only in the calling thread's forward:
the hooks sit on modules shared by every thread using the LMM.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def sources(layers: nn.ModuleList, final_norm: nn.Module, count: int) -> list[nn.Module]:
    """The modules whose outputs are HF's ``hidden_states[-count:]``: the last ``count - 1``
    decoder ``layers``, then ``final_norm`` (HF's last hidden state is the normed last layer
    output)."""
    first = len(layers) - count
    return [*layers[first : len(layers) - 1], final_norm]


def hook(rows: torch.Tensor, store: list[torch.Tensor]):
    """Forward hook appending the phrase ``rows`` (``B x R`` positions) of a module's output
    (``B x N x D``) to ``store`` as ``B x R x D``, in the calling thread's forward alone."""
    owner = threading.get_ident()

    def keep(module, args, output):
        if threading.get_ident() != owner:
            return
        states = output[0] if isinstance(output, tuple) else output
        index = rows.to(states.device)[..., None].expand(-1, -1, states.shape[-1])
        store.append(states.gather(1, index).to(rows.device))

    return keep


@contextmanager
def collect(modules: list[nn.Module], rows: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward of ``modules`` appends its ``B x R x D`` phrase rows
    (``rows``: ``B x R`` positions) to the list yielded, in order."""
    store: list[torch.Tensor] = []
    handles = [module.register_forward_hook(hook(rows, store)) for module in modules]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
