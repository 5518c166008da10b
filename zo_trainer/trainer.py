"""ZOTrainer: `transformers.Trainer` whose training step is forward-only SPSA (ZO-SGD).

A thin adapter: the engine in `zo_trainer.zo` estimates and updates; this class wires it to the
Trainer's loop. The Trainer already calls `optimizer.step()` once per accumulation window and
`lr_scheduler.step()` after it, so the ZO update is an Optimizer (`ZOSGD`) and scheduling,
accumulation, logging, evaluation and checkpoints work unchanged. `training_order="fo"` runs the
parent's backprop step, so baselines share every line of code but the step itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import time
from collections import defaultdict

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from . import chunked_loss
from .checkpointing import CheckpointSafety
from .callbacks import BlockFreezeCallback, BlockReinitCallback, BlockSchedule, match_parameters, set_trainable
from .config import ZOConfig, zo_config_class
from .diagnostics import GradientProbeCallback, MetricsOfThisProcess
from .zo import PendingEstimate, Probe, ZOEstimator, ZOOptimizer

logger = logging.getLogger(__name__)

# on every model card the trainer writes (`create_model_card`, which `push_to_hub` calls): callers add only their own
MODEL_CARD_TAGS = ("zo-trainer", "zeroth-order")


class ZOTrainer(CheckpointSafety, Trainer):
    """Drop-in replacement for `Trainer`: same constructor, same methods, ZO training by default.

    Composes with any Trainer subclass: ``class ZOSFTTrainer(ZOTrainer, SFTTrainer)``. Arguments of any
    `TrainingArguments` subclass are upgraded to their `zo_config_class` with the default ZO settings but the
    ``normalized`` step rule (its rates are AdamW's, so the learning rate given keeps its meaning), every value
    kept; a `ZOConfig` given to such a subclass is upgraded to ``zo_config_class(args_class)``, its settings kept.
    """

    args_class: type[TrainingArguments] = TrainingArguments  # what the Trainer base expects: SFTConfig for SFTTrainer
    # What a Trainer subclass's compute_loss records in these attributes (TRL: tokens seen, token accuracy,
    # entropy) is kept from the first of the probe forwards of each batch only: see `_RecordOnce`
    recorded_once_per_batch: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init__(self, model=None, args: TrainingArguments | None = None, *positional, **kwargs):
        super().__init__(model, self._zo_args(args), *positional, **kwargs)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and self.accelerator.num_processes == 1:
            raise RuntimeError(
                f"WORLD_SIZE={world} processes were launched but this one is not in a process group: each would train "
                "alone into the same output_dir. On a machine without GPUs launch with `accelerate launch --use_cpu` "
                "(or ACCELERATE_USE_CPU=true), or create the arguments with use_cpu=True"
            )
        if self.args.fp16 and self.accelerator.device.type == "cpu":
            logger.warning(
                "fp16=True does nothing on CPU (accelerate autocasts to float16 on GPUs only): this run computes in "
                "%s. bf16=True autocasts to bfloat16 on CPU.",
                str(next(self.model.parameters()).dtype).removeprefix("torch."))
        if self.args.zo_parallel == "query" and self.accelerator.num_processes > self.args.zo_num_queries:
            raise ValueError(
                f"zo_parallel='query' splits the zo_num_queries={self.args.zo_num_queries} directions over "
                f"{self.accelerator.num_processes} processes: use at least as many queries as processes"
            )
        if (self.args.zo_parallel == "query" and self.accelerator.num_processes > 1
                and self.args.zo_num_queries % self.accelerator.num_processes
                and type(self).compute_loss is not Trainer.compute_loss):
            raise ValueError(
                f"zo_parallel='query' with zo_num_queries={self.args.zo_num_queries} on "
                f"{self.accelerator.num_processes} processes runs compute_loss more often on some processes than on "
                f"others, and {type(self).__name__}.compute_loss may run a collective across processes: "
                "use a zo_num_queries divisible by the number of processes, or zo_parallel='data'"
            )
        self.training_order = self.args.training_order
        self.zo_estimator = ZOEstimator(self.model, **self.args.zo_estimator_kwargs())
        if self.args.trainable_parameters:
            set_trainable(self.model, match_parameters(self.model, self.args.trainable_parameters))
        self.block_schedule = None
        self.active_block: tuple[int, str] | None = None
        orders = {self.training_order}
        if self.args.block_schedule:
            self.block_schedule = BlockSchedule(self.args.block_schedule, self.model)
            self.add_callback(BlockFreezeCallback(self.block_schedule, self))
            self.add_callback(BlockReinitCallback(self.block_schedule))
            orders = {order or self.training_order for order in self.block_schedule.training_orders}
        if self.args.gradient_probe_steps:
            self.add_callback(
                GradientProbeCallback(
                    self,
                    every_steps=self.args.gradient_probe_steps,
                    num_draws=self.args.gradient_probe_draws,
                    save_histograms=self.args.gradient_probe_histograms,
                )
            )
        if "zo" in orders:
            self._check_sharding_plugins()
        if self.args.torch_compile and "zo" in orders:
            raise ValueError(
                "torch_compile=True: a compiled graph does not see the perturbed copies that the ZO probes swap into "
                "the modules, so its probe losses would ignore the perturbation. Unset torch_compile for ZO runs; "
                "FO-only runs (training_order='fo') may compile."
            )
        # A ZO optimizer needs no gradient buffer; a run with FO blocks keeps `optim` and feeds it ZO estimates.
        self.uses_zo_optimizer = orders == {"zo"} and not self.args.zo_write_grad
        if self.uses_zo_optimizer and self.optimizer is not None:
            raise ValueError(
                f"an optimizer was passed in `optimizers=` but zo_optimizer={self.args.zo_optimizer!r} updates in place "
                "without one: set zo_write_grad=True to feed the ZO estimate to your optimizer"
            )
        if self.uses_zo_optimizer:
            logger.warning(
                "ZO training with zo_optimizer=%r, zo_step_rule=%r at learning_rate=%g: `optim`=%r is not used "
                "(set zo_write_grad=True to feed the ZO estimate to it)", self.args.zo_optimizer,
                self.args.zo_step_rule, self.args.learning_rate, getattr(self.args.optim, "value", self.args.optim))
        self._zo_optimizer: ZOOptimizer | None = None  # created by create_optimizer
        self._pending = PendingEstimate()  # zo_write_grad mode: the estimate of this window (a ZO optimizer keeps its own)
        self._window = _LogWindow()
        self._counters: dict[str, float] | None = None  # forward_passes / wall_time, carried across resumes
        self._chunks_loss: dict[int, bool] = {}  # id(model) -> whether its probes compute the loss in chunks

    def _check_sharding_plugins(self) -> None:
        """ZO trains FSDP2's shards (accelerate's plugin with fsdp_version 2, or a model loaded sharded); refuse the
        rest before any work."""
        supported = ("shard with FSDP2: accelerate's FSDP plugin with fsdp_version 2 (`fsdp_config={'version': 2}`, "
                     "accelerate_configs/fsdp.yaml), or `from_pretrained(..., distributed_config=DistributedConfig("
                     "fsdp_size=N))`; or train the whole model on every process, data-parallel "
                     "(accelerate_configs/multi_gpu_fp16.yaml): a ZO step runs at inference memory. FO-only runs "
                     "(training_order='fo') may use any plugin")
        if self.is_deepspeed_enabled or self.args.deepspeed:
            raise ValueError(f"ZO training does not take DeepSpeed (`deepspeed`): its engine owns the optimizer step "
                             f"the ZO update replaces. To shard the model, {supported}.")
        if self.is_fsdp_enabled:
            version = self.accelerator.state.fsdp_plugin.fsdp_version
            if version != 2:
                raise ValueError(f"ZO training does not take FSDP version {version} (flat parameters hide the "
                                 f"per-parameter shards the probes perturb): {supported}.")
        elif self.args.fsdp:
            raise ValueError(
                f"fsdp={self.args.fsdp!r} on {self.args.device.type}: accelerate enables its FSDP plugin on GPUs and "
                "other accelerators only, so this run would train the whole model on every process. On CPU processes "
                "load the model sharded, `from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`, "
                "and unset `fsdp`; or unset it to train the whole model on every process.")

    def _zo_args(self, args: TrainingArguments | None) -> ZOConfig:
        """``args`` as an instance of the ZO config of its class (or of `args_class`), every value kept."""
        if args is None:
            return zo_config_class(self.args_class)(output_dir="trainer_output")
        cls = zo_config_class(type(args) if isinstance(args, self.args_class) else self.args_class)
        unknown = [f.name for f in dataclasses.fields(args) if f.init and f.name not in cls.__dataclass_fields__]
        if unknown:
            raise TypeError(
                f"{type(self).__name__} takes a {self.args_class.__name__} (or a ZOConfig or TrainingArguments); the "
                f"{type(args).__name__} given has fields it does not know: {', '.join(unknown)}"
            )
        if type(args) is cls:
            return args
        # arguments written for a first-order Trainer carry a learning rate meant for AdamW: the normalized rule,
        # whose step does not depend on the loss's scale, takes AdamW's rates (bench_convergence: 1e-3 for both)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return cls(**values, **({} if isinstance(args, ZOConfig) else {"zo_step_rule": "normalized"}))

    def recording_nothing(self) -> _RecordOnce:
        """Context for forwards that are no training step (gradient probe, lr-find): what compute_loss records in
        `recorded_once_per_batch` is put back as it was after each."""
        return _RecordOnce(self, self.recorded_once_per_batch, keep_first=False)

    @property
    def zo_active(self) -> bool:
        return self.training_order == "zo"

    # ------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """The ZO optimizer of `zo_optimizer` unless `zo_write_grad` asks for the `optim` of the config."""
        if self.optimizer is None and self.uses_zo_optimizer:
            if self.optimizer_cls_and_kwargs is not None:
                raise ValueError(
                    "optimizer_cls_and_kwargs was given but the ZO optimizer ignores it: set zo_write_grad=True to "
                    "feed the ZO estimate to your optimizer"
                )
            cls, kwargs = self.args.zo_optimizer_cls_and_kwargs()
            self.optimizer_cls_and_kwargs = (cls, {"estimator": self.zo_estimator, **kwargs})
            try:
                super().create_optimizer(model)
            finally:
                self.optimizer_cls_and_kwargs = None
            self._zo_optimizer = self.optimizer
            return self.optimizer
        return super().create_optimizer(model)

    def _pending_estimate(self) -> PendingEstimate:
        return self._zo_optimizer.pending if self.uses_zo_optimizer else self._pending

    # ---------------------------------------------------------------------------------- the ZO step
    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        self._start_counters()
        if not self.zo_active:
            self._use_grad_scaler(True)
            self._counters["forward_passes"] += 1
            if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:  # DDP's gradient all-reduce
                self._counters["communicated_bytes"] += sum(p.numel() * p.element_size() for _, p in self.zo_estimator.trainable())
            return super().training_step(model, inputs, num_items_in_batch)
        self._use_grad_scaler(False)  # no backward: a GradScaler would find no gradient to unscale
        model.train()
        inputs = self._prepare_inputs(inputs)
        # no DDP hooks needed, and no graph compiled by accelerate's --dynamo_backend (see torch_compile in __init__)
        forward_model = self.accelerator.unwrap_model(model, keep_fp32_wrapper=True, keep_torch_compile=False)
        queries, loss_divisor = None, 1.0
        if self._query_parallel:
            inputs, num_items_in_batch, loss_divisor = self._gather_global_batch(inputs, num_items_in_batch)
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            queries = range(rank, self.zo_estimator.num_queries, world)

        record_once = _RecordOnce(self, self.recorded_once_per_batch)

        def loss_fn(record=record_once, chunked=True) -> torch.Tensor:
            # a copy of the inputs: compute_loss pops "labels" for compute_loss_func
            chunks = chunked_loss.ChunkedLoss(forward_model, inputs["labels"]) if chunked else contextlib.nullcontext()
            gathered = MetricsOfThisProcess(self.accelerator) if self._query_parallel else contextlib.nullcontext()
            with record, self.compute_loss_context_manager(), chunks, gathered:
                loss = self.compute_loss(forward_model, dict(inputs), num_items_in_batch=num_items_in_batch)
            return loss / loss_divisor

        if not self._loss_in_chunks(forward_model, inputs, loss_fn):
            loss_fn = functools.partial(loss_fn, chunked=False)

        probe = self.zo_estimator.probe(loss_fn, step=self.state.global_step, queries=queries)
        weight = 1.0 if self._loss_is_scaled_for_accumulation(num_items_in_batch) else 1.0 / self.current_gradient_accumulation_steps
        self._accumulate(probe, weight)
        self._counters["forward_passes"] += probe.num_forwards
        if self.accelerator.sync_gradients:  # last micro-batch of this optimizer step
            self._finish_zo_step()
        return (probe.loss * weight).to(self.args.device, torch.float32)

    def _loss_in_chunks(self, model: nn.Module, inputs, loss_fn) -> bool:
        """Whether the probes compute the loss in chunks (`zo_trainer.chunked_loss`), decided at the first batch of
        each model: where ``zo_chunked_loss``, where compute_loss reads nothing but the model's loss (no
        compute_loss_func, no label smoothing, no subclass reading the logits) and where the check agrees."""
        if id(model) not in self._chunks_loss:
            why_not = None
            if not self.args.zo_chunked_loss:
                why_not = "zo_chunked_loss=False"
            elif type(self).compute_loss is not Trainer.compute_loss:
                why_not = f"{type(self).__name__}.compute_loss may read the logits"
            elif self.compute_loss_func is not None or self.label_smoother is not None:
                why_not = "compute_loss_func or label smoothing reads the logits"
            elif not isinstance(inputs.get("labels"), torch.Tensor):
                why_not = "the batch has no labels"
            else:
                why_not = chunked_loss.check(lambda chunked: loss_fn(self.recording_nothing(), chunked), model)
            self._chunks_loss[id(model)] = why_not is None
            if why_not is None:
                logger.info("ZO probes compute the loss a chunk of tokens at a time: the full logits are never held")
            elif self.args.zo_chunked_loss:
                logger.info("ZO probes compute the loss from the full logits: %s", why_not)
        return self._chunks_loss[id(model)]

    @property
    def _query_parallel(self) -> bool:
        return self.args.zo_parallel == "query" and self.accelerator.num_processes > 1

    def _pad_to_common_length(self, inputs: dict) -> dict:
        """A collator that pads each batch to its own longest sequence gives the processes' batches other lengths:
        before they are gathered, each is padded on the right to the longest of all (one collective of the lengths),
        as one process's collator pads the global batch: labels with -100, masks with 0, input_ids with the pad token."""
        keys = [k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() >= 2]
        if not keys:
            return inputs
        lengths = self.accelerator.gather(torch.tensor([inputs[k].shape[1] for k in keys], device=self.args.device))
        self._counters["communicated_bytes"] += lengths.numel() * lengths.element_size()
        padded = dict(inputs)
        for key, longest in zip(keys, lengths.view(-1, len(keys)).amax(0).tolist()):
            tensor = inputs[key]
            if tensor.shape[1] < longest:
                fill = tensor.new_full((tensor.shape[0], longest - tensor.shape[1], *tensor.shape[2:]), self._pad_value(key))
                padded[key] = torch.cat([tensor, fill], dim=1)
        return padded

    def _pad_value(self, key: str) -> int:
        if key == "labels":
            return -100
        if "mask" in key or key == "token_type_ids":
            return 0
        if key == "input_ids":
            pad = getattr(self.processing_class, "pad_token_id", None)
            return 0 if pad is None else pad
        raise ValueError(
            f"zo_parallel='query': the batch's {key!r} has another length on each process and no known padding value "
            "(labels, input_ids, token_type_ids and masks are padded): pad it to one length in the data collator, or "
            "use zo_parallel='data'")

    def _gather_global_batch(self, inputs, num_items_in_batch):
        """Query-parallel: every process evaluates its share of the directions on the whole global batch."""
        inputs = self._pad_to_common_length(inputs)
        inputs = {**inputs, **_gather_together(self.accelerator, {k: v for k, v in inputs.items() if torch.is_tensor(v)})}
        self._counters["communicated_bytes"] += sum(v.numel() * v.element_size() for v in inputs.values() if torch.is_tensor(v))
        if num_items_in_batch is None:
            return inputs, None, 1.0
        if not self.args.average_tokens_across_devices:  # the Trainer counted this process's tokens only
            count = torch.as_tensor(num_items_in_batch, device=self.args.device)
            num_items_in_batch = self.accelerator.reduce(count, reduction="sum")
        # compute_loss multiplies by the process count to undo DDP's gradient averaging; nothing averages here
        rescaled = self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
        return inputs, num_items_in_batch, float(self.accelerator.num_processes) if rescaled else 1.0

    def _accumulate(self, probe: Probe, weight: float) -> None:
        self._pending_estimate().add(probe, weight)

    def _finish_zo_step(self) -> None:
        """Average the estimate over processes, skip a non-finite one (stopping where the weights diverged), and
        stage the update: in the ZO optimizer, or in ``.grad`` for `optim`."""
        step, pending = self.state.global_step, self._pending_estimate()
        values = pending.values
        if self.accelerator.num_processes > 1:  # without a backward, DDP reduces nothing: a few scalars per query do it
            # data-parallel: average the shards' estimates; query-parallel: each process filled its own queries
            values = self.accelerator.reduce(values, reduction="sum" if self._query_parallel else "mean")
            self._counters["communicated_bytes"] += values.numel() * values.element_size()
        finite = bool(torch.isfinite(values).all())
        trainable = [p for _, p in self.zo_estimator.trainable()]
        if not finite:
            pending.clear()
            _raise_if_not_finite(self.zo_estimator, trainable, step)
        self._window.add(step, values[0] if finite else None)
        if not finite:
            return
        if self.uses_zo_optimizer:
            pending.values = values
            self._window.add_rule(self._zo_optimizer.last_step)
        else:
            self.zo_estimator.write_grad(step, self.zo_estimator.coefficients(values[0]), trainable)
            pending.clear()

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Mirror of `Trainer.training_step`: is the micro-batch loss already a share of the batch loss?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _use_grad_scaler(self, enabled: bool) -> None:
        """fp16 makes accelerate create a GradScaler; ZO steps must bypass it, FO steps need it."""
        if not hasattr(self, "_grad_scaler"):
            self._grad_scaler = self.accelerator.scaler
        scaler = self._grad_scaler if enabled else None
        self.accelerator.scaler = scaler
        if hasattr(self.optimizer, "scaler"):
            self.optimizer.scaler = scaler

    def _clip_grad_norm(self, model):
        if self.zo_active and self.uses_zo_optimizer:
            return None  # a ZO optimizer has no gradient tensor to clip
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.zo_active and self.uses_zo_optimizer:
            return None
        return super()._get_grad_norm(model, grad_norm)

    # ------------------------------------------------------------------------------------- blockwise
    def enter_block(self, index: int, block, names: list[str], at_start: bool) -> None:
        """Switch FO/ZO, q and learning rate for a block whose parameters were just unfrozen; ``at_start``: its first
        step (not a resume in its middle, whose optimizer state the checkpoint restored)."""
        self.active_block = (index, block.name)
        self.training_order = block.training_order or self.args.training_order
        self.zo_estimator.num_queries = block.zo_num_queries or self.args.zo_num_queries
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        for name in names if at_start else ():  # a block starts with fresh optimizer state (ZO-SGD keeps none)
            optimizer.state.pop(self.model.get_parameter(name), None)
        if any(b.learning_rate is not None for b in self.block_schedule.blocks):  # the others take the run's
            self._set_base_learning_rate(self.args.learning_rate if block.learning_rate is None else block.learning_rate)

    def _set_base_learning_rate(self, learning_rate: float) -> None:
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"a per-block learning_rate needs a LambdaLR-based lr_scheduler_type (constant, linear, cosine, ...); "
                f"got {type(scheduler).__name__}"
            )
        scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = learning_rate * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() logs

    # ----------------------------------------------------------------------------------- model card
    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """`Trainer.create_model_card`, plus `MODEL_CARD_TAGS` and a section with the ZO settings and final metrics.
        Each tag is listed once, the tags of an earlier card in ``output_dir`` (merged by the base class) included."""
        tags = [tags] if isinstance(tags, str) else list(tags or ())
        tags = list(dict.fromkeys([*tags, *MODEL_CARD_TAGS]))
        super().create_model_card(
            language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
        )
        if self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as card:
                card.write(self._zo_card_section(dataset))

    def _zo_card_section(self, dataset) -> str:
        args = self.args
        settings = {
            "training_order": args.training_order,
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(ZOConfig) if f.name.startswith("zo_")},
            "trainable_parameters": args.trainable_parameters or "all",
            "block_schedule": json.dumps(args.block_schedule) if args.block_schedule else "none",
        }
        final = {}
        for entry in self.state.log_history:
            final.update({k: v for k, v in entry.items() if k.startswith("eval_") or k in ("train_loss", "forward_passes")})
        lines = [
            "\n## Zeroth-order training\n",
            "This model was trained with zo-trainer: forward-only SPSA "
            "(ZO-SGD) gradient estimates inside `transformers.Trainer`, after Allaire et al., *Zeroth Order "
            "Optimization for Pretraining Language Models* (ICPRAM 2025).\n",
            f"- dataset: {dataset or 'unspecified'}",
            *(f"- {key}: {value}" for key, value in settings.items()),
            "\n### Final metrics\n",
            *(f"- {key}: {value:.6g}" if isinstance(value, float) else f"- {key}: {value}" for key, value in final.items()),
            "",
        ]
        return "\n".join(lines)

    # -------------------------------------------------------------------------------------- logging
    def _start_counters(self) -> None:
        """Cumulative forward passes, bytes all-reduced or gathered by this process, and wall time; kept in the
        trainer state so a resume continues them."""
        if self._counters is None:
            saved = self.state.stateful_callbacks.get("ZOTrainer", {})
            self._counters = {k: saved.get(k, 0) for k in ("forward_passes", "communicated_bytes", "wall_time")}
            self._clock_start = time.monotonic() - self._counters["wall_time"]
        self._counters["wall_time"] = round(time.monotonic() - self._clock_start, 3)
        self.state.stateful_callbacks["ZOTrainer"] = self._counters

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._counters is not None:  # a training log (not eval, not the final summary)
            self._start_counters()
            logs.update(self._counters)
            if self.active_block is not None:
                logs["block_index"], logs["block_name"] = self.active_block
                logs["block_start"] = self.block_schedule.blocks[self.active_block[0]].start
            logs["trainable_parameters"] = sum(p.numel() for _, p in self.zo_estimator.trainable())
            logs.update(self._window.flush())
        super().log(logs, start_time)


class ZOSeq2SeqTrainer(ZOTrainer, Seq2SeqTrainer):
    """ZO training in transformers' `Seq2SeqTrainer` (encoder-decoders; `predict_with_generate` evaluation);
    takes `Seq2SeqTrainingArguments` or its ZO config, ``zo_config_class(Seq2SeqTrainingArguments)``."""

    args_class = Seq2SeqTrainingArguments


class _RecordOnce:
    """A batch's probes run compute_loss 2q (or q+1) times; what it records in ``names`` counts as one forward's
    worth, as in a backprop step: kept from the first forward (the unperturbed model where the probes include an
    L0 forward, zo_estimator='forward' or zo_step_rule='newton'; else θ + ε·z_1), put back after each later one."""

    def __init__(self, owner, names: tuple[str, ...], keep_first: bool = True):
        self.owner, self.names, self.kept = owner, [n for n in names if hasattr(owner, n)], None
        if not keep_first:  # record nothing: every forward is undone
            self.__exit__()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.kept is None:
            self.kept = {name: copy.deepcopy(getattr(self.owner, name)) for name in self.names}
        else:
            for name, value in self.kept.items():
                setattr(self.owner, name, copy.deepcopy(value))


def _gather_together(accelerator, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``accelerator.gather`` of each tensor, with one collective for all the tensors of one dtype, device and
    first dimension (a batch's tensors share it): every collective costs a round trip and a wait for the
    slowest process."""
    groups = defaultdict(list)
    for key, tensor in tensors.items():
        groups[(tensor.dtype, tensor.device, tensor.shape[0]) if tensor.numel() and tensor.dim() else key].append(key)
    gathered = {}
    for group, keys in groups.items():
        if isinstance(group, str):  # a 0-d or empty tensor: on its own
            gathered[group] = accelerator.gather(tensors[group])
            continue
        rows = [tensors[k].reshape(group[2], -1) for k in keys]
        parts = accelerator.gather(torch.cat(rows, dim=1)).split([r.shape[1] for r in rows], dim=1)
        gathered.update({k: part.reshape(-1, *tensors[k].shape[1:]) for k, part in zip(keys, parts)})
    return gathered


def _raise_if_not_finite(estimator: ZOEstimator, params: list[nn.Parameter], step: int) -> None:
    """Stop at once where the weights themselves are no longer finite: every later probe would be skipped."""
    for p in params:
        if not bool(torch.isfinite(p).all()):
            raise RuntimeError(
                f"ZO training diverged: {estimator.name_of(p)} holds non-finite values at step {step} (the probe "
                "losses are not finite either). Lower learning_rate (or zo_eps), or use bf16/fp32 instead of fp16"
            )


class _LogWindow:
    """ZO statistics between two training logs, and the health checks of every step: a run whose updates are
    all skipped, or whose estimates are all exactly zero, is stopped or flagged whatever the logging settings."""

    MAX_SKIPPED_IN_A_ROW = 10  # consecutive skipped updates that stop the run
    DEAD_STEPS = 50  # consecutive all-zero estimates that get a warning

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self.skipped_steps: list[int] = []
        self.rule: dict[str, list[float]] = defaultdict(list)
        self.skipped_in_a_row = self.zeros_in_a_row = 0

    def add(self, step: int, projected: torch.Tensor | None) -> None:
        if projected is None:
            self.skipped_steps.append(step)
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.MAX_SKIPPED_IN_A_ROW:
                raise RuntimeError(
                    f"the last {self.skipped_in_a_row} ZO updates (steps {step - self.skipped_in_a_row + 1}-{step}) "
                    "were skipped because the probe losses were not finite: the loss overflows (lower learning_rate or "
                    "zo_eps, or use bf16/fp32 instead of fp16)"
                )
            return
        self.skipped_in_a_row = 0
        self.values.append(projected.detach().float().cpu())
        self.zeros_in_a_row = self.zeros_in_a_row + 1 if not bool(projected.any()) else 0
        if self.zeros_in_a_row == self.DEAD_STEPS:
            logger.warning(
                "every ZO estimate of the last %d steps (up to step %d) is exactly 0: the probes' losses do not change "
                "with the weights (a saturated model, e.g. after a too large learning_rate, or zo_eps below the "
                "loss's rounding); training is not moving", self.DEAD_STEPS, step)

    def add_rule(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.rule[key].append(value)

    def flush(self) -> dict[str, float]:
        values, skipped, rule = self.values, self.skipped_steps, self.rule
        self.values, self.skipped_steps, self.rule = [], [], defaultdict(list)
        if not values and not skipped:
            return {}
        if not values:
            raise RuntimeError(
                f"all {len(skipped)} ZO updates since the last log were skipped because the probe losses were not "
                "finite: the model has diverged or the loss overflows (lower learning_rate or zo_eps, or use bf16/"
                "fp32 instead of fp16)"
            )
        projected = torch.cat(values)
        logs = {
            "zo_projected_grad": projected.mean().item(),
            "zo_projected_grad_abs": projected.abs().mean().item(),
            "zo_skipped_updates": len(skipped),
            **{key: sum(v) / len(v) for key, v in rule.items()},
        }
        if skipped:
            logs["zo_skipped_steps"] = ",".join(map(str, skipped))
        return logs
