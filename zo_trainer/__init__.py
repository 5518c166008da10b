"""zo-trainer: forward-only (zeroth-order) pretraining of language models as a drop-in HF Trainer.

Names are imported on first use, so `import zo_trainer.zo` (the engine, plain PyTorch) does not load
transformers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "BlockFreezeCallback": ".callbacks",
    "BlockReinitCallback": ".callbacks",
    "DirectionSampler": ".zo",
    "GradientProbeCallback": ".diagnostics",
    "ZOAdam": ".zo",
    "ZOConfig": ".config",
    "ZOEstimator": ".zo",
    "ZOSeq2SeqTrainer": ".trainer",
    "ZOSGD": ".zo",
    "ZOSign": ".zo",
    "ZOTrainer": ".trainer",
    "find_learning_rate": ".lr_find",
    "zo_config_class": ".config",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zo_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(__all__)
