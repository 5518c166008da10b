"""A ZO learning-rate finder: short runs from the same weights on the same few batches, one per learning rate.

ZO learning rates do not carry over from first-order ones (the estimate's scale grows with the number of
trainable parameters unless a step rule normalises it), so guessing costs whole runs. The finder runs the
trainer's own ZO method for ``steps`` steps at each learning rate of a log grid, on ``num_batches`` batches of
its training data in turn, and measures the loss on those batches before and after (unperturbed forwards).
It recommends the learning rate whose run ended lowest; a run whose loss rose or stopped being finite, or
whose last estimate is exactly zero (a saturated model: too large a step pins the loss), is marked diverged. It measures how fast the method fits a few batches, not generalisation: a starting point for a sweep.
"""

from __future__ import annotations

import math
from itertools import islice

import torch

DEFAULT_GRID = tuple(10.0 ** (e / 2) for e in range(-10, 1))  # 1e-5 ... 1, a factor ~3.2 apart


def find_learning_rate(trainer, learning_rates=DEFAULT_GRID, steps: int = 50, num_batches: int = 4) -> dict:
    """``{"recommended": lr or None, "initial_loss": L, "runs": [{"learning_rate", "loss", "drop", "diverged"}]}``.

    ``trainer`` is a `ZOTrainer` in ZO mode; its model is left with the weights it had.
    """
    if not trainer.uses_zo_optimizer:
        raise ValueError("the learning-rate finder runs the trainer's ZO optimizer: use training_order='zo' and "
                         "zo_write_grad=False")
    learning_rates = sorted(learning_rates)
    if not learning_rates or any(not (math.isfinite(lr) and lr > 0) for lr in learning_rates):
        raise ValueError(f"learning_rates={learning_rates!r} must be finite numbers > 0")
    if steps < 1 or num_batches < 1:
        raise ValueError(f"steps={steps} and num_batches={num_batches} must be >= 1")
    model = trainer.model
    model.train()
    batches = [trainer._prepare_inputs(batch) for batch in islice(trainer.get_train_dataloader(), num_batches)]
    initial = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls, kwargs = trainer.args.zo_optimizer_cls_and_kwargs()

    def loss_of(batch) -> torch.Tensor:
        with trainer.recording_nothing(), trainer.compute_loss_context_manager():
            return trainer.compute_loss(model, dict(batch))

    @torch.no_grad()
    def loss_on_batches() -> float:
        return sum(loss_of(batch).item() for batch in batches) / len(batches)

    initial_loss, runs = loss_on_batches(), []
    direction_scale = trainer.zo_estimator.direction_scale  # a preconditioner's (ZOHiZOO): each run sets its own
    try:
        for lr in learning_rates:
            model.load_state_dict(initial)
            optimizer = cls(trainable, trainer.zo_estimator, **{**kwargs, "lr": lr})
            diverged = False
            for step in range(steps):
                batch = batches[step % len(batches)]
                probe = trainer.zo_estimator.probe(lambda: loss_of(batch), step)
                if not bool(torch.isfinite(probe.losses).all()):
                    diverged = True
                    break
                optimizer.accumulate(probe)
                optimizer.step()
            loss = math.inf if diverged else loss_on_batches()
            # rose, stopped being finite, or saturated: the last estimate exactly 0 (the loss no longer moves)
            diverged = diverged or not loss <= initial_loss or not bool(probe.projected_grads.any())
            runs.append({"learning_rate": lr, "loss": loss, "drop": initial_loss - loss, "diverged": diverged})
    finally:
        model.load_state_dict(initial)
        trainer.zo_estimator.direction_scale = direction_scale
    finite = [run for run in runs if not run["diverged"]]
    recommended = min(finite, key=lambda run: run["loss"])["learning_rate"] if finite else None
    return {"recommended": recommended, "initial_loss": initial_loss, "steps": steps, "runs": runs}


def format_lr_find(result: dict) -> str:
    """The finder's table, for a terminal."""
    lines = [f"loss on the batches before: {result['initial_loss']:.4f}; {result['steps']} steps per learning rate",
             "learning_rate   loss after   drop"]
    for run in result["runs"]:
        after = "diverged" if run["diverged"] else f"{run['loss']:.4f}     {run['drop']:+.4f}"
        mark = "  <- recommended" if run["learning_rate"] == result["recommended"] else ""
        lines.append(f"{run['learning_rate']:<15.3g} {after}{mark}")
    if result["recommended"] is None:
        lines.append("no learning rate lowered the loss: try more steps or a wider grid")
    return "\n".join(lines)
