"""ZOConfig: TrainingArguments plus the zeroth-order settings (every existing field keeps its meaning)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import typing
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .zo import DISTRIBUTIONS, ESTIMATORS, REDUCTIONS, STEP_RULES, ZOAdam, ZOEstimator, ZOHiZOO, ZOSGD, ZOSign

TRAINING_ORDERS = ("zo", "fo")
ZO_PARALLEL_MODES = ("data", "query")
ZO_OPTIMIZERS = {"sgd": ZOSGD, "adam": ZOAdam, "sign": ZOSign, "hizoo": ZOHiZOO}
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger(__name__)


@dataclass
class ZOConfig(TrainingArguments):
    r"""[`~transformers.TrainingArguments`] for [`ZOTrainer`].

    The ZO step estimates the gradient with SPSA from forward passes only:
    ``g = c · Σ_k (L(θ + ε z_k) − L(θ − ε z_k)) / (2ε) · z_k`` with ``c = 1/q`` (mean) or 1 (sum), then
    applies ``θ ← θ − lr · (g + weight_decay · θ)`` (ZO-SGD; the `lr_scheduler_type` drives lr).
    """

    training_order: str = field(
        default="zo",
        metadata={
            "help": "How the trainable parameters learn: 'zo' (forward-only SPSA) or 'fo' (plain backprop through "
            "the same trainer, for baselines).",
            "choices": list(TRAINING_ORDERS),
        },
    )
    zo_eps: float = field(
        default=1e-3, metadata={"help": "Perturbation scale ε of the probes (the paper uses 1e-4, MeZO 1e-3)."}
    )
    zo_num_queries: int = field(
        default=1, metadata={"help": "Query budget q: directions per step (2q forwards with the central estimator)."}
    )
    zo_query_reduction: str = field(
        default="mean",
        metadata={
            "help": "How the q directional estimates combine: 'mean' (MeZO and most peers) or 'sum' (the paper's "
            "formula: the step grows with q).",
            "choices": list(REDUCTIONS),
        },
    )
    zo_estimator: str = field(
        default="central",
        metadata={
            "help": "'central': (L(θ+εz) − L(θ−εz)) / 2ε, 2q forwards; 'forward': (L(θ+εz) − L(θ)) / ε, q+1 forwards.",
            "choices": list(ESTIMATORS),
        },
    )
    zo_distribution: str = field(
        default="gaussian",
        metadata={
            "help": "Directions: 'gaussian', 'rademacher' (entries of mean 0, variance 1; ±1 entries are the cheapest to "
            "draw), or 'lowrank' (SubZero: z = sqrt(mn)/r · U S Vᵀ for each m×n "
            "matrix, Gaussian for the other parameters).",
            "choices": list(DISTRIBUTIONS),
        },
    )
    zo_lowrank_rank: int = field(default=4, metadata={"help": "Rank r of the 'lowrank' (SubZero) directions."})
    zo_lowrank_refresh_steps: int = field(
        default=100, metadata={"help": "Steps between two draws of the 'lowrank' bases U, V (SubZero's lazy update)."}
    )
    zo_correlation: float = field(
        default=0.0,
        metadata={
            "help": "α in (−1, 1) of the paper's Algorithm 1: z_k = α z_{k−1} + sqrt(1−α²) w_k, so consecutive "
            "directions have correlation α (0 = independent; negative values reduce the variance)."
        },
    )
    zo_seed: int | None = field(
        default=None,
        metadata={"help": "Base seed of the directions (derived per step, query and parameter). Default: `seed`."},
    )
    zo_optimizer: str = field(
        default="sgd",
        metadata={
            "help": "The ZO update: 'sgd' (in place; with zo_momentum, a momentum buffer or, with zo_momentum_history, "
            "a momentum rebuilt from the last K seeds at no memory), 'adam' (AdamW on the ZO estimate, with "
            "adam_beta1/adam_beta2/adam_epsilon: two parameter-sized buffers), 'sign' (sign-ZO, of the momentum "
            "where zo_momentum > 0) or 'hizoo' (HiZOO: ZO-SGD along directions and steps scaled by a diagonal Hessian "
            "estimate, one parameter-sized buffer and one more forward per step; see zo_hessian_smooth). `optim` is "
            "not used unless zo_write_grad=True.",
            "choices": list(ZO_OPTIMIZERS),
        },
    )
    zo_step_rule: str = field(
        default="gradient",
        metadata={
            "help": "How the probes weigh each direction: 'gradient' (SPSA), 'newton' (the paper's Theorem 1 along "
            "each direction: the exact line-search step of the quadratic fitted to L0, L+ and L−, one more forward "
            "per step; learning_rate is then the fraction of that step), 'normalized' (projected gradients divided "
            "by their running RMS, so the step does not depend on the scale of the loss) or 'spread' (FZOO's: divided by "
            "the standard deviation of the step's perturbed losses, over ε; zo_num_queries >= 2).",
            "choices": list(STEP_RULES),
        },
    )
    zo_momentum: float = field(
        default=0.0, metadata={"help": "Momentum β of zo_optimizer 'sgd' (m = β·m + g) and 'sign' (Signum). 0 = none."}
    )
    zo_momentum_history: int = field(
        default=0,
        metadata={
            "help": "With zo_momentum > 0 and zo_optimizer 'sgd': rebuild the momentum from the last K steps' seeds "
            "(K direction draws per step, no buffer) instead of keeping a parameter-sized buffer. 0 = a buffer."
        },
    )
    zo_state_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the ZO optimizer's buffers (momentum, Adam moments): 'float32', 'bfloat16' or "
            "'float16'. Default: each parameter's dtype.",
            "choices": list(STATE_DTYPES),
        },
    )
    zo_hessian_smooth: float = field(
        default=1e-2,
        metadata={"help": "zo_optimizer 'hizoo': α in [0, 1), the weight of each step's curvature in the diagonal "
                  "Hessian estimate (HiZOO's Hessian_smooth; 0 = plain ZO-SGD)."},
    )
    zo_newton_max_step: float = field(
        default=1e-2,
        metadata={"help": "zo_step_rule 'newton': the largest step along a direction, |c| of c·z (a trust region)."},
    )
    zo_write_grad: bool = field(
        default=False,
        metadata={
            "help": "Write the ZO estimate into `.grad` and step the optimizer chosen by `optim` (AdamW, momentum "
            "SGD, ...). Costs one gradient-sized buffer plus that optimizer's state; default False runs ZO-SGD in "
            "place with no gradient and no optimizer state."
        },
    )
    zo_parallel: str = field(
        default="data",
        metadata={
            "help": "With several processes: 'data' (each process evaluates all q directions on its shard of the "
            "batch; the projected gradients are averaged) or 'query' (the global batch is gathered and each process "
            "evaluates q/P of the directions on it; only 2 losses per direction are exchanged).",
            "choices": list(ZO_PARALLEL_MODES),
        },
    )
    zo_reuse_prefix: bool = field(
        default=True,
        metadata={
            "help": "Compute once per batch, not at every probe, the modules that run before the first trainable "
            "parameter is read (the layers below a trained block): bitwise the same losses, 2-4x faster steps when "
            "a top block trains; keeps one boundary tensor per such module for the batch's probes."
        },
    )
    zo_chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute a causal LM's loss in the ZO probes a chunk of tokens at a time from the final hidden "
            "states, never holding the full logits (tokens x vocabulary). Used where the model's head is a plain "
            "linear layer and a check on the first batch finds the model's own loss to float tolerance; else off, "
            "with a log line saying why."
        },
    )
    trainable_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reduced dimension: glob patterns of the parameter names that train (e.g. 'model.layers.11.mlp.*', "
            "the last MLP of llama2-20m); all others are frozen, and ZO perturbs only these. Default: all."
        },
    )
    block_schedule: list | str | None = field(
        default=None,
        metadata={
            "help": "Blockwise pretraining: a list of blocks {name, parameters, steps|epochs, training_order, reinit, "
            "zo_num_queries, learning_rate, repeat_over} (YAML list or JSON string); see zo_trainer.callbacks."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds an earlier run (checkpoints or a final model): its "
            "checkpoints and final weights are deleted first. Without it such an output_dir is refused unless resuming."
        },
    )
    resume_allow_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume although settings an exact resume depends on (learning_rate, zo_*, max_steps, the global "
            "batch, ...) differ from the checkpoint's; the differences are logged and the new values apply."
        },
    )

    gradient_probe_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps (and at step 0), compare gradient_probe_draws ZO estimates with the "
            "backprop gradient on a fixed batch and log probe/* metrics (cosine, relative error, variances). Costs "
            "one forward+backward and draws·2q forwards per probe. 0 = off."
        },
    )
    gradient_probe_draws: int = field(default=8, metadata={"help": "ZO estimates per gradient probe."})
    gradient_probe_histograms: bool = field(
        default=False,
        metadata={"help": "Save sampled FO/ZO gradient entries to <output_dir>/gradient_probe/step-N.npz (Fig. 4)."},
    )

    def __post_init__(self):
        _check_choice("training_order", self.training_order, TRAINING_ORDERS)
        _check_choice("zo_optimizer", self.zo_optimizer, tuple(ZO_OPTIMIZERS))
        if self.zo_state_dtype is not None:
            _check_choice("zo_state_dtype", self.zo_state_dtype, tuple(STATE_DTYPES))
        _check_choice("zo_parallel", self.zo_parallel, ZO_PARALLEL_MODES)
        # the engine would name curvature=True, which no field sets: said here in the config's terms
        if self.zo_step_rule == "newton" and self.zo_estimator != "central":
            raise ValueError("zo_step_rule='newton' needs zo_estimator='central' (it fits a quadratic to L−, L0 and L+)")
        if self.zo_optimizer == "hizoo" and self.zo_estimator != "central":
            raise ValueError("zo_optimizer='hizoo' needs zo_estimator='central' (its Hessian estimate reads L−, L0 and L+)")
        # the engine's own checks, run on the arguments these fields give it (they ignore zo_seed, still None here)
        _in_config_terms(ZOEstimator.check_settings, ESTIMATOR_FIELDS, **self.zo_estimator_kwargs())
        optimizer_cls, optimizer_kwargs = self.zo_optimizer_cls_and_kwargs()
        _in_config_terms(optimizer_cls.check_settings, OPTIMIZER_FIELDS, weight_decay=self.weight_decay,
                         **optimizer_kwargs)
        # what the engine cannot see: how the fields combine into its arguments
        if self.zo_momentum and self.zo_optimizer in ("adam", "hizoo"):
            raise ValueError(f"zo_momentum={self.zo_momentum} is for zo_optimizer 'sgd' and 'sign' (got "
                             f"{self.zo_optimizer!r}); 'adam' takes adam_beta1 and adam_beta2")
        if self.zo_momentum_history and self.zo_optimizer != "sgd":
            raise ValueError(f"zo_momentum_history={self.zo_momentum_history!r} is for zo_optimizer='sgd' "
                             f"(got zo_optimizer={self.zo_optimizer!r}); leave it 0")
        if self.zo_write_grad and (self.zo_optimizer != "sgd" or self.zo_step_rule != "gradient" or self.zo_momentum):
            raise ValueError(
                "zo_write_grad=True feeds the plain SPSA estimate to `optim`: leave zo_optimizer='sgd', "
                f"zo_step_rule='gradient' and zo_momentum=0 (got {self.zo_optimizer!r}, {self.zo_step_rule!r}, "
                f"{self.zo_momentum})"
            )
        if self.zo_correlation and self.zo_num_queries < 2:
            raise ValueError(f"zo_correlation={self.zo_correlation} needs zo_num_queries >= 2 (got {self.zo_num_queries})")
        if self.zo_step_rule == "spread" and self.zo_num_queries < 2:
            raise ValueError(f"zo_step_rule='spread' needs zo_num_queries >= 2 (got {self.zo_num_queries}): it divides "
                             "by the spread of a step's perturbed losses, and one query would give its sign")
        if self.gradient_probe_steps < 0 or self.gradient_probe_draws < 1:
            raise ValueError(
                f"gradient_probe_steps={self.gradient_probe_steps} must be >= 0 (0 = off) and "
                f"gradient_probe_draws={self.gradient_probe_draws} >= 1"
            )
        if isinstance(self.trainable_parameters, str):
            self.trainable_parameters = [self.trainable_parameters]
        if isinstance(self.block_schedule, str):
            try:
                self.block_schedule = json.loads(self.block_schedule)
            except json.JSONDecodeError as error:
                raise ValueError(f"block_schedule={self.block_schedule!r} is not valid JSON: {error}") from None
        if self.block_schedule is not None and not (isinstance(self.block_schedule, list) and self.block_schedule):
            raise ValueError(f"block_schedule={self.block_schedule!r} must be a non-empty list of blocks")
        if self.block_schedule and self.trainable_parameters:
            raise ValueError("set trainable_parameters or block_schedule, not both: each block names its parameters")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not torch.accelerator.is_available():
            # torchrun-style launches (`accelerate launch --multi_gpu`) on a machine without GPUs: TrainingArguments
            # forms a process group only with use_cpu (or ACCELERATE_USE_CPU); else each process trains alone
            logger.info("WORLD_SIZE=%s on a machine without GPUs: use_cpu=True, so the processes form one gloo "
                        "process group", os.environ["WORLD_SIZE"])
            self.use_cpu = True
        super().__post_init__()
        if self.zo_seed is None:
            self.zo_seed = self.seed

    def zo_estimator_kwargs(self) -> dict:
        """The keyword arguments of `zo_trainer.zo.ZOEstimator` that these settings give."""
        return dict(
            eps=self.zo_eps,
            num_queries=self.zo_num_queries,
            estimator=self.zo_estimator,
            reduction=self.zo_query_reduction,
            distribution=self.zo_distribution,
            correlation=self.zo_correlation,
            seed=self.zo_seed,
            lowrank_rank=self.zo_lowrank_rank,
            lowrank_refresh_steps=self.zo_lowrank_refresh_steps,
            curvature=self.zo_step_rule == "newton" or self.zo_optimizer == "hizoo",
            reuse_prefix=self.zo_reuse_prefix,
        )

    def zo_optimizer_cls_and_kwargs(self) -> tuple[type, dict]:
        """The ZO optimizer class and its keyword arguments, but for the estimator and the parameters."""
        state_dtype = STATE_DTYPES[self.zo_state_dtype] if self.zo_state_dtype else None
        kwargs = dict(lr=self.learning_rate, step_rule=self.zo_step_rule, newton_max_step=self.zo_newton_max_step)
        if self.zo_optimizer == "sgd":
            kwargs.update(momentum=self.zo_momentum, momentum_history=self.zo_momentum_history, state_dtype=state_dtype)
        elif self.zo_optimizer == "sign":
            kwargs.update(momentum=self.zo_momentum, state_dtype=state_dtype)
        elif self.zo_optimizer == "hizoo":
            kwargs.update(hessian_smooth=self.zo_hessian_smooth, state_dtype=state_dtype)
        else:
            kwargs.update(betas=(self.adam_beta1, self.adam_beta2), eps=self.adam_epsilon, state_dtype=state_dtype)
        return ZO_OPTIMIZERS[self.zo_optimizer], kwargs


@functools.cache
def zo_config_class(args_class: type[TrainingArguments]) -> type[ZOConfig]:
    """The config of ``class ZO<Name>Trainer(ZOTrainer, <Name>Trainer)``: `ZOConfig`'s fields plus every field of
    ``args_class`` (a `TrainingArguments` subclass such as TRL's `SFTConfig`), each with that class's default and
    meaning, so `HfArgumentParser` and YAML files see both sets. ``zo_config_class(SFTConfig)`` is a dataclass
    ``ZOSFTConfig(ZOConfig, SFTConfig)``, the same class at every call."""
    if not (isinstance(args_class, type) and issubclass(args_class, TrainingArguments)):
        raise TypeError(f"zo_config_class({args_class!r}): expected a subclass of transformers.TrainingArguments")
    if issubclass(args_class, ZOConfig):
        return args_class
    if args_class is TrainingArguments:
        return ZOConfig
    # ZOConfig inherits TrainingArguments' defaults: declare the other class's fields again so that its own win
    own = set(ZOConfig.__annotations__)
    hints = typing.get_type_hints(args_class)
    fields = [(f.name, hints[f.name], _copy_field(f)) for f in dataclasses.fields(args_class) if f.name not in own]
    name = "ZO" + args_class.__name__.removesuffix("TrainingArguments").removesuffix("Arguments")
    name += "" if name.endswith("Config") else "Config"
    return dataclasses.make_dataclass(
        name, fields, bases=(ZOConfig, args_class),
        namespace={
            "__module__": __name__,
            "__doc__": f"`ZOConfig` and `{args_class.__qualname__}` in one: see `zo_config_class`.",
            # pickled by the class it merges (Trainer saves training_args.bin): no module holds this class by name
            "__reduce__": lambda self: (_unpickle_merged, (args_class, self.__dict__)),
        },
    )


def _unpickle_merged(args_class: type[TrainingArguments], state: dict) -> ZOConfig:
    args = object.__new__(zo_config_class(args_class))
    args.__dict__.update(state)
    return args


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    return field(default=f.default, default_factory=f.default_factory, init=f.init, repr=f.repr, hash=f.hash,
                 compare=f.compare, metadata=f.metadata, kw_only=f.kw_only)


# the engine's argument names and the config fields that set them: the engine's messages, in the config's terms
ESTIMATOR_FIELDS = {
    "eps": "zo_eps", "num_queries": "zo_num_queries", "estimator": "zo_estimator", "reduction": "zo_query_reduction",
    "distribution": "zo_distribution", "correlation": "zo_correlation", "rank": "zo_lowrank_rank",
    "lowrank_rank": "zo_lowrank_rank", "refresh_steps": "zo_lowrank_refresh_steps",
    "lowrank_refresh_steps": "zo_lowrank_refresh_steps",
}
OPTIMIZER_FIELDS = {
    "lr": "learning_rate", "step_rule": "zo_step_rule", "newton_max_step": "zo_newton_max_step",
    "momentum": "zo_momentum", "momentum_history": "zo_momentum_history", "betas[0]": "adam_beta1",
    "betas[1]": "adam_beta2", "eps": "adam_epsilon", "hessian_smooth": "zo_hessian_smooth",
}


def _in_config_terms(check, fields: dict[str, str], **settings) -> None:
    """Run an engine check on the settings it is given; its ValueError is raised again with every ``argument=``
    it names as the config field of ``fields`` that sets it (one pass: a field name is never renamed again)."""
    try:
        check(**settings)
    except ValueError as error:
        engine_names = re.compile(r"\b(" + "|".join(map(re.escape, fields)) + r")(?==)")
        raise ValueError(engine_names.sub(lambda m: fields[m.group(1)], str(error))) from None


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")
