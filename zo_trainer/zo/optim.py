"""ZO optimizers: the update of a ZO step as a ``torch.optim.Optimizer``, driven by the usual loop.

Being an Optimizer is what lets the Trainer's LR scheduler, gradient accumulation boundary and
checkpointing drive them unchanged. Each step has two parts:

- a **step rule** turns the probes' statistics into the weights c_k of ``g = Σ_k c_k z_k``:
  ``gradient`` (SPSA: c_k = projected gradient), ``newton`` (the paper's Theorem 1 along each direction:
  c_k = (zᵀg)/(zᵀHz), the exact line-search step on a quadratic, from one more forward per step) or
  ``normalized`` (c_k = projected gradient / its running RMS: the step no longer depends on the scale
  of the loss, as in Adam-style ZO) or ``spread`` (FZOO's: c_k = projected gradient · ε/σ, σ the standard
  deviation of the step's perturbed losses; q ≥ 2);
- an **update** applies g: `ZOSGD` (in place, optionally with momentum, from a buffer or rebuilt from the
  last K steps' seeds at no memory), `ZOAdam` (two buffers), `ZOSign` (the sign of g, or of its momentum) or
  `ZOHiZOO` (HiZOO's diagonal-Hessian preconditioner: directions and step scaled entry by entry).

Memory above the weights: ZOSGD 0 (momentum: one buffer in ``state_dtype``; rebuilt momentum: K·q scalars);
ZOAdam two buffers and one tensor-sized temporary; ZOSign one temporary (and a buffer with momentum); ZOHiZOO
one buffer and two temporaries of one tensor's size.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from . import sharding
from .spsa import Probe, ZOEstimator

STEP_RULES = ("gradient", "newton", "normalized", "spread")


class PendingEstimate:
    """What the probes since the last update measured, each micro-batch weighted by its share: the projected
    gradients (row 0), the curvatures along each direction where the estimator measures them (row 1), then the
    perturbed losses L+ (and L−) of each query. Every row is linear in the losses, so the weighted sum over
    micro-batches, and the mean (data-parallel) or sum (query-parallel) over processes, are those of the whole batch."""

    def __init__(self):
        self.step: int | None = None
        self.values: torch.Tensor | None = None  # shape (rows, q)

    def add(self, probe: Probe, weight: float = 1.0) -> None:
        if self.step is not None and probe.step != self.step:
            raise ValueError(
                f"probe of step {probe.step} cannot join the pending estimate of step {self.step}: "
                "the micro-batches of one update must share their directions"
            )
        curvatures = [] if probe.curvatures is None else [probe.curvatures]
        weighted = torch.stack([probe.projected_grads, *curvatures, *probe.perturbed_losses]) * weight
        self.step = probe.step
        self.values = weighted if self.values is None else self.values + weighted

    def clear(self) -> None:
        self.step, self.values = None, None


class ZOOptimizer(torch.optim.Optimizer):
    """The shared part of the ZO optimizers: accumulate probes, apply a step rule, keep the state exact on resume.

    Call :meth:`accumulate` once per micro-batch (weight = its share of the batch), then :meth:`step` once.
    Parameters must be the trainable parameters the probes perturbed.

    ``newton_max_step`` bounds the Newton step along a direction (|c_k| ≤ it, in units of z); directions whose
    curvature is not above ``newton_min_curvature`` are not moved along (a safeguard: the quadratic model has
    no minimum there). ``normalize_beta`` is the decay of the running mean of squared projected gradients of the
    ``normalized`` rule.
    """

    def __init__(self, params, estimator: ZOEstimator, defaults: dict, step_rule: str = "gradient",
                 newton_max_step: float = 1e-2, newton_min_curvature: float = 0.0, normalize_beta: float = 0.99):
        # the settings alone are checked by the subclass's constructor (`check_settings`); these need the estimator
        if step_rule == "spread" and estimator.num_queries < 2:
            raise ValueError(f"step_rule='spread' divides by the spread of a step's perturbed losses: it needs "
                             f"num_queries >= 2, got {estimator.num_queries} (one query would give its sign)")
        if step_rule == "newton" and not estimator.curvature:
            raise ValueError("step_rule='newton' needs the curvature along each direction: ZOEstimator(curvature=True)")
        super().__init__(params, defaults)
        self.estimator = estimator
        self.step_rule = step_rule
        self.newton_max_step, self.newton_min_curvature = newton_max_step, newton_min_curvature
        self.normalize_beta = normalize_beta
        self.pending = PendingEstimate()
        self.rule_state = {"mean_square": 0.0, "updates": 0}  # the normalized rule's running moment
        self.last_step: dict[str, float] = {}  # what the last step's rule did, for the logs

    @classmethod
    def check_settings(cls, lr: float = 1e-3, weight_decay: float = 0.0, step_rule: str = "gradient",
                       newton_max_step: float = 1e-2, normalize_beta: float = 0.99, **_) -> None:
        """Raises ValueError naming the first setting the optimizer refuses, each as ``argument=value``: the
        constructor's checks but those that need the estimator, so that `ZOConfig` runs them before any model
        exists, in its own terms. Settings a class does not check (state_dtype, newton_min_curvature) are taken and
        ignored, so the constructor's keyword arguments can be passed as they are."""
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule={step_rule!r} is not supported; choose one of {list(STEP_RULES)}")
        if not (isinstance(newton_max_step, (int, float)) and math.isfinite(newton_max_step) and newton_max_step > 0):
            raise ValueError(f"newton_max_step={newton_max_step!r} must be a finite number > 0")
        if not 0.0 <= normalize_beta < 1.0:
            raise ValueError(f"normalize_beta={normalize_beta!r} must lie in [0, 1)")

    def accumulate(self, probe: Probe, weight: float = 1.0) -> None:
        """Add ``weight ×`` the statistics of ``probe`` (same step as earlier probes)."""
        self.pending.add(probe, weight)

    def discard(self) -> None:
        """Drop the pending estimate (a skipped update)."""
        self.pending.clear()

    def coefficients(self, values: torch.Tensor) -> torch.Tensor:
        """The weights c_k of g = Σ_k c_k z_k under the step rule (the query reduction applied)."""
        projected, perturbed_losses = values[0], values[1 + self.estimator.curvature:]
        if self.step_rule == "newton":
            curvature = values[1]
            usable = curvature > self.newton_min_curvature
            steps = torch.where(usable, projected / torch.where(usable, curvature, 1.0), 0.0)
            steps = steps.clamp(-self.newton_max_step, self.newton_max_step)
            self.last_step = {"zo_curvature": curvature.mean().item(), "zo_newton_step": steps.abs().mean().item(),
                              "zo_nonpositive_curvature": float((~usable).sum())}
            return self.estimator.coefficients(steps)
        if self.step_rule == "normalized":
            beta, state = self.normalize_beta, self.rule_state
            state["updates"] += 1
            state["mean_square"] = beta * state["mean_square"] + (1 - beta) * projected.square().mean().item()
            rms = math.sqrt(state["mean_square"] / (1 - beta ** state["updates"]))
            self.last_step = {"zo_projected_grad_rms": rms}
            return self.estimator.coefficients(projected / rms if rms > 0 else projected * 0.0)
        if self.step_rule == "spread":  # FZOO: lr·(L_k − L0)/σ along z_k, i.e. the projected gradient · ε/σ
            spread = perturbed_losses.std().item()
            self.last_step = {"zo_loss_spread": spread}
            return self.estimator.coefficients(projected * (self.estimator.eps / spread) if spread > 0 else projected * 0.0)
        return self.estimator.coefficients(projected)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure: the loss is evaluated by ZOEstimator.probe")
        if self.pending.values is None:  # nothing estimated (a skipped update): nothing moves
            return None
        step, values = self.pending.step, self.pending.values
        self.pending.clear()
        sharding.reshard(self.estimator.model)  # FSDP2's root stays whole after a forward: the update writes the shards
        self._update(step, self.coefficients(values), values)
        return None

    def _update(self, step: int, coefficients: torch.Tensor, values: torch.Tensor) -> None:
        """Apply g = Σ_k c_k z_k(step) to the trainable parameters, a param group at a time (``values``: the
        estimate's rows, for an update that reads more than the coefficients)."""
        for group, params in self._groups():
            self._update_group(step, coefficients, group, params)

    def _update_group(self, step: int, coefficients: torch.Tensor, group: dict, params: list) -> None:
        raise NotImplementedError

    def _groups(self):
        """(param group, its trainable parameters) for each group that has some."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                yield group, params

    def _materialise(self, step: int, coefficients: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """g of one parameter in a float32 (or float64) tensor of its own: one parameter-sized temporary at a time."""
        g = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))  # sharded like p
        self.estimator.add_directions(step, coefficients, [p], [g])
        return g

    def state_dict(self):
        state = super().state_dict()
        state["zo"] = {"rule_state": dict(self.rule_state), **self._extra_state()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        # torch casts the loaded buffers to their parameter's dtype: a state_dtype buffer keeps its own
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = self.state[p][key].to(value.dtype)
        if extra is not None:
            self.rule_state = dict(extra.pop("rule_state"))
            self._load_extra_state(extra)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


class ZOSGD(ZOOptimizer):
    """``p ← p − lr·(m + wd·p)`` with ``m = β·m + g`` (``m = g`` without momentum), g the ZO estimate.

    ``momentum_history`` K > 0 rebuilds m from the last K steps' (seed, coefficients) pairs instead of keeping a
    buffer: ``m = Σ_{j<K} β^j g_{t−j}``, the buffer's momentum truncated after K steps, at no memory and K direction
    draws per step (done in one sweep over each tensor). ``state_dtype`` is the buffer's dtype (e.g. bfloat16).
    """

    def __init__(self, params, estimator: ZOEstimator, lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.0, momentum_history: int = 0, state_dtype: torch.dtype | None = None, **rule):
        self.check_settings(lr=lr, weight_decay=weight_decay, momentum=momentum, momentum_history=momentum_history, **rule)
        super().__init__(params, estimator, dict(lr=lr, weight_decay=weight_decay), **rule)
        self.momentum, self.momentum_history, self.state_dtype = momentum, momentum_history, state_dtype
        self.history: deque[tuple[int, torch.Tensor]] = deque(maxlen=momentum_history or None)

    @classmethod
    def check_settings(cls, momentum: float = 0.0, momentum_history: int = 0, **settings) -> None:
        super().check_settings(**settings)
        _check_momentum(momentum)
        if not (isinstance(momentum_history, int) and momentum_history >= 0):
            raise ValueError(f"momentum_history={momentum_history!r} must be an integer >= 0 (0 = a momentum buffer)")
        if momentum_history and not momentum:
            raise ValueError(f"momentum_history={momentum_history} rebuilds the momentum of the last steps: it needs a "
                             f"momentum in (0, 1), got momentum={momentum!r}")

    def _update(self, step, coefficients, values):
        if not self.momentum or self.momentum_history:
            terms = [(step, coefficients)]
            if self.momentum_history:
                self.history.append((step, coefficients))
                terms = [(s, c * self.momentum**j) for j, (s, c) in enumerate(reversed(self.history))]
            trainable = [(p, group["lr"], group["weight_decay"]) for group, params in self._groups() for p in params]
            self.estimator.apply_updates(terms, trainable)
            return
        for group, params in self._groups():
            self._update_with_buffer(step, coefficients, group["lr"], group["weight_decay"], params)

    def _update_with_buffer(self, step, coefficients, lr, weight_decay, params):
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=self.state_dtype or p.dtype)
            buffers.append(state["momentum_buffer"].mul_(self.momentum))
        self.estimator.add_directions(step, coefficients, params, buffers)
        for p, buffer in zip(params, buffers):
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            p.add_(buffer.to(p.dtype), alpha=-lr)

    def _extra_state(self):
        return {"history": [(s, c.cpu()) for s, c in self.history]}

    def _load_extra_state(self, state):
        device = self.param_groups[0]["params"][0].device
        self.history.clear()
        self.history.extend((s, c.to(device)) for s, c in state.get("history", []))


class ZOAdam(ZOOptimizer):
    """AdamW on the ZO estimate: ``m = β1·m + (1−β1)·g``, ``v = β2·v + (1−β2)·g²``, bias-corrected, decoupled
    decay. Two parameter-sized buffers (in ``state_dtype``); g is drawn one parameter at a time."""

    def __init__(self, params, estimator: ZOEstimator, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, state_dtype: torch.dtype | None = None,
                 **rule):
        self.check_settings(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **rule)
        super().__init__(params, estimator, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps), **rule)
        self.state_dtype = state_dtype

    @classmethod
    def check_settings(cls, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **settings) -> None:
        super().check_settings(**settings)
        for i, beta in enumerate(betas):  # named one at a time: a config sets them as two fields
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}]={beta!r} must lie in [0, 1)")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps={eps!r} must be a finite number > 0")

    def _update_group(self, step, coefficients, group, params):
        (beta1, beta2), lr = group["betas"], group["lr"]
        for p in params:
            state = self.state[p]
            if not state:
                dtype = self.state_dtype or p.dtype
                state.update(step=0, exp_avg=torch.zeros_like(p, dtype=dtype), exp_avg_sq=torch.zeros_like(p, dtype=dtype))
            state["step"] += 1
            g = self._materialise(step, coefficients, p)
            exp_avg = state["exp_avg"].lerp_(g.to(state["exp_avg"].dtype), 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denominator = (exp_avg_sq.float() / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.addcdiv_(exp_avg.to(p.dtype), denominator.to(p.dtype), value=-lr / (1 - beta1 ** state["step"]))


class ZOSign(ZOOptimizer):
    """``p ← p − lr·(sign(m) + wd·p)``: sign-ZO, of g itself or of its momentum ``m = β·m + (1−β)·g`` (Signum)."""

    def __init__(self, params, estimator: ZOEstimator, lr: float = 1e-4, weight_decay: float = 0.0,
                 momentum: float = 0.0, state_dtype: torch.dtype | None = None, **rule):
        self.check_settings(lr=lr, weight_decay=weight_decay, momentum=momentum, **rule)
        super().__init__(params, estimator, dict(lr=lr, weight_decay=weight_decay), **rule)
        self.momentum, self.state_dtype = momentum, state_dtype

    @classmethod
    def check_settings(cls, momentum: float = 0.0, **settings) -> None:
        super().check_settings(**settings)
        _check_momentum(momentum)

    def _update_group(self, step, coefficients, group, params):
        for p in params:
            direction = self._materialise(step, coefficients, p)
            if self.momentum:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=self.state_dtype or p.dtype)
                direction = state["momentum_buffer"].lerp_(direction.to(state["momentum_buffer"].dtype), 1 - self.momentum)
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(direction.sign().to(p.dtype), alpha=-group["lr"])


class ZOHiZOO(ZOOptimizer):
    """ZO-SGD preconditioned by a diagonal Hessian estimate: HiZOO's Algorithm 1 (Zhao et al., ICLR 2025).

    With H the diagonal Hessian estimate and s = H^(−1/2) (one buffer, initially 1), the probes perturb along s⊙z
    and the update is ``p ← p − lr·(Σ_k c_k s'⊙z_k + wd·p)``, where s' is s refreshed by this step's curvatures
    along s⊙z_k, D_k = |L+ + L− − 2·L0| / (2ε²):

        H' = (1 − α)·H + α·mean_k D_k·(H ⊙ z_k²),   i.e.   s' = s / sqrt((1 − α) + α·mean_k D_k z_k²)

    so entries of high curvature are perturbed and moved less. α is ``hessian_smooth`` (HiZOO's Hessian_smooth;
    0 keeps s = 1, plain ZO-SGD). It needs the estimator's L0 (``ZOEstimator(curvature=True)``: one more forward per
    step); the buffer is float32 (or ``state_dtype``), the temporaries two of one parameter's size at a time.
    """

    def __init__(self, params, estimator: ZOEstimator, lr: float = 1e-3, weight_decay: float = 0.0,
                 hessian_smooth: float = 1e-2, state_dtype: torch.dtype | None = None, **rule):
        self.check_settings(lr=lr, weight_decay=weight_decay, hessian_smooth=hessian_smooth, **rule)
        if not estimator.curvature:
            raise ValueError("ZOHiZOO refreshes its Hessian estimate from L+ + L− − 2·L0: it needs "
                             "ZOEstimator(curvature=True)")
        super().__init__(params, estimator, dict(lr=lr, weight_decay=weight_decay), **rule)
        self.hessian_smooth, self.state_dtype = hessian_smooth, state_dtype or torch.float32
        estimator.direction_scale = self.scale_of

    @classmethod
    def check_settings(cls, hessian_smooth: float = 1e-2, **settings) -> None:
        super().check_settings(**settings)
        if not (isinstance(hessian_smooth, (int, float)) and 0.0 <= hessian_smooth < 1.0):
            raise ValueError(f"hessian_smooth={hessian_smooth!r} must lie in [0, 1)")

    def scale_of(self, p: torch.Tensor) -> torch.Tensor:
        """s = H^(−1/2) of ``p``: the probes' multiplier of z."""
        state = self.state[p]
        if "scale" not in state:
            state["scale"] = torch.ones_like(p, dtype=self.state_dtype)
        return state["scale"]

    def _update(self, step, coefficients, values):
        weights = (values[1].abs() / 2 / self.estimator.num_queries).tolist()  # D_k / q
        total, count = 0.0, 0
        for group, params in self._groups():
            for p in params:
                scale = self.scale_of(p)
                if self.hessian_smooth:
                    scale.mul_(self._mean_square_term(step, weights, p).mul_(self.hessian_smooth)
                               .add_(1.0 - self.hessian_smooth).rsqrt_().to(scale.dtype))
                total, count = total + scale.sum(dtype=torch.float64), count + scale.numel()  # read once, below
                g = self._materialise(step, coefficients, p).mul_(scale)
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(g.to(p.dtype), alpha=-group["lr"])
        self.last_step = {**self.last_step, "zo_hizoo_scale": float(total) / max(count, 1)}  # the mean of s: 1 at first

    def _mean_square_term(self, step: int, weights: list[float], p: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[k]·z_k² of one parameter, each z_k drawn into one temporary."""
        total, z = (torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for _ in range(2))
        for k, weight in enumerate(weights):
            if weight:
                one_hot = torch.zeros(self.estimator.num_queries, dtype=torch.float64)
                one_hot[k] = 1.0
                self.estimator.add_directions(step, one_hot, [p], [z.zero_()])
                total.addcmul_(z, z, value=weight)
        return total


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r} must lie in [0, 1)")
