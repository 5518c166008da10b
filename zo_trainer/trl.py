"""ZO variants of TRL's trainers: ``pip install "zo-trainer[trl]"``.

ZO needs a trainer whose loss is a plain `compute_loss` of the batch (ZOTrainer calls it at each perturbed
weight). In TRL 1.16 that holds for `SFTTrainer` and `RewardTrainer`, shipped here as `ZOSFTTrainer` and
`ZORewardTrainer`. Not for `GRPOTrainer`, `RLOOTrainer` and `DistillationTrainer`, which generate or sample
inside `training_step` / `_prepare_inputs`; `DPOTrainer` and `KTOTrainer` also run the reference model inside
`compute_loss`, so each probe would repeat it (untested).

What their `compute_loss` logs counts once per batch: `num_tokens` as in a backprop run; `mean_token_accuracy`,
`entropy` (SFT) and the rewards, accuracy and margin (reward) are those of the first probe forward: the
unperturbed model with zo_estimator='forward' or zo_step_rule='newton', else θ + ε·z_1 (see
`ZOTrainer.recorded_once_per_batch`); with zo_parallel='query' too, where every process holds the global batch.
"""

try:
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
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


ZORewardConfig = zo_config_class(RewardConfig)


class ZORewardTrainer(ZOTrainer, RewardTrainer):
    """TRL's `RewardTrainer` (a Bradley-Terry loss on chosen/rejected pairs) with ZO steps; takes a `RewardConfig`
    or a `ZORewardConfig`."""

    args_class = RewardConfig
