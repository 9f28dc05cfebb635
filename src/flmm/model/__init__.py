"""The F-LMM model: the LightningModule (frozen LMM + attention capture + mask head + SAM
refiner), its losses and metrics, its checkpoints, and released reference heads.

``from flmm.model import FLMM`` (loaded on first use, so importing a submodule stays light).
"""

__all__ = ["FLMM", "Grounding", "Predictions"]


def __getattr__(name: str):
    if name in __all__:
        from flmm.model import module

        return getattr(module, name)
    raise AttributeError(f"module 'flmm.model' has no attribute {name!r}")
