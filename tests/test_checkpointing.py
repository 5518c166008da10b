"""Checkpoints complete or skipped, never poisoned, resumed exactly: real files, real processes, real signals.

Run as a script (``python tests/test_checkpointing.py OUT --threads N [--kill-in-save STEP]``) it is the
training process the signal tests start, stop and resume.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from conftest import assert_same, params, random_token_dataset, tiny_llama
from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.checkpointing import (
    PREEMPTED_EXIT_STATUS,
    RECORD_NAME,
    BrokenCheckpointError,
    latest_complete_checkpoint,
    verify_checkpoint,
)

SCRIPT = Path(__file__).resolve()


def config(out, **overrides):
    kwargs = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=2,
        report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True, use_cpu=True, seed=0,
    )
    kwargs.update(overrides)
    return ZOConfig(**kwargs)


def trainer_for(args, model=None, **kwargs):
    return ZOTrainer(model=model or tiny_llama(seed=7), args=args, train_dataset=random_token_dataset(), **kwargs)


def snapshot(directory):
    """Every file under ``directory``: its bytes' sha256 and its mtime."""
    return {
        p.relative_to(directory).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(Path(directory).rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run: checkpoint-2, checkpoint-4 and the final model; and its final weights."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer = trainer_for(config(out))
    trainer.train()
    trainer.save_model()
    return out, params(trainer.model)


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


# ------------------------------------------------------------------------------------ complete or skipped
def test_a_checkpoint_lists_every_file_with_its_checksum(run_copy):
    checkpoint = run_copy / "checkpoint-4"
    record = verify_checkpoint(checkpoint)
    files = {p.name for p in checkpoint.iterdir()} - {RECORD_NAME}
    assert set(record["files"]) == files >= {"model.safetensors", "trainer_state.json", "rng_state.pth", "optimizer.pt"}
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert record["files"]["model.safetensors"]["sha256"] == digest
    assert record["global_step"] == 4 and record["finished"] is True
    assert verify_checkpoint(run_copy / "checkpoint-2")["finished"] is False
    assert not list(run_copy.glob("tmp-*"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the tensor bytes: the file still parses, the weights differ
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model.safetensors": ("model.safetensors", truncate, "has .* bytes"),
    "invalid trainer_state.json": ("trainer_state.json", lambda p: p.write_text("{not json"), "has .* bytes"),
    "corrupted rng_state.pth": ("rng_state.pth", flip_a_bit, "sha256 mismatch"),
    "bit flip in model.safetensors": ("model.safetensors", flip_a_bit, "sha256 mismatch"),
    "missing completion record": (RECORD_NAME, os.remove, f"has no {RECORD_NAME}"),
    "unreadable completion record": (RECORD_NAME, truncate, f"{RECORD_NAME} is unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_skips_a_damaged_latest_checkpoint_and_an_explicit_one_is_an_error(run_copy, finished, caplog, damage):
    name, spoil, reason = DAMAGES[damage]
    spoil(run_copy / "checkpoint-4" / name)

    explicit = f"checkpoint-4.*{reason}.*latest complete checkpoint next to it is .*checkpoint-2"
    with pytest.raises(BrokenCheckpointError, match=explicit):
        trainer_for(config(run_copy)).train(resume_from_checkpoint=str(run_copy / "checkpoint-4"))

    caplog.clear()
    trainer = trainer_for(config(run_copy))
    trainer.train(resume_from_checkpoint=True)  # from checkpoint-2: steps 3 and 4 again
    assert f"Skipping checkpoint {run_copy / 'checkpoint-4'}" in caplog.text and reason.split(".*")[0] in caplog.text
    assert not trainer.resumed_a_finished_run and trainer.state.global_step == 4
    assert_same(params(trainer.model), finished[1])  # an exact resume rewrote a complete checkpoint-4
    assert latest_complete_checkpoint(run_copy) == str(run_copy / "checkpoint-4")


def test_no_complete_checkpoint_is_an_error(run_copy):
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        os.remove(run_copy / checkpoint / RECORD_NAME)
    with pytest.raises(BrokenCheckpointError, match="no complete checkpoint in output_dir"):
        trainer_for(config(run_copy)).train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------------- never poisoned
class PoisonAtStep(TrainerCallback):
    """Puts one nan into a weight after an optimizer step, as a diverging update would."""

    def __init__(self, step, name):
        self.step, self.name = step, name

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_parameter(self.name).view(-1)[5] = math.nan


def test_non_finite_weights_are_never_written(tmp_path):
    out = tmp_path / "run"
    name = "model.layers.1.mlp.down_proj.weight"
    # the update of step 4 leaves a nan, which no probe has seen yet when checkpoint-4 is due
    trainer = trainer_for(config(out, max_steps=6), callbacks=[PoisonAtStep(4, name)])
    with pytest.raises(RuntimeError, match=rf"step 4: parameter {name} holds 1 non-finite values .*not writing "
                                           rf"checkpoint-4.*latest complete checkpoint.*is {out / 'checkpoint-2'}"):
        trainer.train()
    with pytest.raises(RuntimeError, match=rf"step 4: parameter {name} .*not writing the model to {out}"):
        trainer.save_model()

    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    for weights in out.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")


# -------------------------------------------------------------------------------------- exact resumes
def test_resuming_a_finished_run_changes_nothing(run_copy, finished):
    before = snapshot(run_copy)
    for resume in (True, str(run_copy / "checkpoint-4")):
        trainer = trainer_for(config(run_copy))
        output = trainer.train(resume_from_checkpoint=resume)
        assert trainer.resumed_a_finished_run and output.global_step == trainer.state.global_step == 4
        assert_same(params(trainer.model), finished[1])
        assert snapshot(run_copy) == before


def test_changed_settings_are_listed_and_refused_unless_allowed(run_copy, caplog):
    changed = config(run_copy, learning_rate=2e-2, zo_num_queries=2)
    with pytest.raises(ValueError, match=r"learning_rate: 0\.01 \(saved\) -> 0\.02 \(now\)\n  zo_num_queries: 1 .*-> 2 "
                                         r"[\s\S]*resume_allow_changes=True"):
        trainer_for(changed).train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    changed.resume_allow_changes = True
    trainer = trainer_for(changed)
    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))
    assert "zo_num_queries: 1 (saved) -> 2 (now)" in caplog.text
    logged = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    assert logged[-1] == pytest.approx(2e-2 * (1 - 3 / 4))  # the new rate, on the run's linear schedule


def test_the_same_global_batch_split_differently_resumes(run_copy, finished, caplog):
    caplog.set_level("INFO", logger="zo_trainer.checkpointing")
    trainer = trainer_for(config(run_copy, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))
    assert "per_device_train_batch_size: 4 (saved) -> 2 (now)" in caplog.text
    for n, p in trainer.model.named_parameters():  # the same steps, summed in another order
        torch.testing.assert_close(p, finished[1][n], rtol=0, atol=1e-4)


def test_a_finished_run_trains_on_only_with_a_larger_max_steps_allowed(run_copy):
    longer = config(run_copy, max_steps=5)
    with pytest.raises(ValueError, match=r"max_steps: 4 \(saved\) -> 5 \(now\)"):
        trainer_for(longer).train(resume_from_checkpoint=True)
    longer.resume_allow_changes = True
    trainer = trainer_for(longer)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 5 and not trainer.resumed_a_finished_run


def test_an_output_dir_holding_a_run_is_refused_unless_overwritten(run_copy):
    with pytest.raises(FileExistsError, match=rf"output_dir {run_copy} already holds the final model of a finished "
                                              "run .* and 2 checkpoint\\(s\\), the latest checkpoint-4"):
        trainer_for(config(run_copy)).train()
    args = config(run_copy, max_steps=1, save_strategy="no")
    args.overwrite_output_dir = True
    trainer_for(args).train()
    assert not (run_copy / "checkpoint-4").exists() and not (run_copy / "model.safetensors").exists()
    assert not (run_copy / RECORD_NAME).exists()


def test_rotation_keeps_the_best_and_the_latest_complete_checkpoints(tmp_path):
    args = config(tmp_path / "run", max_steps=5, save_steps=1, save_total_limit=2, eval_strategy="steps",
                  eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer = trainer_for(args, eval_dataset=random_token_dataset(n=8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    kept = {os.path.basename(p) for p in map(str, (tmp_path / "run").glob("checkpoint-*"))}
    assert kept == {"checkpoint-5", os.path.basename(best)} and best != str(tmp_path / "run" / "checkpoint-5")
    for checkpoint in kept:
        verify_checkpoint(tmp_path / "run" / checkpoint)
    state = json.loads((tmp_path / "run" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == best


# ------------------------------------------------------------------------------------- real processes
def preemption_config(out, **overrides):
    """12 steps of 2 accumulated batches of 4: the run crosses an epoch (64 rows, 8 steps)."""
    settings = dict(max_steps=12, gradient_accumulation_steps=2, save_strategy="no", zo_num_queries=2, logging_steps=5)
    return config(out, **{**settings, **overrides})


def preemption_model():
    return tiny_llama(vocab_size=128, hidden=32, layers=2, seed=0)


class Dawdle(TrainerCallback):
    """Between the micro-batches of a step: says it is running (a file) and gives a signal time to arrive."""

    def __init__(self, marker):
        self.marker = marker

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step >= 3:
            Path(self.marker).touch()
        time.sleep(0.2)


class KillInSave(ZOTrainer):
    """Killed outright (SIGKILL) halfway through writing a checkpoint: the model is written, the rest is not."""

    kill_at = None

    def _save_rng_state(self, output_dir):
        if self.state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_rng_state(output_dir)


def train_in_this_process(out, resume=None, trainer_class=ZOTrainer, dawdle=False, **overrides):
    trainer = trainer_class(model=preemption_model(), args=preemption_config(out, **overrides),
                            train_dataset=random_token_dataset(vocab_size=128),
                            callbacks=[Dawdle(out / "running")] if dawdle else [])
    trainer.train(resume_from_checkpoint=resume)
    return params(trainer.model)


def start(out, *flags):
    """This file as a training script, with this process's thread count (float sums depend on it)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--threads", str(torch.get_num_threads()), *flags],
                            cwd=SCRIPT.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train_in_this_process(tmp_path_factory.mktemp("straight") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_and_the_resume_equals_a_straight_run(tmp_path, straight, signum):
    out = tmp_path / "run"
    process = start(out)
    deadline = time.monotonic() + 120
    while not (out / "running").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    time.sleep(0.1)
    process.send_signal(signum)  # relayed at once, as accelerate launch does: still the same request
    log, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_STATUS, log[-3000:]

    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 3 <= step < 12, log[-3000:]
    assert f"{signal.Signals(signum).name}: stopped after step {step} and wrote {checkpoint}" in log
    assert verify_checkpoint(checkpoint)["finished"] is False
    assert_same(train_in_this_process(out, resume=True), straight)


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_no_checkpoint_to_mistake(tmp_path, straight):
    out = tmp_path / "run"
    process = start(out, "--kill-in-save", "4")
    log, _ = process.communicate(timeout=180)
    assert process.returncode == -signal.SIGKILL, log[-3000:]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert (out / "tmp-checkpoint-4" / "model.safetensors").is_file()
    assert get_last_checkpoint(out) == latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert_same(train_in_this_process(out, resume=True, save_strategy="steps", save_steps=2), straight)
    assert not (out / "tmp-checkpoint-4").exists()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--kill-in-save", type=int, default=None)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.kill_in_save is None:
        train_in_this_process(cli.out, dawdle=True)
    else:
        KillInSave.kill_at = cli.kill_in_save
        train_in_this_process(cli.out, trainer_class=KillInSave, save_strategy="steps", save_steps=2)
