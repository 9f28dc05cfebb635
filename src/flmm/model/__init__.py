"""The F-LMM model: the computation (:class:`FLMMModel`: frozen LMM + attention capture + mask
head + SAM refiner), the LightningModule training it (:class:`FLMM`), the predictor grounding
with it (:class:`FLMMPredictor`), the one loader of trained models (:func:`load`), its losses,
metrics, checkpoints and released reference heads.

``from flmm.model import load, FLMMPredictor`` (loaded on first use, so importing a submodule
stays light).
"""

_HOMES = {
    "FLMM": "module",
    "FLMMModel": "network",
    "Predictions": "network",
    "FLMMPredictor": "predictor",
    "Grounding": "predictor",
    "load": "loader",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f"flmm.model.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'flmm.model' has no attribute {name!r}")
