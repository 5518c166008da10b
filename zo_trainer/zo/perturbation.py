"""How a probe forward sees ``p + δ·z`` without writing ``p``: the layout of what is perturbed, and the swaps.

The probes never write the stored weights: each owning module gets its perturbed copies for the duration of its
forward and the originals back afterwards. So the weights are restored exactly by construction, in every dtype
(the in-place ``θ + εz − 2εz + εz`` of MeZO drifts in half precision), a failed forward cannot leave the model
perturbed, and few perturbed copies are alive at a time. Which swap a module gets is decided once per set of
trainable parameters (`Layout`) and carried out per forward by `Perturbation`:

* `_WholeModel`: every copy fits in the arena at once (a few million parameters): one draw, swapped in for the
  whole forward, no hooks;
* `_GroupedCopies`: otherwise a forward pre-hook on each owning module swaps its copies in, drawn a group at a
  time (its own and those of the modules after it, up to ``GROUP_BYTES`` ahead), and a forward hook swaps the
  originals back;
* `_PinnedCopies`: a parameter read outside its module's forward (DeBERTa's relative position table, a loss term)
  would escape the hooks: the first probe forward of a layout watches for such reads (`_StoredReads`), and the
  copies of those found are swapped in for the whole forward from then on;
* `_EmbeddingRows` and `_LinearBlocks`, on CPU with the C kernel, for a plain `nn.Embedding` or `nn.Linear` whose
  weight is over 32 MiB: the embedding perturbs only the rows it looks up, the linear layer (an LM head) multiplies
  by its perturbed weight a block of rows at a time. A tied embedding's full copy, kept from the embedding to the
  LM head, displaced activations in glibc's heap; an LM head's, made afresh at every probe, cost fresh pages each
  time, and where the head outweighs the logits (large vocabularies) it set the peak.

The copies, the rows and the blocks are all carved from one buffer allocated once per layout (`CopyArena`), so a
probe forward asks the heap for nothing more than the same forward without ZO does. The copies of a group that are
in the arena are the same tensors at every forward, so their draw is prepared once (`DirectionSampler.prepare`):
what is left of it between two layers' products is the seeds and the kernel.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import sharding
from .directions import Addition, DirectionSampler

GROUP_BYTES = 4 * 2**20  # perturbed copies drawn ahead of their modules, at most (each draw is a cold call: fewer, larger)
OWN_ALLOCATION_BYTES = 32 * 2**20  # glibc's mmap ceiling: the arena is not sized for modules larger than this
LARGE_WEIGHT_BYTES = OWN_ALLOCATION_BYTES  # embeddings and linear layers above this perturb their weight in pieces
BLOCK_BYTES = 8 * 2**20  # rows of a large linear layer's perturbed weight multiplied at a time (smaller blocks: slower products)


def pieces_of(module: nn.Module, params: list[tuple[str, nn.Parameter]], sampler: DirectionSampler) -> str | None:
    """How ``module`` perturbs its weight without a full copy: "rows" for a plain `nn.Embedding` (its forward is a
    lookup of ``input`` in ``weight``, nothing else), "blocks" for a plain `nn.Linear`; None (a full copy) for any
    other module, for a weight the sampler cannot draw row by row, and for a small weight, cheaper to copy whole
    than to renumber a batch's tokens for or to multiply in blocks."""
    weight = getattr(module, "weight", None)
    if not any(p is weight for _, p in params) or weight.numel() * weight.element_size() <= LARGE_WEIGHT_BYTES \
            or not sampler.can_add_rows(weight):
        return None
    if type(module).forward is nn.Embedding.forward and module.max_norm is None:
        return "rows"
    if type(module).forward is nn.Linear.forward and all(p.dtype == weight.dtype for _, p in params):
        return "blocks"
    return None


@dataclass(frozen=True)
class Layout:
    """What the probes perturb for one set of trainable parameters: built once per set, read by every probe forward
    of it."""

    key: tuple  # the device, and the ids, dtypes and storage of the trainable parameters
    owned: dict[nn.Module, list[tuple[str, nn.Parameter]]]  # module -> its trainable (local name, parameter)
    users: dict[int, int]  # id(p) -> how many owning modules use a full copy of p (tied weights: more than one)
    pieces: dict[nn.Module, str]  # modules that perturb a large weight in pieces: "rows" or "blocks" (`pieces_of`)
    pinned: list[tuple[nn.Module, str, nn.Parameter]]  # read outside their module: swapped in for the whole forward
    flat: dict[int, torch.Tensor]  # id(p) -> the flat view of p that the draws read
    whole: bool  # every perturbed copy fits in the arena at once: swapped in for the whole forward, no hooks
    arena_bytes: int
    sharded: bool  # a parameter is sharded by FSDP2: every owner perturbs what FSDP2 registered (`_ShardedCopies`)

    @classmethod
    def build(cls, model: nn.Module, trainable, key: tuple, pinned_ids: set[int], pieces: Callable) -> Layout:
        owned, users, ids = defaultdict(list), defaultdict(int), {id(p) for _, p in trainable}
        kinds, pinned = {}, []
        sharded = any(sharding.is_sharded(p) for _, p in trainable)
        if sharded:
            pieces, pinned_ids = (lambda module, params: None), set()
        for module in model.modules():
            for local_name, p in module.named_parameters(recurse=False):
                if id(p) in ids and id(p) in pinned_ids:
                    pinned.append((module, local_name, p))
                elif id(p) in ids:
                    owned[module].append((local_name, p))
            kind = pieces(module, owned[module]) if module in owned else None
            if kind:
                kinds[module] = kind
            elif module in owned:
                for _, p in owned[module]:
                    users[id(p)] += 1
        sizes = [sum(p.numel() * p.element_size() for _, p in params)
                 for module, params in owned.items() if module not in kinds]
        largest = max([n for n in sizes if n <= OWN_ALLOCATION_BYTES], default=0)
        blocks = [_block_bytes(module.weight) for module, kind in kinds.items() if kind == "blocks"]
        capacity = max([GROUP_BYTES + largest, *blocks])
        footprint = sum(CopyArena.footprint(p) for _, p in trainable)
        whole = not kinds and footprint <= capacity and not sharded
        flat = {id(p): flat_view(p) for _, p in trainable if not sharding.is_sharded(p)}
        return cls(key, dict(owned), dict(users), kinds, pinned, flat, whole,
                   0 if sharded else footprint if whole else capacity, sharded)


class Workspace:
    """What the probe forwards of one layout share, and what they learn about it; a new layout starts afresh."""

    def __init__(self, layout: Layout, device: torch.device):
        self.layout = layout
        self.arena = CopyArena(layout.arena_bytes, device)  # sized for the layout's perturbed copies
        self.forward_order: list[nn.Module] = list(layout.owned)  # the owners, in the order the last forward ran them
        self.enclosing: set[nn.Module] = set()  # owners whose forward was seen to run other owners'
        self.checked = False  # a probe forward was watched for reads outside the modules and found none
        self._prepared: dict[tuple, object] = {}  # the sampler's prepared draws of the arena's copies

    def prepared(self, key: tuple, prepare: Callable[[], object]):
        """The prepared call cached under ``key`` (the ids of what it reads and writes, kept alive by the entry)."""
        if key not in self._prepared:
            if len(self._prepared) >= CopyArena.MAX_VIEWS:
                self._prepared.clear()
            self._prepared[key] = prepare()
        return self._prepared[key]


class Perturbation:
    """Context in which every forward of the model sees ``p + δ·z`` for each trainable ``p``; never writes ``p``.

    ``read_unperturbed`` lists, after a watched forward, the parameters read outside their module's forward: the
    estimator pins them (a new layout) and runs the forward again.
    """

    def __init__(self, workspace: Workspace, sampler: DirectionSampler, names: dict[int, str], trainable,
                 step: int, query: int, delta: float, multipliers: dict[int, torch.Tensor] | None = None):
        self.workspace, self.layout, self.sampler, self.names = workspace, workspace.layout, sampler, names
        self.trainable, self.step, self.scales = trainable, step, {query: delta}
        self.multipliers = multipliers  # id(p) -> flat m: the forward sees p + δ·m⊙z (a preconditioner's scaling)
        self.read_unperturbed: dict[int, nn.Parameter] = {}

    def __enter__(self):
        layout = self.layout
        self.hooked: dict[nn.Module, _Swap] = {}  # owner -> the swap its hooks call
        self.fired: dict[nn.Module, None] = {}  # the owners that ran, in order (an ordered set)
        self.running: list[nn.Module] = []  # owners between their pre-hook and their hook
        self.handles, self.watch = [], None
        if layout.whole:
            self.swaps = [_WholeModel(self)]
            self.swaps[0].install()
            return self
        if layout.sharded:
            self.swaps = [_ShardedCopies(self)]
            self.hooked = dict.fromkeys(layout.owned, self.swaps[0])
            self._hook_owners()
            return self
        # a forward set on the instance since (accelerate's hooks) is not the plain one: that module is copied whole
        pieces = {module: kind for module, kind in layout.pieces.items() if "forward" not in vars(module)}
        users = dict(layout.users)
        for module in layout.pieces.keys() - pieces.keys():
            for _, p in layout.owned[module]:
                users[id(p)] = users.get(id(p), 0) + 1
        grouped = _GroupedCopies(self, users, pieces)
        rows, blocks = _EmbeddingRows(self), _LinearBlocks(self, [m for m, kind in pieces.items() if kind == "blocks"])
        self.swaps = [_PinnedCopies(self), grouped, rows, blocks]
        for swap in self.swaps:
            swap.install()
        for module in layout.owned:
            self.hooked[module] = {"rows": rows, "blocks": blocks}.get(pieces.get(module), grouped)
        self._hook_owners()
        if not self.workspace.checked:
            self.watch = _StoredReads({id(p): p for params in layout.owned.values() for _, p in params})
            self.watch.__enter__()
        return self

    def _hook_owners(self) -> None:
        for module in self.hooked:
            self.handles.append(module.register_forward_pre_hook(self._swap_in))
            self.handles.append(module.register_forward_hook(self._swap_out, always_call=True))

    def __exit__(self, *exc):
        if self.watch is not None:
            self.watch.__exit__(*exc)
            self.read_unperturbed = self.watch.found
            self.workspace.checked = not exc[0] and not self.read_unperturbed
        for handle in self.handles:
            handle.remove()
        if self.hooked:
            unseen = [module for module in self.layout.owned if module not in self.fired]
            self.workspace.forward_order = [*self.fired, *unseen]
        for module, params in self.layout.owned.items() if not self.layout.sharded else ():
            for local_name, p in params:  # a forward that raised may have skipped a swap-out
                module._parameters[local_name] = p
        for module, local_name, p in self.layout.pinned:
            module._parameters[local_name] = p
        for swap in self.swaps:
            swap.remove()
        self.workspace.arena.reset()  # no copy outlives the context, also after a forward that raised

    def carriers(self) -> set[int]:
        """Ids of the tensors through which this forward can see the perturbation: the trainable parameters and the
        copies swapped in for the whole forward (the hooks swap the others in only inside their modules)."""
        modules = [*self.layout.owned, *(module for module, _, _ in self.layout.pinned)]
        return {id(p) for _, p in self.trainable} | {id(t) for m in modules for t in m._parameters.values()}

    def _swap_in(self, module, args):
        self.fired[module] = None
        self.workspace.enclosing.update(self.running)  # modules still running enclose this one
        self.running.append(module)
        return self.hooked[module].swap_in(module, args)

    def _swap_out(self, module, args, output):
        if module in self.running:  # else a pre-hook before ours raised: nothing was swapped in
            self.running.remove(module)
            self.hooked[module].swap_out(module)
        return output

    # ----------------------------------------------------------------------- what the swaps share
    def draw(self, pooled: list, own: list) -> None:
        """``flat = p + δz`` for each (p, flat copy): those in the arena by a prepared call, the others by another."""
        add = self._prepared_add(*map(list, zip(*pooled))) if pooled and self.multipliers is None else None
        if add is not None:
            add(self.step, self.scales)
        else:
            own = own + pooled
        if own:
            self.sampler.add_to(self.step, [self._addition(p, flat) for p, flat in own], check=False)

    def _prepared_add(self, params: list[nn.Parameter], flats: list[torch.Tensor]):
        """The sampler's prepared ``flats[i] = p_i + Σ scales·z`` for flat views of the arena, which are the same
        objects at every forward; None where the sampler has none."""
        return self.workspace.prepared((*map(id, params), *map(id, flats)), lambda: self.sampler.prepare(
            [self.names[id(p)] for p in params], [self.layout.flat[id(p)] for p in params], flats))

    def _addition(self, p: nn.Parameter, flat_copy: torch.Tensor) -> Addition:
        """``flat_copy = p + δz``, read from the flat view of ``p`` taken once per layout."""
        multiplier = None if self.multipliers is None else self.multipliers[id(p)]
        return Addition(self.names[id(p)], p.shape, self.scales, self.layout.flat[id(p)], flat_copy, multiplier)

    def perturbed_copy(self, p: nn.Parameter) -> torch.Tensor:
        """``p + δz`` in a tensor of its own (for what the pieces of a large weight cannot serve)."""
        copy, flat = own_copy(p)
        self.sampler.add_to(self.step, [self._addition(p, flat)], check=False)
        return copy

    def stored(self, p: nn.Parameter) -> torch.Tensor:
        """The stored values of ``p``, read through the flat view taken with the owners (a read of ``p`` itself would
        count as an unperturbed read where the forward is watched)."""
        return self.layout.flat[id(p)].view(p.shape)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like`` for a large weight's pieces: from the arena where it fits
        (it is sized for a block, and holds nothing else while a decoder's head runs), else of its own."""
        taken = self.workspace.arena.take(like)
        return empty_like(like) if taken is None else taken[0]

    def give_back(self, piece: torch.Tensor) -> None:
        if self.workspace.arena.holds(piece):
            self.workspace.arena.release()


class _Swap:
    """One way of showing modules their perturbed weights: ``install``/``remove`` around the forward, and, for the
    owning modules it serves through the hooks, ``swap_in`` (may return new positional inputs) and ``swap_out``."""

    def __init__(self, perturbation: Perturbation):
        self.perturbation = perturbation

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def swap_in(self, module: nn.Module, args: tuple):
        return None

    def swap_out(self, module: nn.Module) -> None:
        pass


class _WholeModel(_Swap):
    """Every copy fits in the arena (small models): all drawn by one call and swapped in for the whole context, no
    hooks. It takes no more memory than the groups would, and saves the Python of two hooks per owning module,
    which at 1.3M parameters costs more than the draw."""

    def install(self) -> None:
        perturbation = self.perturbation
        copies, pooled, own = {}, [], []
        for _, p in perturbation.trainable:
            taken = perturbation.workspace.arena.take(p)  # None only for a parameter on another device than the arena
            copies[id(p)], flat = taken or own_copy(p)
            (own if taken is None else pooled).append((p, flat))
        perturbation.draw(pooled, own)
        for module, params in perturbation.layout.owned.items():
            for local_name, p in params:
                module._parameters[local_name] = copies[id(p)]
        for module, local_name, p in perturbation.layout.pinned:
            module._parameters[local_name] = copies[id(p)]


class _PinnedCopies(_Swap):
    """The copies of the parameters read outside their module's forward, each of its own (they outlive every
    group), drawn by one call and swapped in for the whole context."""

    def install(self) -> None:
        pinned = self.perturbation.layout.pinned
        copies = {id(p): (p, *own_copy(p)) for _, _, p in pinned}  # one per parameter, tied ones too
        self.perturbation.draw([], [(p, flat) for p, _, flat in copies.values()])
        for module, local_name, p in pinned:
            module._parameters[local_name] = copies[id(p)][1]


class _GroupedCopies(_Swap):
    """Full copies swapped in around each module's forward, drawn a group at a time: at the first module of a group,
    its own and those of the modules that follow it in the previous forward's order, up to ``GROUP_BYTES`` ahead, in
    one call, into the arena. Why: a call made between two layers' matrix products finds the interpreter's code and
    data evicted from the caches and costs 0.04-0.17 ms more than the same call made warm
    (`benchmarks/bench_directions.py`)."""

    def __init__(self, perturbation: Perturbation, users: dict[int, int], pieces: dict[nn.Module, str]):
        super().__init__(perturbation)
        self.users, self.pieces = users, pieces
        self.owned = perturbation.layout.owned
        self.order = perturbation.workspace.forward_order
        self.position = {module: i for i, module in enumerate(self.order)}
        self.cache: dict[int, tuple[torch.Tensor, int, bool]] = {}  # id(p) -> (perturbed copy, users left, in the arena)
        self.ahead: dict[nn.Module, int] = {}  # module that has not run yet -> bytes of its copies drawn ahead
        self.ahead_bytes = 0

    def remove(self) -> None:
        self.cache.clear()

    def swap_in(self, module, args):
        self.ahead_bytes -= self.ahead.pop(module, 0)
        if any(id(p) not in self.cache for _, p in self.owned[module]):
            self.draw_group(module)
        for local_name, p in self.owned[module]:
            module._parameters[local_name] = self.cache[id(p)][0]

    def swap_out(self, module) -> None:
        for local_name, p in self.owned[module]:
            module._parameters[local_name] = p
            copy, left, pooled = self.cache.pop(id(p))
            if left > 1:
                self.cache[id(p)] = (copy, left - 1, pooled)
            elif pooled:
                self.perturbation.workspace.arena.release()

    def draw_group(self, first: nn.Module) -> None:
        """The missing copies of ``first`` and of the modules after it, in one draw (two where some copies are not in
        the arena: those in it are drawn by a prepared call, even in a group with a tied weight). Copies drawn ahead
        for modules that have not run yet stay under GROUP_BYTES in all, so a wrong guess of the order costs time,
        never memory."""
        workspace, fired = self.perturbation.workspace, self.perturbation.fired
        start = self.position.get(first)
        pooled, own = [], []  # (p, flat copy): in the arena (the same tensors at every forward), or in its own tensor
        for module in [first] if start is None else self.order[start:]:
            missing = [p for _, p in self.owned[module] if id(p) not in self.cache]
            if module is not first and (module in fired or not missing or module in self.pieces):
                continue  # ran already, drawn already, or draws its pieces when it runs
            nbytes = sum(p.numel() * p.element_size() for p in missing)
            if module is not first:
                if self.ahead_bytes + nbytes > GROUP_BYTES:
                    break
                self.ahead[module] = nbytes
                self.ahead_bytes += nbytes
            # a copy that outlives its group (a tied weight's, an enclosing module's) gets its own allocation
            outlives = module in workspace.enclosing
            for p in missing:
                taken = workspace.arena.take(p) if self.users[id(p)] == 1 and not outlives else None
                out, flat = taken or own_copy(p)
                (own if taken is None else pooled).append((p, flat))
                self.cache[id(p)] = (out, self.users[id(p)], taken is not None)
        self.perturbation.draw(pooled, own)


class _ShardedCopies(_Swap):
    """A model sharded by FSDP2 (`sharding`): around each owner's forward, a copy of the whole parameter that FSDP2
    registered for it (all-gathered in its pre-forward hook), plus δz drawn whole, as an unsharded run draws it;
    afterwards what FSDP2 registered goes back, for its post-forward hook to reshard. Each owner draws its own copies
    (what FSDP2 registers is known only inside the forward), and a parameter read outside its module's forward is
    not seen."""

    def __init__(self, perturbation: Perturbation):
        super().__init__(perturbation)
        self.registered: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}  # owner -> what FSDP2 registered

    def remove(self) -> None:
        for module in list(self.registered):  # a forward that raised may have skipped a swap-out
            self.swap_out(module)

    def swap_in(self, module, args):
        perturbation, registered = self.perturbation, []
        for local_name, p in perturbation.layout.owned[module]:
            whole = module._parameters[local_name]
            if sharding.is_sharded(whole):
                raise ValueError(f"{perturbation.names[id(p)]} is still sharded when its module runs: only a forward "
                                 "through the fully_shard-ed model (its root module) gathers the whole parameter")
            copy = empty_like(whole)
            perturbation.sampler.add_to(perturbation.step, [Addition(perturbation.names[id(p)], p.shape,
                                                                     perturbation.scales, flat_view(whole), copy.view(-1))])
            registered.append((local_name, whole))
            module._parameters[local_name] = copy
        self.registered[module] = registered

    def swap_out(self, module) -> None:
        for local_name, whole in self.registered.pop(module, ()):
            module._parameters[local_name] = whole


class _EmbeddingRows(_Swap):
    """A large plain `nn.Embedding` sees only the rows of ``weight + δz`` that its input looks up, renumbered (so
    another forward hook on it sees the renumbered ids)."""

    def __init__(self, perturbation: Perturbation):
        super().__init__(perturbation)
        self.padding: dict[nn.Module, int | None] = {}  # embedding -> its padding_idx, while it looks up rows

    def remove(self) -> None:
        for module, padding_idx in self.padding.items():
            module.padding_idx = padding_idx

    def swap_in(self, module: nn.Embedding, args):
        perturbation = self.perturbation
        weight = perturbation.layout.owned[module][0][1]
        stored = perturbation.stored(weight)
        self.padding[module] = module.padding_idx
        ids, rows = args[0] if args else None, None
        if isinstance(ids, torch.Tensor) and ids.device == weight.device and ids.dtype in (torch.int64, torch.int32) \
                and ids.numel():
            rows, ranks = torch.unique(ids, return_inverse=True)  # sorted
            if rows[0] < 0 or rows[-1] >= weight.shape[0]:
                rows = None
        if rows is None:  # a keyword input, or ids the lookup itself must reject: perturb the whole table
            module._parameters["weight"] = perturbation.perturbed_copy(weight)
            return None
        compact = perturbation.take(stored[: len(rows)])
        perturbation.sampler.add_rows(perturbation.step, perturbation.names[id(weight)], stored, rows.long(), compact,
                                      perturbation.scales)
        module._parameters["weight"] = compact
        module.padding_idx = None  # only the gradient reads it, and it may exceed the rows looked up
        return (ranks, *args[1:])

    def swap_out(self, module) -> None:
        self.perturbation.give_back(module._parameters["weight"])
        module._parameters["weight"] = self.perturbation.layout.owned[module][0][1]
        module.padding_idx = self.padding.pop(module)


class _LinearBlocks(_Swap):
    """A large plain `nn.Linear` (an LM head) runs ``input @ (weight + δz)ᵀ + (bias + δz_b)`` one block of output
    features at a time, each block of rows of the perturbed weight drawn right before its product into one buffer of
    at most ~BLOCK_BYTES, taken from the arena: one allocated at every probe unsettled glibc's heap, whose peak then
    rose by ~40 MiB in more processes than without ZO (`docs/engine.md`, "Memory with glibc"). Each output entry is
    still one dot product of an input row with a perturbed weight row; the BLAS may sum a narrow product in another
    order than a wide one, so the output equals a full copy's to float32 rounding (the tests check it)."""

    def __init__(self, perturbation: Perturbation, modules: list[nn.Linear]):
        super().__init__(perturbation)
        self.forwards = {module: functools.partial(self.multiply_in_blocks, module) for module in modules}

    def install(self) -> None:
        for module, forward in self.forwards.items():
            module.forward = forward

    def remove(self) -> None:
        for module, forward in self.forwards.items():
            if vars(module).get("forward") is forward:  # not one set on top of ours since
                del module.forward

    def multiply_in_blocks(self, module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        perturbation = self.perturbation
        params = dict(perturbation.layout.owned[module])
        weight = params["weight"]  # the stored weight, whatever a nested probe swapped in
        bias = perturbation.perturbed_copy(params["bias"]) if "bias" in params else module.bias
        if not (isinstance(input, torch.Tensor) and input.dtype == weight.dtype and input.device == weight.device
                and input.dim() and input.shape[-1] == weight.shape[1] and input.numel()
                and perturbation.sampler.can_add_rows(weight)
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled(input.device.type)):
            return F.linear(input, perturbation.perturbed_copy(weight), bias)  # what the products into `out` cannot serve
        rows, stored = _block_rows(weight), perturbation.stored(weight)
        block = perturbation.take(stored[:rows])
        out = torch.empty((*input.shape[:-1], weight.shape[0]), dtype=input.dtype, device=input.device)
        inputs, outputs = input.reshape(-1, weight.shape[1]), out.view(-1, weight.shape[0])
        name = perturbation.names[id(weight)]
        for start in range(0, weight.shape[0], rows):
            perturbed = block[: min(rows, weight.shape[0] - start)]
            perturbation.sampler.add_row_block(perturbation.step, name, stored, start, perturbed, perturbation.scales)
            columns = outputs[:, start : start + len(perturbed)]
            if bias is None:
                torch.mm(inputs, perturbed.T, out=columns)
            else:
                torch.addmm(bias[start : start + len(perturbed)], inputs, perturbed.T, out=columns)
        perturbation.give_back(block)
        return out


class CopyArena:
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


def _block_rows(weight: torch.Tensor) -> int:
    """Rows of a large linear layer's perturbed weight multiplied at a time: about equal blocks of at most
    ~BLOCK_BYTES, each a multiple of 16 rows wide (a product of odd width is slower)."""
    blocks = -(-weight.numel() * weight.element_size() // BLOCK_BYTES)
    return -(-weight.shape[0] // blocks // 16) * 16


def _block_bytes(weight: torch.Tensor) -> int:
    return min(_block_rows(weight), weight.shape[0]) * weight[0].numel() * weight.element_size()


def empty_like(p: torch.Tensor) -> torch.Tensor:
    return torch.empty(p.shape, dtype=p.dtype, device=p.device)


def own_copy(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised tensor of its own shaped like ``p``, and its flat view (what `CopyArena.take` returns)."""
    copy = empty_like(p)
    return copy, copy.view(-1)


def flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("zo_trainer needs contiguous parameters (regenerating z walks the flat storage)")
    return t.detach().view(-1)
