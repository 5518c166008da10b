"""zo-trainer: forward-only (zeroth-order) pretraining of language models as a drop-in HF Trainer."""

from .callbacks import BlockFreezeCallback, BlockReinitCallback
from .config import ZOConfig
from .diagnostics import GradientProbeCallback
from .trainer import ZOTrainer
from .zo import ZOSGD, DirectionSampler, ZOEstimator

__version__ = "0.1.0"
__all__ = [
    "BlockFreezeCallback",
    "BlockReinitCallback",
    "DirectionSampler",
    "GradientProbeCallback",
    "ZOConfig",
    "ZOEstimator",
    "ZOSGD",
    "ZOTrainer",
    "__version__",
]
