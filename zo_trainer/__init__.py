"""zo-trainer: forward-only (zeroth-order) pretraining of language models as a drop-in HF Trainer."""

from .config import ZOConfig
from .trainer import ZOTrainer
from .zo import ZOSGD, DirectionSampler, ZOEstimator

__version__ = "0.1.0"
__all__ = ["ZOConfig", "ZOTrainer", "ZOEstimator", "ZOSGD", "DirectionSampler", "__version__"]
