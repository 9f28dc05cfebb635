"""``trainer=fsdp``: DDP for the trainable heads with the frozen LMM's decoder sharded (FSDP2)."""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from flmm.errors import ConfigError

log = logging.getLogger(__name__)


class ShardedLMMStrategy(DDPStrategy):
    """DDP for the trainable heads, with the frozen LMM's decoder sharded over the ranks (FSDP2).

    Before anything moves to the device, every decoder layer of the frozen LMM (the bulk of its
    weights) is ``fully_shard``-ed over all ranks, so each device holds ``1/W`` of them and
    gathers one layer at a time in the forward pass. Each layer is its own FSDP root, so code that
    calls parts of the model directly (``generate`` runs the vision tower on its own) keeps
    working; the embeddings, vision tower and projector stay whole on every device. The
    trainable part (mask head, text prompt, SAM) stays replicated and DDP averages its gradients;
    DDP is told to ignore the LMM's parameters, which never get a gradient. For LMMs that do not
    fit one device (``trainer=fsdp``); the training math is the same as ``trainer=ddp``.
    """

    strategy_name = "ddp_sharded_lmm"

    def model_to_device(self) -> None:
        """Shard the frozen LMM (once), then move the rest of the module to the device."""
        module = self.lightning_module
        frozen = module.model.lmm
        if frozen.quantization or frozen.placed:
            raise ConfigError(
                "trainer=fsdp shards the frozen LMM's full-precision layers itself; it cannot "
                "shard a quantized LMM or one placed by device_map: set model.lmm.quantization="
                "null and model.lmm.device_map=null, or train the quantized LMM on one device (trainer=gpu)"
            )
        lmm = frozen.model
        if not getattr(lmm, "_flmm_sharded", False):
            mesh = init_device_mesh(self.root_device.type, (self.world_size,))
            for layer in frozen.layers:
                fully_shard(layer, mesh=mesh)
            lmm._flmm_sharded = True
            sharded = sum(p.numel() for layer in frozen.layers for p in layer.parameters())
            total = sum(p.numel() for p in lmm.parameters())
            log.info(
                "frozen LMM: %d decoder layers sharded over %d ranks (%s of %s parameters)",
                len(frozen.layers),
                self.world_size,
                f"{sharded:,}",
                f"{total:,}",
            )
        prefix = next(n for n, m in module.named_modules() if m is lmm)
        ignored = {f"{prefix}.{name}" for name, _ in lmm.named_parameters()}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
        super().model_to_device()
