"""ZO-SGD as a ``torch.optim.Optimizer``: the update of a ZO step, driven by the usual loop.

Being an Optimizer is what lets the Trainer's LR scheduler, gradient accumulation boundary and
checkpointing drive it unchanged. It keeps no state: the pending estimate is q scalars, applied at
``step()`` by redrawing the directions from their seeds.
"""

from __future__ import annotations

import torch

from .spsa import Probe, ZOEstimator


class ZOSGD(torch.optim.Optimizer):
    """``p ← p − lr·(g + wd·p)`` with the SPSA estimate g of the probes accumulated since the last step.

    Call :meth:`accumulate` once per micro-batch (weight = its share of the batch), then
    :meth:`step` once. Parameters must be the trainable parameters the probes perturbed.
    """

    def __init__(self, params, estimator: ZOEstimator, lr: float = 1e-3, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.estimator = estimator
        self.pending_step: int | None = None
        self.pending: torch.Tensor | None = None  # accumulated projected gradients, shape (q,)

    def accumulate(self, probe: Probe, weight: float = 1.0) -> None:
        """Add ``weight ×`` the projected gradients of ``probe`` (same step as earlier probes)."""
        if self.pending_step is not None and probe.step != self.pending_step:
            raise ValueError(
                f"probe of step {probe.step} cannot join the pending estimate of step {self.pending_step}: "
                "the micro-batches of one update must share their directions"
            )
        self.pending_step = probe.step
        weighted = probe.projected_grads * weight
        self.pending = weighted if self.pending is None else self.pending + weighted

    def discard(self) -> None:
        """Drop the pending estimate (a skipped update)."""
        self.pending_step, self.pending = None, None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZOSGD.step takes no closure: the loss is evaluated by ZOEstimator.probe")
        if self.pending is None:  # nothing estimated (e.g. a skipped update): only decay would apply
            return None
        trainable = [
            (p, group["lr"], group["weight_decay"])
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad
        ]
        self.estimator.apply_update(self.pending_step, self.estimator.coefficients(self.pending), trainable)
        self.discard()
        return None
