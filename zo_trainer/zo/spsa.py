"""The SPSA (ZO-SGD) gradient estimate, evaluated with forward passes only.

    g = c · Σ_k (L(θ + ε z_k) − L(θ − ε z_k)) / (2ε) · z_k,   c = 1/q ("mean") or 1 ("sum")

`ZOEstimator.probe` runs the 2q probe forwards of a batch, each inside a `Perturbation` (`perturbation.py`: how a
forward sees ``p ± ε z`` without writing ``p``), with the layers below a trained block computed once per batch
(`prefix.py`). The estimate itself is q scalars, the projected gradients; the update (`apply_update`,
`write_grad`) redraws the same z from seeds (`directions.py`), tile by tile, so nothing parameter-sized is
allocated. Drawing z is the largest cost after the forwards (three draws per query: two probes and the update).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .directions import Addition, DirectionSampler
from .perturbation import CopyArena, Layout, Perturbation, Workspace, flat_view, pieces_of
from .prefix import PrefixReuse
from . import sharding
from .rng import RngState

logger = logging.getLogger(__name__)

ESTIMATORS = ("central", "forward")
REDUCTIONS = ("mean", "sum")

@dataclass
class Probe:
    """What one call of :meth:`ZOEstimator.probe` measured on one batch."""

    step: int
    queries: list[int]
    projected_grads: torch.Tensor  # shape (q,): zero for the queries this call did not evaluate
    losses: torch.Tensor  # every probe loss, in evaluation order (the unperturbed loss first where measured)
    num_forwards: int
    perturbed_losses: torch.Tensor  # shape (2 or 1, q): L+ (and L− for the central estimator), zero where not evaluated
    curvatures: torch.Tensor | None = None  # shape (q,): zᵀHz ≈ (L+ + L− − 2·L0) / ε², where measured

    @property
    def loss(self) -> torch.Tensor:
        """The training loss to report: the mean of the probe losses."""
        return self.losses.mean()


class ZOEstimator:
    """Forward-only gradient estimates for the trainable parameters of ``model``.

    Trainable means ``requires_grad=True`` at the time of the probe, so freezing parameters between
    steps (reduced dimension, blockwise training) shrinks the cost and the noise of the estimate.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 1e-3,
        num_queries: int = 1,
        estimator: str = "central",
        reduction: str = "mean",
        distribution: str = "gaussian",
        correlation: float = 0.0,
        seed: int = 0,
        lowrank_rank: int = 4,
        lowrank_refresh_steps: int = 100,
        curvature: bool = False,
        reuse_prefix: bool = True,
    ):
        self.check_settings(eps, num_queries, estimator, reduction, distribution, correlation, lowrank_rank,
                            lowrank_refresh_steps, curvature)
        compiled = [name or "the model" for name, m in model.named_modules()
                    if hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None]
        if compiled:
            raise ValueError(
                f"{compiled[0]} is compiled (torch.compile): a compiled graph does not see the perturbed copies that "
                "the probes swap into the modules, so its probe losses would ignore the perturbation. Give the "
                "estimator the eager module (`torch.compile(model)._orig_mod`)"
            )
        self.model = model
        self.eps = float(eps)
        self.num_queries = num_queries
        self.estimator = estimator
        self.reduction = reduction
        self.curvature = curvature  # one more forward per probe: the unperturbed loss L0
        self.reuse_prefix = reuse_prefix  # what runs before the first trainable parameter runs once per batch
        self._prefixes: dict[tuple, PrefixReuse] = {}  # trainable ids -> its prefix reuse (kept: its plan)
        self.sampler = DirectionSampler(distribution, correlation, seed, lowrank_rank, lowrank_refresh_steps)
        self._names = {id(p): n for n, p in model.named_parameters()}  # first name of tied parameters
        self._pinned: set[int] = set()  # ids of parameters read outside their module's forward: swapped in throughout
        # p -> a tensor m of p's shape: the probes perturb along m⊙z (a diagonal preconditioner's, `ZOHiZOO`); None: z
        self.direction_scale: Callable[[nn.Parameter], torch.Tensor] | None = None
        # what the probes perturb for the current set of trainable parameters, and what is learned about it
        self._workspace: Workspace | None = None
        self._prepared_updates: dict[tuple, tuple] = {}  # the sampler's prepared in-place updates (`_prepared_update`)


    @staticmethod
    def check_settings(eps: float = 1e-3, num_queries: int = 1, estimator: str = "central", reduction: str = "mean",
                       distribution: str = "gaussian", correlation: float = 0.0, lowrank_rank: int = 4,
                       lowrank_refresh_steps: int = 100, curvature: bool = False, **_) -> None:
        """Raises ValueError naming the first setting the estimator refuses (the constructor's checks, without a
        model: `ZOConfig` runs them before any work, in its own terms); the settings not checked (seed, reuse_prefix) are
        taken and ignored, so the constructor's keyword arguments can be passed as they are."""
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps={eps!r} must be a finite number > 0")
        if isinstance(num_queries, bool) or not (isinstance(num_queries, int) and num_queries >= 1):
            raise ValueError(f"num_queries={num_queries!r} must be an integer >= 1")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not supported; choose one of {ESTIMATORS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not supported; choose one of {REDUCTIONS}")
        if curvature and estimator != "central":
            raise ValueError(f"curvature=True needs the central estimator (L+ and L− about L0), got estimator={estimator!r}")
        DirectionSampler.check_settings(distribution, correlation, lowrank_rank, lowrank_refresh_steps)

    # ----------------------------------------------------------------------------------------- probe
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def probe(self, loss_fn: Callable[[], torch.Tensor], step: int, queries: Iterable[int] | None = None) -> Probe:
        """Evaluate ``loss_fn`` at perturbed weights and return the projected gradients.

        ``loss_fn`` runs the model's forward on one batch and returns a scalar loss. ``queries``
        restricts the evaluation to a subset of the q directions (query-parallel training).
        """
        queries = list(range(self.num_queries)) if queries is None else sorted(queries)
        if not queries or queries[0] < 0 or queries[-1] >= self.num_queries:
            raise ValueError(f"queries={queries} must be a non-empty subset of range({self.num_queries})")
        sharding.reshard(self.model)
        trainable = self.trainable()
        if not trainable:
            raise ValueError("the model has no parameter with requires_grad=True: there is nothing to estimate")
        if any(self._names.get(id(p)) != name for name, p in trainable):  # fully_shard (accelerate's FSDP2) after init
            self._names = {id(p): n for n, p in self.model.named_parameters()}
        if sharding.check(trainable, self.sampler.distribution) and self.direction_scale is not None:
            raise ValueError(f"{trainable[0][0]} is sharded by FSDP2: a preconditioned direction m⊙z (ZOHiZOO) needs m "
                             "whole at each probe forward; train the sharded model with ZOSGD, ZOAdam or ZOSign")
        rng = RngState(trainable[0][1].device)  # the same dropout mask for every probe of this batch
        with_base = self.estimator == "forward" or self.curvature
        prefix = self._prefix_reuse(trainable)
        with prefix.batch() if prefix else contextlib.nullcontext():
            losses = []
            if with_base:
                with prefix.forward({id(p) for _, p in trainable}) if prefix else contextlib.nullcontext():
                    losses.append(_scalar(loss_fn()))
            for k in queries:
                for sign in (+1.0, -1.0) if self.estimator == "central" else (+1.0,):
                    losses.append(self._perturbed_loss(loss_fn, rng, trainable, step, k, sign, prefix))
        sharding.reshard(self.model)  # FSDP2 keeps the root whole after a forward: an update of the shards (any
        # optimizer's) would not reach the next forward
        losses = torch.stack(losses)
        projected = torch.zeros(self.num_queries, dtype=torch.float64, device=losses.device)
        curvatures = None
        probes = losses[1:] if with_base else losses
        if self.estimator == "central":
            projected[queries] = (probes[0::2] - probes[1::2]) / (2 * self.eps)
        else:
            projected[queries] = (probes - losses[0]) / self.eps
        if self.curvature:
            curvatures = torch.zeros_like(projected)
            curvatures[queries] = (probes[0::2] + probes[1::2] - 2 * losses[0]) / self.eps**2
        sides = 2 if self.estimator == "central" else 1
        perturbed = torch.zeros(sides, self.num_queries, dtype=torch.float64, device=losses.device)
        perturbed[:, queries] = probes.view(len(queries), sides).T
        return Probe(
            step=step,
            queries=queries,
            projected_grads=projected,
            losses=losses,
            num_forwards=len(losses),
            perturbed_losses=perturbed,
            curvatures=curvatures,
        )

    def perturbed(self, trainable: list[tuple[str, nn.Parameter]], step: int, query: int, sign: float):
        """Context in which every forward sees ``p + sign·ε·z_query`` for each trainable ``p`` (``m⊙z`` where
        `direction_scale` gives m)."""
        multipliers = None if self.direction_scale is None else {
            id(p): flat_view(self.direction_scale(p)) for _, p in trainable}
        return Perturbation(self._workspace_for(trainable), self.sampler, self._names, trainable, step, query,
                            sign * self.eps, multipliers)

    def _prefix_reuse(self, trainable) -> PrefixReuse | None:
        """The `PrefixReuse` of these trainable parameters (None where reuse is off), kept across batches for what
        it learned about which calls are served."""
        if not self.reuse_prefix:
            return None
        key = tuple(id(p) for _, p in trainable)
        if key not in self._prefixes:
            if len(self._prefixes) >= CopyArena.MAX_VIEWS:
                self._prefixes.clear()
            self._prefixes[key] = PrefixReuse(self.model, [p for _, p in trainable], trainable[0][1].device)
        return self._prefixes[key]

    def _perturbed_loss(self, loss_fn, rng: RngState, trainable, step: int, query: int, sign: float,
                        prefix: PrefixReuse | None = None) -> torch.Tensor:
        """``loss_fn()`` at ``p + sign·ε·z_query``. The hooks perturb a parameter only inside its module's forward,
        so the first probe forward for a set of trainable parameters watches for parameters read outside it
        (DeBERTa's relative position table, read by the encoder; a weight read by a custom loss): those found are
        swapped in for the whole forward from then on, and the forward runs again."""
        while True:
            rng.restore()
            perturbation = self.perturbed(trainable, step, query, sign)
            with perturbation, prefix.forward(perturbation.carriers()) if prefix else contextlib.nullcontext():
                loss = _scalar(loss_fn())
            if not perturbation.read_unperturbed:
                return loss
            self._pinned.update(perturbation.read_unperturbed)
            logger.info("read outside their module's forward: %s; their perturbed copies are swapped in for the whole "
                        "probe forward", ", ".join(map(self.name_of, perturbation.read_unperturbed.values())))
            self._workspace = None  # the layout, the arena and the forward order are rebuilt without them

    # ---------------------------------------------------------------------------------------- update
    def coefficients(self, projected_grads: torch.Tensor) -> torch.Tensor:
        """Per-query weights c_k of g = Σ c_k z_k (the query reduction applied)."""
        return projected_grads / self.num_queries if self.reduction == "mean" else projected_grads.clone()

    @torch.no_grad()
    def apply_update(
        self, step: int, coefficients: torch.Tensor, params: Iterable[tuple[nn.Parameter, float, float]]
    ) -> None:
        """ZO-SGD in place: ``p ← p·(1 − lr·wd) − lr·Σ_k c_k z_k`` for each (p, lr, wd) given.

        z is redrawn tile by tile, so nothing parameter-sized is allocated (see `DirectionSampler.add_to`).
        The parameters of one learning rate share their scales, so they are drawn by one prepared call.
        """
        self.apply_updates([(step, coefficients)], params)

    @torch.no_grad()
    def apply_updates(
        self, terms: list[tuple[int, torch.Tensor]], params: Iterable[tuple[nn.Parameter, float, float]]
    ) -> None:
        """``p ← p·(1 − lr·wd) − lr·Σ_(step, c) Σ_k c_k z_k(step)``: the directions of several steps in one sweep
        (momentum rebuilt from past seeds, `ZOSGD` with ``momentum_history``)."""
        terms = [(step, coefficients.tolist()) for step, coefficients in terms]
        params = list(params)
        if sharding.check([(self._names.get(id(p), "a parameter"), p) for p, _, _ in params], self.sampler.distribution):
            sharding.reshard(self.model)
        by_rate = defaultdict(list)
        for p, lr, weight_decay in params:
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            if lr:
                by_rate[lr].append(p)
        for lr, group in by_rate.items():
            scaled = [(step, {k: -lr * c for k, c in enumerate(coefficients) if c}) for step, coefficients in terms]
            scaled = [(step, scales) for step, scales in scaled if scales]
            whole = [p for p in group if not sharding.is_sharded(p)]
            add = self._prepared_update(whole) if len(scaled) == 1 and whole else None
            if add is not None:
                add(*scaled[0])
            elif scaled and whole:  # flat views of the parameters, in place
                self.sampler.add_sum(scaled, [self._addition(p, {}, p) for p in whole])
            for p in group:
                if sharding.is_sharded(p):
                    self._add_to_shard(p, scaled, p)

    def _add_to_shard(self, p: nn.Parameter, terms: list[tuple[int, dict[int, float]]], target: torch.Tensor) -> None:
        """``target += Σ_(step, scales) Σ_k scales[k]·z_k(p)`` on this process's rows of a sharded ``p`` (and of
        ``target``, sharded alike): the entries of z at the rows' offset in the flat parameter."""
        local, first = sharding.local_rows(target)
        if local.numel():
            for step, scales in terms:
                self.sampler.add_slice(step, self.name_of(p), local, local, first, scales)

    @torch.no_grad()
    def add_directions(
        self, step: int, coefficients: torch.Tensor, params: list[nn.Parameter], targets: list[torch.Tensor]
    ) -> None:
        """``target += Σ_k c_k z_k(p)`` for each parameter and a tensor of its shape (a gradient, a momentum buffer)."""
        scales = {k: c for k, c in enumerate(coefficients.tolist()) if c}
        pairs = list(zip(params, targets))
        self.sampler.add_to(step, [self._addition(p, scales, target) for p, target in pairs if not sharding.is_sharded(p)])
        for p, target in pairs:
            if sharding.is_sharded(p) and scales:
                self._add_to_shard(p, [(step, scales)], target)

    def _prepared_update(self, params: list[nn.Parameter]):
        """The sampler's prepared in-place update of ``params`` (`DirectionSampler.prepare`), kept while the
        parameters keep their storage; None where the sampler has none."""
        key, storage = ("update", *map(id, params)), tuple((p.data_ptr(), p.numel()) for p in params)
        cached = self._prepared_updates.get(key)
        if cached is None or cached[0] != storage:
            if len(self._prepared_updates) >= CopyArena.MAX_VIEWS:
                self._prepared_updates.clear()
            flats = [flat_view(p) for p in params]
            cached = self._prepared_updates[key] = (storage, self.sampler.prepare([self.name_of(p) for p in params],
                                                                                  flats, flats))
        return cached[1]

    @torch.no_grad()
    def write_grad(self, step: int, coefficients: torch.Tensor, params: Iterable[nn.Parameter]) -> None:
        """Materialise g into ``p.grad`` so any torch optimizer can consume it (costs one gradient's memory)."""
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.add_directions(step, coefficients, params, [p.grad for p in params])

    def _workspace_for(self, trainable) -> Workspace:
        """The workspace of ``trainable``'s layout, walked once per set of trainable parameters (the storage is in the
        key: ``p.data = ...`` gives p another). A new one starts afresh what the estimator learns about it: the arena
        of perturbed copies sized for it, the prepared draws and the guess of the forward order."""
        scaled = self.direction_scale is not None  # m⊙z is drawn whole: no rows or blocks of a large weight
        key = (trainable[0][1].device, scaled, *((id(p), p.dtype, p.data_ptr()) for _, p in trainable))
        if self._workspace is None or self._workspace.layout.key != key:
            pieces = lambda module, params: None if scaled else pieces_of(module, params, self.sampler)  # noqa: E731
            layout = Layout.build(self.model, trainable, key, self._pinned, pieces)
            self._workspace, self._prepared_updates = Workspace(layout, trainable[0][1].device), {}
        return self._workspace

    def name_of(self, p: nn.Parameter) -> str:
        return self._names[id(p)]

    def _addition(self, p: nn.Parameter, scales: dict[int, float], source: torch.Tensor, target=None) -> Addition:
        """``target = source + Σ_k scales[k]·z_k(p)`` (in place when no target is given)."""
        source = flat_view(source)
        return Addition(self.name_of(p), p.shape, scales, source, source if target is None else flat_view(target))


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    return loss.detach().reshape(()).double()
