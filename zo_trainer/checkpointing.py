"""Checkpoints that are complete or skipped, and resumes that are exact (mixed into `ZOTrainer`).

What a run writes to ``output_dir`` and what a resume may read back:

- A checkpoint is written into ``tmp-checkpoint-N/`` and renamed to ``checkpoint-N/`` once complete, with a
  record (``complete.json``) written last: the size and sha256 of every file, the step, whether the run had
  finished, and the settings an exact resume depends on. A process killed or a disk filled mid-save leaves
  only a ``tmp-`` directory, which nothing reads (transformers' own ``get_last_checkpoint`` included).
- Resuming from the latest checkpoint verifies it against its record and skips, with a warning naming it,
  one that is incomplete or damaged (truncated, bit-flipped, missing file, no record); a checkpoint named
  explicitly must verify or it is an error.
- Weights with a nan or inf are never written: the save raises instead, so the latest complete checkpoint
  stays the last good one.
- Resuming a run that had finished changes nothing; resuming with settings that would change the steps to
  come is refused unless ``resume_allow_changes`` is set.
- SIGTERM or SIGINT during ``train()`` finishes the optimizer step, writes a checkpoint and exits with
  status 75 (`PREEMPTED_EXIT_STATUS`); a second signal, 2 s or more later, acts as it would without ZOTrainer.
- ``train()`` without a resume refuses an ``output_dir`` that holds an earlier run unless
  ``overwrite_output_dir`` is set, which deletes that run's checkpoints and final weights first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, TrainOutput

from .zo import sharding

logger = logging.getLogger(__name__)

RECORD_NAME = "complete.json"
STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: matches neither `checkpoint-*` nor transformers' checkpoint regex
# EX_TEMPFAIL (sysexits.h): "try again later". A shell reports 143/130 for a process a signal killed outright, so
# 75 tells a wrapper script that the run checkpointed on request and resumes with resume_from_checkpoint=True.
PREEMPTED_EXIT_STATUS = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop signal this soon after the first is the same request relayed (accelerate launch passes its SIGTERM or
# Ctrl-C on to the training process at once, SLURM signals every process of a step); a later one acts as it
# would without ZOTrainer: Ctrl-C twice raises KeyboardInterrupt.
REPEATED_SIGNAL_S = 2.0

# TrainingArguments fields whose change makes the resumed steps differ from those of a straight run. Every
# zo_* field counts too. The batch counts as per-device size x accumulation x processes: splitting the same
# global batch differently computes the same steps (up to float rounding).
EXACT_RESUME_FIELDS = (
    "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "label_smoothing_factor", "average_tokens_across_devices", "bf16", "fp16", "seed", "data_seed",
    "full_determinism", "dataloader_drop_last", "train_sampling_strategy", "ignore_data_skip",
    "neftune_noise_alpha", "training_order", "trainable_parameters", "block_schedule",
)
SPEED_ONLY_FIELDS = ("zo_reuse_prefix",)  # bitwise the same steps either way: free to change on resume
BATCH_SPLIT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin)$|\.index\.json$")


class BrokenCheckpointError(ValueError):
    """A checkpoint that is incomplete or differs from what was saved."""


class Preempted(SystemExit):
    """Raised by `train()` once the checkpoint a stop signal asked for is written: exits the interpreter with
    `PREEMPTED_EXIT_STATUS` unless caught."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.signum, self.checkpoint = signum, checkpoint


# ------------------------------------------------------------------------------------------- records
def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The record of a complete checkpoint (or final model directory) whose files all match it, else
    `BrokenCheckpointError` saying what is wrong.

    Reads every file once: ~65 ms for a 20M-parameter checkpoint in the page cache.
    """
    path = Path(path)
    if not path.is_dir():
        raise BrokenCheckpointError(f"{path} is not a directory")
    try:
        record = json.loads((path / RECORD_NAME).read_text(encoding="utf-8"))
        files = record["files"]
    except FileNotFoundError:
        raise BrokenCheckpointError(
            f"{path} has no {RECORD_NAME}: it was not written completely (the process was killed or the disk "
            "filled up while saving), or not by zo-trainer"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BrokenCheckpointError(f"{path / RECORD_NAME} is unreadable ({error})") from None
    for name, saved in files.items():
        file = path / name
        if not file.is_file():
            raise BrokenCheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != saved["bytes"]:
            raise BrokenCheckpointError(
                f"{file} has {size} bytes, {saved['bytes']} when saved (truncated or rewritten)")
        if _sha256(file) != saved["sha256"]:
            raise BrokenCheckpointError(
                f"{file} differs from the saved file (sha256 mismatch: a flipped bit or an overwrite)")
    return record


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` of highest N in ``output_dir`` that verifies (None if none does); each newer one
    that does not is skipped with a warning naming it and why."""
    found = _latest_verified(output_dir)
    return found[0] if found else None


def _latest_verified(output_dir) -> tuple[str, dict] | None:
    for path in reversed(checkpoint_dirs(output_dir)):
        try:
            return path, verify_checkpoint(path)
        except BrokenCheckpointError as error:
            logger.warning("Skipping checkpoint %s, falling back to an earlier one: %s", path, error)
    return None


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[str]:
    """The ``checkpoint-N`` directories of ``output_dir``, by increasing N."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_NAME.match(name))]
    paths = [os.path.join(output_dir, name) for _, name in sorted(found)]
    return [path for path in paths if os.path.isdir(path)]


def finished_run(output_dir: str | os.PathLike) -> dict | None:
    """The record of the final model `save_model` wrote into ``output_dir``, or None."""
    try:
        return json.loads((Path(output_dir) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def earlier_run(output_dir: str | os.PathLike) -> str | None:
    """What of an earlier run ``output_dir`` holds (a final model, checkpoints), or None."""
    found = []
    if (Path(output_dir) / RECORD_NAME).is_file():
        found.append(f"the final model of a finished run ({RECORD_NAME})")
    if checkpoints := checkpoint_dirs(output_dir):
        found.append(f"{len(checkpoints)} checkpoint(s), the latest {os.path.basename(checkpoints[-1])}")
    return " and ".join(found) or None


def check_output_dir(output_dir: str | os.PathLike, resume_from_checkpoint=None, overwrite: bool = False) -> None:
    """Refuse to start a fresh run in an ``output_dir`` that holds an earlier one (its checkpoints would mix with
    the new run's and a later resume could pick them), unless resuming or asked to overwrite. Call it before
    writing anything into ``output_dir``."""
    if resume_from_checkpoint not in (None, False) or overwrite:
        return
    if found := earlier_run(output_dir):
        raise FileExistsError(
            f"output_dir {output_dir} already holds {found}: resume it with resume_from_checkpoint=True, choose "
            "another output_dir, or set overwrite_output_dir=True to delete that run's checkpoints and final model"
        )


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
        if fsync:  # the record must not reach the disk before the data it vouches for
            os.fsync(file.fileno())
    return digest.hexdigest()


def _write_record(directory: str, names: list[str], **fields) -> None:
    """Checksums of ``names`` (paths relative to ``directory``) and ``fields``, written last and atomically."""
    root = Path(directory)
    files = {}
    for name in sorted(names):
        file = root / name
        files[name] = {"bytes": file.stat().st_size, "sha256": _sha256(file, fsync=True)}
    partial = root / (RECORD_NAME + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        json.dump({"format": 1, **fields, "written_at": time.time(), "files": files}, out, indent=1, default=str)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, root / RECORD_NAME)
    _fsync_dir(root)


def _all_files(directory: str) -> list[str]:
    root = Path(directory)
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != RECORD_NAME]


def _top_level_files(directory: str) -> dict[str, tuple]:
    if not os.path.isdir(directory):
        return {}
    stats = {}
    for entry in os.scandir(directory):
        if entry.is_file() and entry.name != RECORD_NAME:
            stat = entry.stat()
            stats[entry.name] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return stats


def _fsync_dir(path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_dir(path: str) -> None:
    """Rename out of sight first, so a kill midway never leaves a half-deleted ``checkpoint-N``."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f"{STAGING_PREFIX}{name}-deleted-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(sharding.is_sharded(p) for p in model.parameters())


def _first_non_finite(model: torch.nn.Module) -> tuple[str, int, int] | None:
    """(name, non-finite entries, entries) of the first parameter holding a nan or inf.

    A finite sum has no nan or inf among its terms: one pass without a mask, 10x faster at 20M parameters;
    only a sum that is not finite (or overflows) needs the element-wise look."""
    for name, param in model.named_parameters():
        if bool(torch.isfinite(param.detach().sum(dtype=torch.float32))):
            continue
        finite = torch.isfinite(param.detach())
        if not bool(finite.all()):
            return name, int((~finite).sum()), param.numel()
    return None


def _any_process(flag: bool, device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


# ------------------------------------------------------------------------------------------- the mixin
class _StopOnSignal(TrainerCallback):
    """Turns a stop signal into a checkpoint at the end of the current optimizer step, then a stop.

    The stop is set after the save, so the saved state says the run had not finished; every process takes
    part in the decision, since a checkpoint needs them all.
    """

    def __init__(self, trainer: CheckpointSafety):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if _any_process(trainer._stop_signal is not None, args.device):
            trainer._stop_signal = trainer._stop_signal or signal.SIGTERM  # the signal reached another process
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self.trainer._stop_signal is not None and self.trainer._preempted_at is None:
            self.trainer._preempted_at = state.global_step
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer._preempted_at == state.global_step:
            control.should_save = control.should_evaluate = False  # the step's checkpoint is written


class CheckpointSafety:
    """`Trainer` methods that guard what a run writes to and reads back from ``output_dir``.

    What the guarantees cost at 20M parameters (llama2-20m, an 80 MB model.safetensors, ZO-SGD, one CPU
    process on a shared 2-core box, medians of 7 saves): transformers' `_save_checkpoint` 65-110 ms, this
    one 180-230 ms, of which sha256 of the files ~65 ms (1.2 GB/s with SHA-NI), their fsync up to ~100 ms
    (what makes a record never reach the disk before the data it vouches for) and the finite-weights check
    ~15 ms; verifying the checkpoint a resume reads ~65 ms. About 0.1-0.15 s per 80 MB saved, next to the
    minutes between two checkpoints.
    """

    def __init__(self, model=None, args=None, *positional, **kwargs):
        # transformers refuses checkpoints of a model sharded at load time (it cannot gather its optimizer's state);
        # here the optimizer's state is gathered whole and the weights are loaded back row by row
        sharded = getattr(model, "is_distributed_loading_by_transformers", False) and not args.save_only_model \
            and args.save_strategy != SaveStrategy.NO
        if sharded:
            args.save_only_model = True
        try:
            super().__init__(model, args, *positional, **kwargs)
        finally:
            if sharded:
                args.save_only_model = False
        self._stop_signal: int | None = None
        self._preempted_at: int | None = None
        self._new_learning_rate = False
        self.resumed_a_finished_run = False  # set by train(): the resumed run had finished, nothing was done
        self.add_callback(_StopOnSignal(self))

    # ------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, resuming only from a verified checkpoint with the settings it was saved with, doing
        nothing for a run that had finished, and checkpointing then raising `Preempted` on SIGTERM/SIGINT."""
        self.resumed_a_finished_run = False
        self._stop_signal = self._preempted_at = None
        self._new_learning_rate = False
        run_dir = self.args.output_dir
        if resume_from_checkpoint in (None, False):
            resume_from_checkpoint = None
            overwrite = self.args.overwrite_output_dir
            check_output_dir(run_dir, None, overwrite)
            if overwrite:
                self._delete_earlier_run(run_dir)
        else:
            resume_from_checkpoint, record = self._checkpoint_to_resume(resume_from_checkpoint)
            self._check_settings(resume_from_checkpoint, record.get("settings", {}))
            if self._had_finished(record):
                return self._restore_finished_run(resume_from_checkpoint)
        if self.args.should_save:
            for stale in Path(run_dir).glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):  # saves cut short
                shutil.rmtree(stale, ignore_errors=True)
        with self._stop_on_signals():
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self._preempted_at is not None:
            checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self._preempted_at}")
            logger.warning(
                "%s: stopped after step %d and wrote %s; resume with resume_from_checkpoint=True. Exiting with "
                "status %d.", signal.Signals(self._stop_signal).name, self._preempted_at, checkpoint,
                PREEMPTED_EXIT_STATUS,
            )
            raise Preempted(self._stop_signal, checkpoint)
        if self._stop_signal is not None:
            logger.warning("%s arrived after the last step: the run finished.", signal.Signals(self._stop_signal).name)
        return output

    def _checkpoint_to_resume(self, resume_from_checkpoint: str | bool) -> tuple[str, dict]:
        """(path, record) of the latest complete checkpoint (True) or of the one named, which must verify."""
        if resume_from_checkpoint is True:
            found = _latest_verified(self.args.output_dir)
            if found is None:
                raise BrokenCheckpointError(
                    f"no complete checkpoint in output_dir {self.args.output_dir} to resume from")
            return found
        try:
            return str(resume_from_checkpoint), verify_checkpoint(resume_from_checkpoint)
        except BrokenCheckpointError as error:
            latest = latest_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
            alternative = f"; the latest complete checkpoint next to it is {latest}" if latest else ""
            raise BrokenCheckpointError(f"cannot resume from {resume_from_checkpoint}: {error}{alternative}") from None

    def _stop_on_signals(self):
        """SIGTERM/SIGINT handlers for the duration of `train()` (main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()
        previous, first = {}, []

        def restore():
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

        def handler(signum, frame):
            if self._stop_signal is None:
                self._stop_signal = signum
                first.append(time.monotonic())
            elif time.monotonic() - first[0] > REPEATED_SIGNAL_S:  # asked again: as without this handler
                restore()
                signal.raise_signal(signum)

        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
        stack = contextlib.ExitStack()
        stack.callback(restore)
        return stack

    # ------------------------------------------------------------------------------------- settings
    def _resume_settings(self) -> dict:
        """The settings an exact resume needs unchanged, as JSON would give them back."""
        values = self.args.to_dict()
        names = [*EXACT_RESUME_FIELDS, *sorted(k for k in values if k.startswith("zo_") and k not in SPEED_ONLY_FIELDS)]
        settings = {name: values[name] for name in names if name in values}
        args = self.args
        batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        settings.update(per_device_train_batch_size=args.per_device_train_batch_size, world_size=args.world_size,
                        gradient_accumulation_steps=args.gradient_accumulation_steps, total_train_batch_size=batch)
        return json.loads(json.dumps(settings, default=str))

    def _check_settings(self, checkpoint: str, saved: dict) -> None:
        """Refuse a resume whose settings differ from the checkpoint's in a way that changes the steps to come,
        unless ``resume_allow_changes``; list every difference either way."""
        current = self._resume_settings()
        if self.args.max_steps > 0 and saved.get("max_steps", 0) > 0:  # num_train_epochs is then unused
            current.pop("num_train_epochs")
        changed = {k: (saved[k], current.get(k)) for k in saved if k in current and saved[k] != current[k]}
        if not changed:
            return
        breaking = {k: v for k, v in changed.items() if k not in BATCH_SPLIT_FIELDS}
        lines = "\n".join(f"  {k}: {old!r} (saved) -> {new!r} (now)" for k, (old, new) in changed.items())
        if not breaking:
            logger.info("Resuming %s with the same global batch split differently:\n%s", checkpoint, lines)
            return
        if not self.args.resume_allow_changes:
            raise ValueError(
                f"resuming {checkpoint} with settings that differ from the ones it was saved with, so the resumed "
                f"steps would not be those of the run:\n{lines}\nRestore them, or set resume_allow_changes=True "
                "to resume with the new values."
            )
        logger.warning("Resuming %s with changed settings (resume_allow_changes=True):\n%s", checkpoint, lines)
        self._new_learning_rate = "learning_rate" in breaking

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """`Trainer._load_from_checkpoint`; a model sharded by FSDP2 takes its rows of the checkpoint's whole
        weights."""
        model = self.model if model is None else model
        if not _is_sharded(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(path):
            raise BrokenCheckpointError(f"{resume_from_checkpoint} has no model.safetensors to load a sharded model from")
        whole = load_file(path)
        missing = [name for name, _ in model.named_parameters() if name not in whole]
        if missing:
            raise BrokenCheckpointError(f"{path} lacks {missing[0]} (and {len(missing) - 1} more) of the model")
        for name, p in model.named_parameters():
            if sharding.is_sharded(p):
                sharding.load_whole(p, whole[name])
            else:
                p.data.copy_(whole[name])

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """`Trainer._save_optimizer_and_scheduler`; for a model sharded by FSDP2 the buffers of the optimizer's state
        are gathered whole (every process takes part) and written once, so the checkpoint resumes on any number of
        processes."""
        if not _is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        state = sharding.gather_state(self.optimizer.state_dict())
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            with warnings.catch_warnings(record=True) as caught_warnings:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught_warnings)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The checkpoint's scheduler holds the saved learning rate: an allowed new one replaces it. A sharded
        model's optimizer takes its rows of the saved whole buffers."""
        if checkpoint is not None and _is_sharded(self.model):
            self._load_whole_optimizer_and_scheduler(checkpoint)
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._new_learning_rate:
            self._set_base_learning_rate(self.args.learning_rate)

    def _load_whole_optimizer_and_scheduler(self, checkpoint: str) -> None:
        """What `_save_optimizer_and_scheduler` wrote for a sharded model (whole buffers), whether accelerate's FSDP2
        plugin or transformers' distributed loading sharded it: each process keeps its rows."""
        optimizer_file, scheduler_file = (os.path.join(checkpoint, name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME))
        if not (os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)):
            return  # as Trainer: a checkpoint saved with save_only_model holds neither
        self.optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=True))
        sharding.shard_state(getattr(self.optimizer, "optimizer", self.optimizer))  # inside accelerate's wrapper
        with warnings.catch_warnings(record=True) as caught_warnings:
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
        reissue_pt_warnings(caught_warnings)

    def _had_finished(self, record: dict) -> bool:
        """Whether the checkpoint ends the run: it was the last and no allowed change asks for more steps."""
        if not record.get("finished"):
            return False
        saved, current = record.get("settings", {}), self._resume_settings()
        if all(saved.get(k) == current.get(k) for k in ("max_steps", "num_train_epochs")):
            return True
        return 0 < self.args.max_steps <= record["global_step"]

    def _restore_finished_run(self, checkpoint: str) -> TrainOutput:
        """The model and state of the finished run's last checkpoint, and nothing written."""
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self.resumed_a_finished_run = True
        logger.warning("%s ends a finished run (step %d): nothing to train, nothing written.", checkpoint,
                       self.state.global_step)
        return TrainOutput(self.state.global_step, math.nan, {})

    def _delete_earlier_run(self, run_dir: str) -> None:
        if self.args.should_save:
            record = finished_run(run_dir) or {}
            for name in record.get("files", {}):
                if _WEIGHT_FILE.search(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(run_dir, name))
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, RECORD_NAME))
            for checkpoint in checkpoint_dirs(run_dir):
                _remove_dir(checkpoint)
            logger.warning("overwrite_output_dir=True: deleted the earlier run's checkpoints and final model in %s",
                           run_dir)
        self.accelerator.wait_for_everyone()

    # --------------------------------------------------------------------------------------- saving
    def _refuse_non_finite(self, what: str, all_processes: bool = False) -> None:
        bad = _first_non_finite(self.model)
        if all_processes and self.accelerator.num_processes > 1:
            if not _any_process(bad is not None, self.args.device):
                return
        elif bad is None:
            return
        detail = f"parameter {bad[0]} holds {bad[1]} non-finite values (nan or inf) of {bad[2]}" if bad else \
            "a parameter of another process holds non-finite values (nan or inf)"
        latest = latest_complete_checkpoint(self.args.output_dir)
        raise RuntimeError(
            f"step {self.state.global_step}: {detail}; not writing {what}. The run has diverged (lower "
            f"learning_rate or zo_eps). The latest complete checkpoint, which a resume picks, is {latest}."
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, refusing non-finite weights; the final model (in ``output_dir`` itself) gets a
        record of its files, the mark of a finished run."""
        target = output_dir if output_dir is not None else self.args.output_dir
        self._refuse_non_finite(f"the model to {target}")
        final = not _internal_call and os.path.abspath(target) == os.path.abspath(self.args.output_dir)
        if not final:
            return self._save_weights(output_dir, _internal_call)
        if self.args.should_save:
            with contextlib.suppress(FileNotFoundError):  # until the new files are all written, no finished run
                os.remove(os.path.join(target, RECORD_NAME))
            before = _top_level_files(target)
        self._save_weights(output_dir, _internal_call)
        if self.args.should_save:
            written = [name for name, stat in _top_level_files(target).items() if before.get(name) != stat]
            _write_record(target, written, kind="final model", global_step=self.state.global_step,
                          settings=self._resume_settings())

    def _save_weights(self, output_dir: str | None, _internal_call: bool) -> None:
        """`Trainer.save_model`; a model that accelerate's FSDP2 plugin sharded is gathered whole (every process takes
        part) and written once, whatever the plugin's `state_dict_type`: the `model.safetensors` that
        `from_pretrained` loads and that resumes on any number of processes."""
        if not (self.is_fsdp_enabled and _is_sharded(self.model)):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, state_dict=sharding.gather_weights(self.model))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint` into ``tmp-checkpoint-N``, renamed ``checkpoint-N`` once its record is
        written; rotation counts complete checkpoints only."""
        step = self.state.global_step
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        self._refuse_non_finite(name, all_processes=True)
        run_dir = self._get_output_dir(trial=trial)
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        writer = self.args.should_save
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        best_step = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step == step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if writer:
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    stored = self.state.stateful_callbacks[callback.__class__.__name__]
                    if isinstance(stored, list):
                        stored.append(callback.state())
                    else:
                        self.state.stateful_callbacks[callback.__class__.__name__] = callback.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its files (rng_state_<rank>.pth)
        if writer:
            _write_record(staging, _all_files(staging), kind="checkpoint", global_step=step,
                          finished=bool(self.control.should_training_stop), settings=self._resume_settings())
            if os.path.exists(final):  # a resume from an earlier step reached this one again
                _remove_dir(final)
            os.rename(staging, final)
            _fsync_dir(run_dir)
            self._rotate_complete_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)

    def _rotate_complete_checkpoints(self, run_dir: str) -> None:
        """Keep ``save_total_limit`` complete checkpoints, the latest and the best among them; directories
        without a record are not counted and left alone."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        complete = [os.path.normpath(path) for path in checkpoint_dirs(run_dir)
                    if os.path.isfile(os.path.join(path, RECORD_NAME))]
        if len(complete) <= limit:
            return
        protected = {complete[-1]}
        if self.state.best_model_checkpoint is not None:
            protected.add(os.path.normpath(self.state.best_model_checkpoint))
        excess = len(complete) - max(limit, len(protected & set(complete)))
        for path in complete:
            if excess <= 0:
                break
            if path not in protected:
                _remove_dir(path)
                excess -= 1

    def _load_best_model(self) -> None:
        verify_checkpoint(self.state.best_model_checkpoint)
        super()._load_best_model()
