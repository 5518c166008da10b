"""report_to="tensorboard": the ZO statistics land in the event file as scalars, read back with TensorBoard's reader."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from zo_trainer import ZOConfig, ZOTrainer

from conftest import random_token_dataset, tiny_llama

ZO_SCALARS = ["forward_passes", "zo_projected_grad", "zo_projected_grad_abs", "zo_skipped_updates", "block_index",
              "block_start", "trainable_parameters", "communicated_bytes", "loss"]


def test_zo_statistics_are_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    schedule = [{"name": "layer{i}", "parameters": ["model.layers.{i}.*"], "repeat_over": "model.layers", "steps": 2}]
    args = ZOConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                    report_to="tensorboard", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                    zo_num_queries=2, block_schedule=schedule)
    trainer = ZOTrainer(model=tiny_llama(hidden=32), args=args, train_dataset=random_token_dataset(n=16))
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ZO_SCALARS:
        written = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert written == [(entry["step"], pytest.approx(entry[key], rel=1e-6)) for entry in logged], key
    assert [e.value for e in events.Scalars("train/block_index")] == [0, 0, 1, 1]
    assert [e.value for e in events.Scalars("train/forward_passes")] == [4, 8, 12, 16]
