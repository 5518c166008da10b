"""ZO variants of TRL's trainers: ``pip install "zo-trainer[trl]"``.

ZO needs a trainer whose loss is a plain `compute_loss` of the batch (ZOTrainer calls it at each perturbed
weight). In TRL 1.16 that holds for `SFTTrainer` (shipped here as `ZOSFTTrainer`) and `RewardTrainer`
(``class ZORewardTrainer(ZOTrainer, RewardTrainer)`` with ``args_class = RewardConfig``, untested). Not for
`GRPOTrainer`, `RLOOTrainer` and `DistillationTrainer`, which generate or sample inside `training_step` /
`_prepare_inputs`; `DPOTrainer` and `KTOTrainer` also run the reference model inside `compute_loss`, so each
probe would repeat it (untested).

What `SFTTrainer.compute_loss` logs counts once per batch: `num_tokens` as in a backprop run,
`mean_token_accuracy` and `entropy` of the first probe forward (see `ZOTrainer.recorded_once_per_batch`).
"""

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:
    raise ImportError(
        f"zo_trainer.trl needs TRL ({error}): pip install 'zo-trainer[trl]' (or pip install trl)"
    ) from error

from .config import zo_config_class
from .trainer import ZOTrainer

ZOSFTConfig = zo_config_class(SFTConfig)


class ZOSFTTrainer(ZOTrainer, SFTTrainer):
    """TRL's `SFTTrainer` with ZO steps; takes an `SFTConfig` (ZO settings at their defaults) or a `ZOSFTConfig`."""

    args_class = SFTConfig
