"""The identity of a frozen module's weights: what the frozen check and the feature cache compare."""

from __future__ import annotations

import hashlib

import torch


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's bytes, in state-dict order (of this rank's
    shards where the LMM is sharded)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of ``tensor``: this rank's shard of a sharded one, the stored parts (int8
    values, scales) of a quantized tensor subclass, the element of a 0-d one."""
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
        tensor, "__tensor_flatten__"
    ):
        names, _ = tensor.__tensor_flatten__()
        return b"".join(tensor_bytes(getattr(tensor, n)) for n in names)
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).cpu().numpy().tobytes()
