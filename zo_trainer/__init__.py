"""zo-trainer: forward-only (zeroth-order) pretraining of language models as a drop-in HF Trainer."""

from .callbacks import BlockFreezeCallback, BlockReinitCallback
from .config import ZOConfig
from .diagnostics import GradientProbeCallback
from .trainer import ZOTrainer
from .lr_find import find_learning_rate
from .zo import ZOSGD, DirectionSampler, ZOAdam, ZOEstimator, ZOSign

__version__ = "0.1.0"
__all__ = [
    "BlockFreezeCallback",
    "BlockReinitCallback",
    "DirectionSampler",
    "GradientProbeCallback",
    "ZOAdam",
    "ZOConfig",
    "ZOEstimator",
    "ZOSGD",
    "ZOSign",
    "ZOTrainer",
    "__version__",
    "find_learning_rate",
]
