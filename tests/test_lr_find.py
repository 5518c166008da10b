"""The ZO learning-rate finder against a hand-written engine loop on the same batches."""

import math

import torch

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.lr_find import find_learning_rate, format_lr_find
from zo_trainer.zo import ZOEstimator, ZOSGD

from conftest import random_token_dataset, tiny_llama


def trainer_for(tmp_path, **settings):
    args = ZOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", disable_tqdm=True,
                    use_cpu=True, seed=0, zo_num_queries=2, **settings)
    return ZOTrainer(model=tiny_llama(), args=args, train_dataset=random_token_dataset(n=16))


def test_each_rate_is_a_short_zo_run_and_the_weights_come_back(tmp_path):
    trainer = trainer_for(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = find_learning_rate(trainer, learning_rates=[1e-3, 3e-3, 1e6], steps=10, num_batches=2)
    assert [run["learning_rate"] for run in result["runs"]] == [1e-3, 3e-3, 1e6]
    assert result["runs"][2]["diverged"]  # pinned at the uniform prediction: its estimates are exactly 0
    assert result["recommended"] == min(result["runs"][:2], key=lambda run: run["loss"])["learning_rate"]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n

    # the same 10 steps at 3e-3 by hand: the engine's loop over the trainer's first two batches, in order
    model = tiny_llama()
    batches = [b for b in trainer.get_train_dataloader()][:2]  # the Trainer's own order (its sampler's seed)
    estimator = ZOEstimator(model, eps=1e-3, num_queries=2, seed=0)
    optimizer = ZOSGD(list(model.parameters()), estimator, lr=3e-3)
    for step in range(10):
        batch = batches[step % 2]
        optimizer.accumulate(estimator.probe(lambda: model(**batch).loss, step))
        optimizer.step()
    with torch.no_grad():
        by_hand = sum(model(**batch).loss.item() for batch in batches) / 2
    assert math.isclose(result["runs"][1]["loss"], by_hand, rel_tol=1e-5)
    assert result["runs"][1]["drop"] > 0
    table = format_lr_find(result).splitlines()
    assert sum("<- recommended" in line for line in table) == 1 and "diverged" in table[-1]


def test_the_finder_uses_the_configured_zo_optimizer(tmp_path):
    plain = find_learning_rate(trainer_for(tmp_path / "a"), learning_rates=[1e-3], steps=3, num_batches=1)
    adam = find_learning_rate(trainer_for(tmp_path / "b", zo_optimizer="adam"), learning_rates=[1e-3], steps=3,
                              num_batches=1)
    assert plain["initial_loss"] == adam["initial_loss"] and plain["runs"][0]["loss"] != adam["runs"][0]["loss"]
