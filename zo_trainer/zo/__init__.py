"""The ZO engine: plain PyTorch, no transformers import, usable in any training loop.

    estimator = ZOEstimator(model, eps=1e-3, num_queries=4, seed=0)
    optimizer = ZOSGD(model.parameters(), estimator, lr=1e-4)
    for step, batch in enumerate(loader):
        probe = estimator.probe(lambda: model(**batch).loss, step)  # 2q forwards, no backward
        optimizer.accumulate(probe)
        optimizer.step()
"""

from .directions import DISTRIBUTIONS, Addition, DirectionSampler, direction_seed
from .optim import STEP_RULES, PendingEstimate, ZOAdam, ZOHiZOO, ZOOptimizer, ZOSGD, ZOSign
from .spsa import ESTIMATORS, REDUCTIONS, Probe, ZOEstimator

__all__ = [
    "DISTRIBUTIONS", "ESTIMATORS", "REDUCTIONS", "STEP_RULES", "Addition", "DirectionSampler", "PendingEstimate",
    "Probe", "ZOAdam", "ZOEstimator", "ZOHiZOO", "ZOOptimizer", "ZOSGD", "ZOSign", "direction_seed",
]
