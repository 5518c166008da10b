"""The SPSA (ZO-SGD) gradient estimate, evaluated with forward passes only.

    g = c · Σ_k (L(θ + ε z_k) − L(θ − ε z_k)) / (2ε) · z_k,   c = 1/q ("mean") or 1 ("sum")

The probes never write the stored weights: a forward pre-hook on each module that owns trainable
parameters swaps in ``p ± ε z`` for the duration of that module's forward and swaps the original back
afterwards. So the weights are restored exactly by construction, in every dtype (the in-place
``θ + εz − 2εz + εz`` of MeZO drifts in half precision), a failed forward cannot leave the model
perturbed, and few perturbed copies are alive at a time: the running module's and at most 4 MiB drawn
ahead for the modules after it (tied weights excepted: their copy is kept from the first user to the
last, so they are drawn once per forward). A model whose copies all fit in that space (a few million
parameters) has them drawn at once and swapped in for the whole forward, without hooks. A parameter read
outside its module's forward (DeBERTa's relative position table, a loss term) would escape the hooks: the
first probe forward for each set of trainable parameters watches for such reads (`_StoredReads`), and the
copies of those found are swapped in for the whole forward from then on.

On CPU with the C kernel, a plain `nn.Embedding` or `nn.Linear` whose weight is over 32 MiB does not
copy it whole: an embedding perturbs only the rows it looks up, a linear layer (an LM head) multiplies
by its perturbed weight a block of rows at a time (each falls back to a full copy where its pieces
cannot serve: see `_pieces`, `_look_up_perturbed_rows`, `_multiply_in_blocks`). A tied embedding's full
copy, kept from the embedding to the LM head, displaced activations in glibc's heap; an LM head's, made
afresh at every probe, cost fresh pages each time, and where the head outweighs the logits (large
vocabularies) it set the peak. The copies, the rows and the blocks are all carved from one buffer
allocated once (`_CopyArena`), so a probe forward asks the heap for nothing more than the same forward
without ZO does.

The estimate itself is q scalars, the projected gradients; the update redraws the same z from seeds.

Drawing z is the largest cost after the forwards (three draws per query: two probes and the update);
`DirectionSampler.add_to` draws it on every core (on CPU tile by tile, fused with the add), for a
group of modules per call. The copies of a group that are in the arena are the same tensors at every
forward, so their call is prepared once (`DirectionSampler.prepare`): what is left of it between two
layers' products is the seeds and the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .directions import Addition, DirectionSampler
from .prefix import PrefixReuse
from .rng import RngState

logger = logging.getLogger(__name__)

ESTIMATORS = ("central", "forward")
REDUCTIONS = ("mean", "sum")
GROUP_BYTES = 4 * 2**20  # perturbed copies drawn ahead of their modules, at most (each draw is a cold call: fewer, larger)
OWN_ALLOCATION_BYTES = 32 * 2**20  # glibc's mmap ceiling: the arena is not sized for modules larger than this
LARGE_WEIGHT_BYTES = OWN_ALLOCATION_BYTES  # embeddings and linear layers above this perturb their weight in pieces
BLOCK_BYTES = 8 * 2**20  # rows of a large linear layer's perturbed weight multiplied at a time (smaller blocks: slower products)


@dataclass
class Probe:
    """What one call of :meth:`ZOEstimator.probe` measured on one batch."""

    step: int
    queries: list[int]
    projected_grads: torch.Tensor  # shape (q,): zero for the queries this call did not evaluate
    losses: torch.Tensor  # every probe loss, in evaluation order (the unperturbed loss first where measured)
    num_forwards: int
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
        # what the probes perturb for the current set of trainable parameters, and what is learned about it (reset
        # with each new layout by `_layout_for`)
        self._layout: _Layout | None = None
        self._arena: _CopyArena | None = None  # sized for the layout's perturbed copies
        self._checked: _Layout | None = None  # the layout whose probe forward was watched for reads outside modules
        self._prepared: dict[tuple, object] = {}  # prepared draws: a probe's groups (_prepared_add), updates (_prepared_update)
        self._forward_order: list[nn.Module] = []  # owning modules in the order the last probe forward ran them
        self._enclosing: set[nn.Module] = set()  # owners whose forward was seen to run other owners'


    @staticmethod
    def check_settings(eps: float = 1e-3, num_queries: int = 1, estimator: str = "central", reduction: str = "mean",
                       distribution: str = "gaussian", correlation: float = 0.0, lowrank_rank: int = 4,
                       lowrank_refresh_steps: int = 100, curvature: bool = False, **_) -> None:
        """Raises ValueError naming the first setting the estimator refuses (the constructor's checks, without a
        model: `ZOConfig` runs them before any work, in its own terms); the settings not checked (seed, reuse_prefix) are
        taken and ignored, so the constructor's keyword arguments can be passed as they are."""
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps={eps!r} must be a finite number > 0")
        if not (isinstance(num_queries, int) and num_queries >= 1):
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
        trainable = self.trainable()
        if not trainable:
            raise ValueError("the model has no parameter with requires_grad=True: there is nothing to estimate")
        _refuse_sharded(trainable)
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
        return Probe(
            step=step,
            queries=queries,
            projected_grads=projected,
            losses=losses,
            num_forwards=len(losses),
            curvatures=curvatures,
        )

    def perturbed(self, trainable: list[tuple[str, nn.Parameter]], step: int, query: int, sign: float):
        """Context in which every forward sees ``p + sign·ε·z_query`` for each trainable ``p``."""
        return _Perturbation(self, trainable, step, query, sign * self.eps)

    def _prefix_reuse(self, trainable) -> PrefixReuse | None:
        """The `PrefixReuse` of these trainable parameters (None where reuse is off), kept across batches for what
        it learned about which calls are served."""
        if not self.reuse_prefix:
            return None
        key = tuple(id(p) for _, p in trainable)
        if key not in self._prefixes:
            if len(self._prefixes) >= _CopyArena.MAX_VIEWS:
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
            self._layout = None  # the layout, the arena and the forward order are rebuilt without them

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
        _refuse_sharded([(self._names.get(id(p), "a parameter"), p) for p, _, _ in params])
        by_rate = defaultdict(list)
        for p, lr, weight_decay in params:
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            if lr:
                by_rate[lr].append(p)
        for lr, group in by_rate.items():
            scaled = [(step, {k: -lr * c for k, c in enumerate(coefficients) if c}) for step, coefficients in terms]
            scaled = [(step, scales) for step, scales in scaled if scales]
            add = self._prepared_update(group) if len(scaled) == 1 else None
            if add is not None:
                add(*scaled[0])
            elif scaled:  # flat views of the parameters, in place
                self.sampler.add_sum(scaled, [self._addition(p, {}, p) for p in group])

    @torch.no_grad()
    def add_directions(
        self, step: int, coefficients: torch.Tensor, params: list[nn.Parameter], targets: list[torch.Tensor]
    ) -> None:
        """``target += Σ_k c_k z_k(p)`` for each parameter and a tensor of its shape (a gradient, a momentum buffer)."""
        scales = {k: c for k, c in enumerate(coefficients.tolist()) if c}
        self.sampler.add_to(step, [self._addition(p, scales, target) for p, target in zip(params, targets)])

    def _prepared_update(self, params: list[nn.Parameter]):
        """The sampler's prepared in-place update of ``params`` (`DirectionSampler.prepare`), kept while the
        parameters keep their storage; None where the sampler has none."""
        key, storage = ("update", *map(id, params)), tuple((p.data_ptr(), p.numel()) for p in params)
        cached = self._prepared.get(key)
        if cached is None or cached[0] != storage:
            if len(self._prepared) >= _CopyArena.MAX_VIEWS:
                self._prepared.clear()
            flats = [_flat_view(p) for p in params]
            cached = self._prepared[key] = (storage, self.sampler.prepare([self.name_of(p) for p in params], flats, flats))
        return cached[1]

    @torch.no_grad()
    def write_grad(self, step: int, coefficients: torch.Tensor, params: Iterable[nn.Parameter]) -> None:
        """Materialise g into ``p.grad`` so any torch optimizer can consume it (costs one gradient's memory)."""
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.add_directions(step, coefficients, params, [p.grad for p in params])

    def _layout_for(self, trainable) -> _Layout:
        """The layout of ``trainable``, walked once per set of trainable parameters (the storage is in the key:
        ``p.data = ...`` gives p another). A new one starts afresh what the estimator learns about it: the arena of
        perturbed copies sized for it, the prepared draws and the guess of the forward order."""
        key = (trainable[0][1].device, *((id(p), p.dtype, p.data_ptr()) for _, p in trainable))  # the arena's device
        if self._layout is None or self._layout.key != key:
            self._layout = _Layout.build(self.model, trainable, key, self._pinned, self._pieces)
            self._arena = _CopyArena(self._layout.arena_bytes, trainable[0][1].device)
            self._prepared = {}
            self._forward_order = list(self._layout.owned)  # until a probe forward records the real order
            self._enclosing = set()
        return self._layout

    def _prepared_add(self, params: list[nn.Parameter], flats: list[torch.Tensor]):
        """The sampler's prepared ``flats[i] = p_i + Σ scales·z`` (`DirectionSampler.prepare`) for flat views of the
        arena, which are the same objects at every forward; None where the sampler has none."""
        key = (*map(id, params), *map(id, flats))  # the entry keeps both alive: no id is reused while it is cached
        if key not in self._prepared:
            if len(self._prepared) >= _CopyArena.MAX_VIEWS:
                self._prepared.clear()
            self._prepared[key] = self.sampler.prepare([self.name_of(p) for p in params],
                                                       [self._layout.flat[id(p)] for p in params], flats)
        return self._prepared[key]

    def _pieces(self, module: nn.Module, params: list[tuple[str, nn.Parameter]]) -> str | None:
        """How ``module`` perturbs its weight without a full copy: "rows" for a plain `nn.Embedding` (its forward
        is a lookup of ``input`` in ``weight``, nothing else), "blocks" for a plain `nn.Linear`; None (a full copy)
        for any other module, for a weight the sampler cannot draw row by row, and for a small weight, cheaper to
        copy whole than to renumber a batch's tokens for or to multiply in blocks."""
        weight = getattr(module, "weight", None)
        if not any(p is weight for _, p in params) or weight.numel() * weight.element_size() <= LARGE_WEIGHT_BYTES \
                or not self.sampler.can_add_rows(weight):
            return None
        if type(module).forward is nn.Embedding.forward and module.max_norm is None:
            return "rows"
        if type(module).forward is nn.Linear.forward and all(p.dtype == weight.dtype for _, p in params):
            return "blocks"
        return None

    def name_of(self, p: nn.Parameter) -> str:
        return self._names[id(p)]

    def _addition(self, p: nn.Parameter, scales: dict[int, float], source: torch.Tensor, target=None) -> Addition:
        """``target = source + Σ_k scales[k]·z_k(p)`` (in place when no target is given)."""
        source = _flat_view(source)
        return Addition(self.name_of(p), p.shape, scales, source, source if target is None else _flat_view(target))


class _Perturbation:
    """Swaps ``p + δ·z`` into each owning module around its forward; never writes ``p`` itself.

    The copies are drawn a group at a time: at the first module of a group, its own and those of the
    modules that follow it in the previous forward's order, up to ``GROUP_BYTES`` ahead, in one call,
    into the estimator's `_CopyArena` (all at once, without hooks, where they all fit in it).
    Why: a call made between two layers' matrix products finds the interpreter's code and data evicted
    from the caches and costs 0.04-0.17 ms more than the same call made warm (`benchmarks/bench_directions.py`).
    """

    def __init__(self, estimator: ZOEstimator, trainable, step: int, query: int, delta: float):
        self.estimator, self.step, self.query, self.delta = estimator, step, query, delta
        self.scales = {query: delta}
        self.trainable = trainable

    def __enter__(self):
        self.layout = layout = self.estimator._layout_for(self.trainable)
        self.owned, self.users, pieces, self.pinned = layout.owned, layout.users, layout.pieces, layout.pinned
        # a forward set on the instance since (accelerate's hooks) is not the plain one: that module is copied whole
        self.pieces = {module: kind for module, kind in pieces.items() if "forward" not in vars(module)}
        if len(self.pieces) < len(pieces):
            self.users = dict(self.users)
            for module in pieces.keys() - self.pieces.keys():
                for _, p in self.owned[module]:
                    self.users[id(p)] = self.users.get(id(p), 0) + 1
        self.cache: dict[int, tuple[torch.Tensor, int, bool]] = {}  # id(p) -> (perturbed copy, users left, in the arena)
        self.order = self.estimator._forward_order
        self.position = {module: i for i, module in enumerate(self.order)}
        self.fired: dict[nn.Module, None] = {}  # the owners that ran, in order (an ordered set)
        self.running: list[nn.Module] = []  # modules between their pre-hook and their hook
        self.ahead: dict[nn.Module, int] = {}  # module that has not run yet -> bytes of its copies drawn ahead
        self.ahead_bytes = 0
        self.padding: dict[nn.Module, int | None] = {}  # embedding -> its padding_idx, while it looks up rows
        self.handles = []
        self.forwards = {}
        self.read_unperturbed: dict[int, nn.Parameter] = {}  # filled where this forward is watched (`_StoredReads`)
        self.watch = None
        if layout.whole:
            self._swap_in_everything()
            return self
        self._swap_in_pinned()
        for module in self.owned:
            self.handles.append(module.register_forward_pre_hook(self._swap_in))
            self.handles.append(module.register_forward_hook(self._swap_out, always_call=True))
        self.forwards = {module: functools.partial(self._multiply_in_blocks, module)
                         for module, kind in self.pieces.items() if kind == "blocks"}
        for module, forward in self.forwards.items():
            module.forward = forward
        if self.estimator._checked is not layout:
            self.watch = _StoredReads({id(p): p for params in self.owned.values() for _, p in params})
            self.watch.__enter__()
        return self

    def __exit__(self, *exc):
        if self.watch is not None:
            self.watch.__exit__(*exc)
            self.read_unperturbed = self.watch.found
            if not exc[0] and not self.read_unperturbed:
                self.estimator._checked = self.layout
        for handle in self.handles:
            handle.remove()
        for module, params in self.owned.items():  # a forward that raised may have skipped a swap-out
            for local_name, p in params:
                module._parameters[local_name] = p
        for module, local_name, p in self.pinned:
            module._parameters[local_name] = p
        for module, padding_idx in self.padding.items():
            module.padding_idx = padding_idx
        self.cache.clear()
        self.estimator._arena.reset()  # no copy outlives the context, also after a forward that raised
        unseen = [module for module in self.owned if module not in self.fired]
        self.estimator._forward_order = [*self.fired, *unseen]
        for module, forward in self.forwards.items():
            if vars(module).get("forward") is forward:  # not one set on top of ours since
                del module.forward

    def carriers(self) -> set[int]:
        """Ids of the tensors through which this forward can see the perturbation: the trainable parameters and the
        copies swapped in for the whole forward (the hooks swap the others in only inside their modules)."""
        modules = [*self.owned, *(module for module, _, _ in self.pinned)]
        return {id(p) for _, p in self.trainable} | {id(t) for m in modules for t in m._parameters.values()}

    def _swap_in_everything(self) -> None:
        """Where every copy fits in the arena (small models): all drawn by one call and swapped in for the whole
        context, no hooks. It takes no more memory than the groups would, and saves the Python of two hooks per
        owning module, which at 1.3M parameters costs more than the draw."""
        copies, pooled, own = {}, [], []
        for _, p in self.trainable:
            taken = self.estimator._arena.take(p)  # None only for a parameter on another device than the arena
            copies[id(p)], flat = taken or _own_copy(p)
            (own if taken is None else pooled).append((p, flat))
        self._draw(pooled, own)
        for module, params in self.owned.items():
            for local_name, p in params:
                module._parameters[local_name] = copies[id(p)]
        for module, local_name, p in self.pinned:
            module._parameters[local_name] = copies[id(p)]

    def _swap_in_pinned(self) -> None:
        """The copies of the parameters read outside their module's forward, each of its own (they outlive every
        group), drawn by one call and swapped in for the whole context."""
        copies = {id(p): (p, *_own_copy(p)) for _, _, p in self.pinned}  # one per parameter, tied ones too
        self._draw([], [(p, flat) for p, _, flat in copies.values()])
        for module, local_name, p in self.pinned:
            module._parameters[local_name] = copies[id(p)][1]

    def _swap_in(self, module, args):
        self.fired[module] = None
        self.estimator._enclosing.update(self.running)  # modules still running enclose this one
        self.running.append(module)
        self.ahead_bytes -= self.ahead.pop(module, 0)
        if self.pieces.get(module) == "rows":
            return self._look_up_perturbed_rows(module, args)
        if self.pieces.get(module) == "blocks":
            return None  # its forward draws the blocks
        if any(id(p) not in self.cache for _, p in self.owned[module]):
            self._draw_group(module)
        for local_name, p in self.owned[module]:
            module._parameters[local_name] = self.cache[id(p)][0]

    def _look_up_perturbed_rows(self, module: nn.Embedding, args):
        """The embedding's forward sees only the rows of ``weight + δz`` that its input looks up, renumbered
        (so another forward hook on it sees the renumbered ids)."""
        weight = self.owned[module][0][1]
        stored = self._stored(weight)
        self.padding[module] = module.padding_idx
        ids, rows = args[0] if args else None, None
        if isinstance(ids, torch.Tensor) and ids.device == weight.device and ids.dtype in (torch.int64, torch.int32) \
                and ids.numel():
            rows, ranks = torch.unique(ids, return_inverse=True)  # sorted
            if rows[0] < 0 or rows[-1] >= weight.shape[0]:
                rows = None
        if rows is None:  # a keyword input, or ids the lookup itself must reject: perturb the whole table
            module._parameters["weight"] = self._perturbed_copy(weight)
            return None
        compact = self._take(stored[: len(rows)])
        self.estimator.sampler.add_rows(self.step, self.estimator.name_of(weight), stored, rows.long(), compact,
                                        self.scales)
        module._parameters["weight"] = compact
        module.padding_idx = None  # only the gradient reads it, and it may exceed the rows looked up
        return (ranks, *args[1:])

    def _multiply_in_blocks(self, module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        """The forward of a large `nn.Linear` in the probe: ``input @ (weight + δz)ᵀ + (bias + δz_b)``, one block of
        output features at a time, each block of rows of the perturbed weight drawn right before its product into one
        buffer of at most ~BLOCK_BYTES, taken from the arena (`_take`): one allocated at every probe unsettled
        glibc's heap, whose peak then rose by ~40 MiB in more processes than without ZO (`docs/engine.md`, "Memory
        with glibc").
        Each output entry is still one dot product of an input row with a perturbed weight row; the BLAS may sum
        a narrow product in another order than a wide one, so the output equals a full copy's to float32 rounding
        (the tests check it)."""
        params = dict(self.owned[module])
        weight = params["weight"]  # the stored weight, whatever a nested probe swapped in
        bias = self._perturbed_copy(params["bias"]) if "bias" in params else module.bias
        if not (isinstance(input, torch.Tensor) and input.dtype == weight.dtype and input.device == weight.device
                and input.dim() and input.shape[-1] == weight.shape[1] and input.numel()
                and self.estimator.sampler.can_add_rows(weight)
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled(input.device.type)):
            return F.linear(input, self._perturbed_copy(weight), bias)  # what the products into `out` cannot serve
        rows, stored = _block_rows(weight), self._stored(weight)
        block = self._take(stored[:rows])
        out = torch.empty((*input.shape[:-1], weight.shape[0]), dtype=input.dtype, device=input.device)
        inputs, outputs = input.reshape(-1, weight.shape[1]), out.view(-1, weight.shape[0])
        name = self.estimator.name_of(weight)
        for start in range(0, weight.shape[0], rows):
            perturbed = block[: min(rows, weight.shape[0] - start)]
            self.estimator.sampler.add_row_block(self.step, name, stored, start, perturbed, self.scales)
            columns = outputs[:, start : start + len(perturbed)]
            if bias is None:
                torch.mm(inputs, perturbed.T, out=columns)
            else:
                torch.addmm(bias[start : start + len(perturbed)], inputs, perturbed.T, out=columns)
        self._give_back(block)
        return out

    def _stored(self, p: nn.Parameter) -> torch.Tensor:
        """The stored values of ``p``, read through the flat view taken with the owners (a read of ``p`` itself would
        count as an unperturbed read where the forward is watched)."""
        return self.layout.flat[id(p)].view(p.shape)

    def _take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like`` for a large weight's pieces: from the arena where it fits
        (it is sized for a block, and holds nothing else while a decoder's head runs), else of its own."""
        taken = self.estimator._arena.take(like)
        return _empty_like(like) if taken is None else taken[0]

    def _give_back(self, piece: torch.Tensor) -> None:
        if self.estimator._arena.holds(piece):
            self.estimator._arena.release()

    def _perturbed_copy(self, p: nn.Parameter) -> torch.Tensor:
        """``p + δz`` in a tensor of its own (for what the pieces of a large weight cannot serve)."""
        copy, flat = _own_copy(p)
        self.estimator.sampler.add_to(self.step, [self._addition(p, flat)], check=False)
        return copy

    def _addition(self, p: nn.Parameter, flat_copy: torch.Tensor) -> Addition:
        """``flat_copy = p + δz``, read from the flat view of ``p`` taken once per set of trainable parameters."""
        return Addition(self.estimator.name_of(p), p.shape, self.scales, self.layout.flat[id(p)], flat_copy)

    def _swap_out(self, module, args, output):
        if module not in self.running:  # a pre-hook before ours raised: nothing was swapped in
            return output
        self.running.remove(module)
        if self.pieces.get(module) == "rows":
            self._give_back(module._parameters["weight"])
            module._parameters["weight"] = self.owned[module][0][1]
            module.padding_idx = self.padding.pop(module)
            return output
        if self.pieces.get(module) == "blocks":
            return output
        for local_name, p in self.owned[module]:
            module._parameters[local_name] = p
            copy, left, pooled = self.cache.pop(id(p))
            if left > 1:
                self.cache[id(p)] = (copy, left - 1, pooled)
            elif pooled:
                self.estimator._arena.release()
        return output

    def _draw_group(self, first: nn.Module) -> None:
        """The missing copies of ``first`` and of the modules after it, in one draw (two where some copies are not in
        the arena: those in it are drawn by a prepared call, even in a group with a tied weight). Copies drawn ahead for
        modules that have not run yet stay under GROUP_BYTES in all, so a wrong guess of the order costs
        time, never memory."""
        start = self.position.get(first)
        pooled, own = [], []  # (p, flat copy): in the arena (the same tensors at every forward), or in its own tensor
        for module in [first] if start is None else self.order[start:]:
            missing = [p for _, p in self.owned[module] if id(p) not in self.cache]
            if module is not first and (module in self.fired or not missing or module in self.pieces):
                continue  # ran already, drawn already, or draws its pieces when it runs
            nbytes = sum(p.numel() * p.element_size() for p in missing)
            if module is not first:
                if self.ahead_bytes + nbytes > GROUP_BYTES:
                    break
                self.ahead[module] = nbytes
                self.ahead_bytes += nbytes
            # a copy that outlives its group (a tied weight's, an enclosing module's) gets its own allocation
            outlives = module in self.estimator._enclosing
            for p in missing:
                taken = self.estimator._arena.take(p) if self.users[id(p)] == 1 and not outlives else None
                out, flat = taken or _own_copy(p)
                (own if taken is None else pooled).append((p, flat))
                self.cache[id(p)] = (out, self.users[id(p)], taken is not None)
        self._draw(pooled, own)

    def _draw(self, pooled: list, own: list) -> None:
        """``flat = p + δz`` for each (p, flat copy): those in the arena by a prepared call, the others by another."""
        add = self.estimator._prepared_add(*map(list, zip(*pooled))) if pooled else None
        if add is not None:
            add(self.step, self.scales)
        else:
            own = own + pooled
        if own:
            self.estimator.sampler.add_to(self.step, [self._addition(p, flat) for p, flat in own], check=False)


@dataclass(frozen=True)
class _Layout:
    """What the probes perturb for one set of trainable parameters: built once per set (`ZOEstimator._layout_for`),
    read by every probe forward of it."""

    key: tuple  # the device, and the ids, dtypes and storage of the trainable parameters
    owned: dict[nn.Module, list[tuple[str, nn.Parameter]]]  # module -> its trainable (local name, parameter)
    users: dict[int, int]  # id(p) -> how many owning modules use a full copy of p (tied weights: more than one)
    pieces: dict[nn.Module, str]  # modules that perturb a large weight in pieces: "rows" or "blocks" (`_pieces`)
    pinned: list[tuple[nn.Module, str, nn.Parameter]]  # read outside their module: swapped in for the whole forward
    flat: dict[int, torch.Tensor]  # id(p) -> the flat view of p that the draws read
    whole: bool  # every perturbed copy fits in the arena at once: swapped in for the whole forward, no hooks
    arena_bytes: int

    @classmethod
    def build(cls, model: nn.Module, trainable, key: tuple, pinned_ids: set[int], pieces_of) -> _Layout:
        owned, users, ids = defaultdict(list), defaultdict(int), {id(p) for _, p in trainable}
        pieces, pinned = {}, []
        for module in model.modules():
            for local_name, p in module.named_parameters(recurse=False):
                if id(p) in ids and id(p) in pinned_ids:
                    pinned.append((module, local_name, p))
                elif id(p) in ids:
                    owned[module].append((local_name, p))
            kind = pieces_of(module, owned[module]) if module in owned else None
            if kind:
                pieces[module] = kind
            elif module in owned:
                for _, p in owned[module]:
                    users[id(p)] += 1
        sizes = [sum(p.numel() * p.element_size() for _, p in params)
                 for module, params in owned.items() if module not in pieces]
        largest = max([n for n in sizes if n <= OWN_ALLOCATION_BYTES], default=0)
        blocks = [_block_bytes(module.weight) for module, kind in pieces.items() if kind == "blocks"]
        capacity = max([GROUP_BYTES + largest, *blocks])
        footprint = sum(_CopyArena.footprint(p) for _, p in trainable)
        whole = not pieces and footprint <= capacity
        return cls(key, dict(owned), dict(users), pieces, pinned, {id(p): _flat_view(p) for _, p in trainable}, whole,
                   footprint if whole else capacity)


class _CopyArena:
    """One buffer, allocated once, from which the perturbed copies of each group are carved in turn.

    Allocating each copy afresh at every forward would fragment glibc's heap (below its mmap ceiling) or
    pay page faults and zero-filling (above it). Copies are taken and released in forward order, so the
    buffer empties between groups: once every copy it holds is released, the next starts at offset 0.
    Copies that would keep it from emptying (tied weights, modules that enclose other owners) are not
    taken from it, and a copy that does not fit gets its own allocation.
    """

    ALIGN = 64  # bytes: each copy starts on a cache line
    MAX_VIEWS = 4096  # views kept for reuse; a forward order that keeps changing (routed experts) starts afresh

    def __init__(self, nbytes: int, device: torch.device):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.offset = self.live = 0
        self.views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # the same copies recur at every forward

    @classmethod
    def footprint(cls, like: torch.Tensor) -> int:
        """Bytes that taking a tensor shaped like ``like`` uses up at most (its size, aligned)."""
        return -(-like.numel() * like.element_size() // cls.ALIGN) * cls.ALIGN

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An uninitialised tensor shaped like ``like``, and its flat view; None where it does not fit."""
        nbytes = like.numel() * like.element_size()
        start = -(-self.offset // self.ALIGN) * self.ALIGN
        if like.device != self.buffer.device or start + nbytes > self.buffer.numel():
            return None
        self.offset, self.live = start + nbytes, self.live + 1
        key = (start, like.shape, like.dtype)
        if key not in self.views:
            if len(self.views) >= self.MAX_VIEWS:
                self.views.clear()
            flat = self.buffer[start : start + nbytes].view(like.dtype)
            self.views[key] = flat.view(like.shape), flat
        return self.views[key]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was taken from this arena."""
        start = self.buffer.data_ptr()
        return start <= t.data_ptr() < start + self.buffer.numel()

    def reset(self) -> None:
        self.offset = self.live = 0

    def release(self) -> None:
        """One of the copies taken is no longer used."""
        self.live -= 1
        if not self.live:
            self.reset()


class _StoredReads(TorchFunctionMode):
    """Records the parameters of ``params`` that a torch function reads while the context is on. In a probe forward
    on the hook path, each owning module sees its copies instead, so a read of a parameter itself is one that
    the hooks leave unperturbed. Metadata (a dtype, a shape) is no read: only calls that return a tensor count."""

    def __init__(self, params: dict[int, nn.Parameter]):
        super().__init__()
        self.params = params
        self.found: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, nn.Parameter) and self.params.get(id(leaf)) is leaf:
                    self.found[id(leaf)] = leaf
        return out


def _refuse_sharded(named: list[tuple[str, torch.Tensor]]) -> None:
    """A clear error for sharded parameters (FSDP2's `fully_shard`, tensor parallelism), which the probes and updates
    would read as whole local tensors."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None) if torch.distributed.is_available() \
        else None
    sharded = [name for name, p in named if dtensor is not None and isinstance(p, dtensor)]
    if sharded:
        raise ValueError(
            f"{sharded[0]} is a DTensor (sharded by FSDP2's fully_shard or by tensor parallelism): the ZO engine "
            "perturbs and updates whole tensors and does not take sharded parameters. Give every process the whole "
            "model and split the work with data- or query-parallel ZO (ZOConfig.zo_parallel, or each process probing "
            "its share of the queries: ZOEstimator.probe(queries=...))")


def _block_rows(weight: torch.Tensor) -> int:
    """Rows of a large linear layer's perturbed weight multiplied at a time: about equal blocks of at most
    ~BLOCK_BYTES, each a multiple of 16 rows wide (a product of odd width is slower)."""
    blocks = -(-weight.numel() * weight.element_size() // BLOCK_BYTES)
    return -(-weight.shape[0] // blocks // 16) * 16


def _block_bytes(weight: torch.Tensor) -> int:
    return min(_block_rows(weight), weight.shape[0]) * weight[0].numel() * weight.element_size()


def _empty_like(p: torch.Tensor) -> torch.Tensor:
    return torch.empty(p.shape, dtype=p.dtype, device=p.device)


def _own_copy(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised tensor of its own shaped like ``p``, and its flat view (what `_CopyArena.take` returns)."""
    copy = _empty_like(p)
    return copy, copy.view(-1)


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("zo_trainer needs contiguous parameters (regenerating z walks the flat storage)")
    return t.detach().view(-1)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    return loss.detach().reshape(()).double()
