"""Blockwise pretraining (paper §3.2, §4, Figures 5–6): freeze and re-initialise callbacks.

A block schedule is an ordered list of blocks; each names its parameters (glob patterns), its length
(``steps`` or ``epochs``), how it learns (``training_order``: "fo" or "zo"), whether it is re-initialised
at its start, and optionally its own ``zo_num_queries`` and ``learning_rate``. One entry with
``repeat_over: model.layers`` expands to one block per child of that ModuleList (``{i}`` in the name and
patterns is replaced by the index), so a layer-wise schedule over a whole Llama is one line of YAML:

    block_schedule:
      - {name: embedding, parameters: ["model.embed_tokens.*"], epochs: 2, training_order: fo}
      - {name: "layer{i}", parameters: ["model.layers.{i}.*"], repeat_over: model.layers, epochs: 1, reinit: true}

The block active at a step is a pure function of the step, so a run resumed in mid-block continues
the same block at the same point (and re-initialises nothing it already trained).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import TrainerCallback

from .zo.directions import direction_seed


def match_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters matching any glob pattern; a pattern that matches nothing is an error.

    A negative index counts from the end of a ModuleList, so ``model.layers.-1.mlp.*`` is the last MLP of a
    Llama of any depth (the same recipe then runs on the paper's model and on a small CPU one).
    """
    names = [n for n, _ in model.named_parameters()]
    matched = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, _resolve_negative_indices(model, pattern))
        if not hits:
            raise ValueError(
                f"parameter pattern {pattern!r} matches no parameter of {type(model).__name__}; names look like "
                f"{names[:3] + names[-2:]}"
            )
        matched.update(hits)
    return [n for n in names if n in matched]


def _resolve_negative_indices(model: nn.Module, pattern: str) -> str:
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part.startswith("-") and part[1:].isdigit():
            prefix = ".".join(parts[:i])
            try:
                container = model.get_submodule(prefix)
            except AttributeError:
                raise ValueError(f"parameter pattern {pattern!r}: {prefix!r} is not a module of the model") from None
            if not isinstance(container, (nn.ModuleList, nn.Sequential)) or -int(part) > len(container):
                raise ValueError(f"parameter pattern {pattern!r}: index {part} does not fit {prefix!r}")
            parts[i] = str(len(container) + int(part))
    return ".".join(parts)


def set_trainable(model: nn.Module, names: list[str]) -> None:
    """``requires_grad`` True for ``names`` and False for everything else."""
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


@dataclass
class Block:
    parameters: list[str]
    name: str = ""
    steps: int | None = None
    epochs: float | None = None
    training_order: str | None = None  # None: the run's training_order
    reinit: bool = False
    zo_num_queries: int | None = None
    learning_rate: float | None = None
    start: int = field(default=0, init=False)  # first optimizer step, set by BlockSchedule.resolve
    end: int = field(default=0, init=False)


class BlockSchedule:
    """The ordered blocks of a run, resolved to optimizer-step ranges once the epoch length is known."""

    def __init__(self, spec: list[dict], model: nn.Module):
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"block_schedule must be a non-empty list of blocks, got {spec!r}")
        self.blocks: list[Block] = []
        for entry in spec:
            self.blocks.extend(_expand(entry, model))
        self.names = {b.name: match_parameters(model, b.parameters) for b in self.blocks}
        self.resolved = False

    @property
    def training_orders(self) -> set[str | None]:
        return {b.training_order for b in self.blocks}

    def resolve(self, steps_per_epoch: int) -> None:
        start = 0
        for block in self.blocks:
            length = block.steps if block.steps is not None else round(block.epochs * steps_per_epoch)
            block.start, block.end = start, start + max(int(length), 1)
            start = block.end
        self.resolved = True

    @property
    def total_steps(self) -> int:
        return self.blocks[-1].end

    def index_at(self, step: int) -> int | None:
        """Index of the block that trains optimizer step ``step`` (None once the schedule is over)."""
        for i, block in enumerate(self.blocks):
            if block.start <= step < block.end:
                return i
        return None


_BLOCK_KEYS = {f.name for f in fields(Block) if f.init} | {"repeat_over"}


def _expand(entry: dict, model: nn.Module) -> list[Block]:
    if not isinstance(entry, dict):
        raise ValueError(f"each block of block_schedule must be a mapping, got {entry!r}")
    unknown = set(entry) - _BLOCK_KEYS
    if unknown:
        raise ValueError(f"unknown block key(s) {sorted(unknown)} in {entry}; allowed: {sorted(_BLOCK_KEYS)}")
    entry = dict(entry)
    if isinstance(entry.get("parameters"), str):
        entry["parameters"] = [entry["parameters"]]
    if not entry.get("parameters"):
        raise ValueError(f"block {entry} needs `parameters`: glob patterns of the parameter names it trains")
    if (entry.get("steps") is None) == (entry.get("epochs") is None):
        raise ValueError(f"block {entry} needs exactly one of `steps` or `epochs`")
    length = entry.get("steps") if entry.get("steps") is not None else entry.get("epochs")
    if not (isinstance(length, (int, float)) and length > 0):
        raise ValueError(f"block {entry} has length {length!r}; it must be > 0")
    if entry.get("training_order") not in (None, "zo", "fo"):
        raise ValueError(f"block {entry} has training_order={entry['training_order']!r}; choose 'zo' or 'fo'")
    over = entry.pop("repeat_over", None)
    if over is None:
        entry.setdefault("name", ",".join(entry["parameters"]))
        return [Block(**entry)]
    container = model.get_submodule(over)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"repeat_over={over!r} must name a ModuleList of the model, got {type(container).__name__}")

    def fill(text: str, i: int) -> str:
        return text.replace("{i}", str(i))

    name = entry.pop("name", f"{over}.{{i}}")
    return [
        Block(**{**entry, "name": fill(name, i), "parameters": [fill(p, i) for p in entry["parameters"]]})
        for i in range(len(container))
    ]


class _BlockCallback(TrainerCallback):
    """Tracks which block is active; subclasses act when a new block begins."""

    def __init__(self, schedule: BlockSchedule):
        self.schedule = schedule
        self.active: int | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not self.schedule.resolved:  # the Trainer's own count of optimizer steps per epoch
            self.schedule.resolve(max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1))
        self.active = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        index = self.schedule.index_at(state.global_step)
        if index is not None and index != self.active:
            block = self.schedule.blocks[index]
            self.begin(index, block, at_start=state.global_step == block.start, model=model, args=args)
            self.active = index

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.schedule.total_steps:
            control.should_training_stop = True  # every block is trained and frozen

    def begin(self, index: int, block: Block, at_start: bool, model, args) -> None:
        raise NotImplementedError


class BlockFreezeCallback(_BlockCallback):
    """At a block's start: freeze everything, unfreeze the block, switch FO/ZO, q and learning rate."""

    def __init__(self, schedule: BlockSchedule, trainer):
        super().__init__(schedule)
        self.trainer = trainer

    def begin(self, index, block, at_start, model, args):
        names = self.schedule.names[block.name]
        set_trainable(self.trainer.model, names)
        self.trainer.enter_block(index, block, names, at_start)


class BlockReinitCallback(_BlockCallback):
    """At a block's first step, re-initialise its parameters with the model's own ``_init_weights``.

    The draw is seeded by (seed, block index), so a resumed run re-initialises exactly as a straight one
    would, and the global RNG (dropout, data order) is left untouched.
    """

    def begin(self, index, block, at_start, model, args):
        if block.reinit and at_start:
            reinitialise_block(_unwrap(model), self.schedule, index, args.seed)


def reinitialise_block(model: nn.Module, schedule: BlockSchedule, index: int, seed: int) -> None:
    """`reinitialise` block ``index`` of ``schedule`` as its start does, seeded by (seed, index): done again, it
    draws the same values (a run re-initialises its first block before measuring the untrained loss)."""
    reinitialise(model, schedule.names[schedule.blocks[index].name], seed=direction_seed(seed, index, 0, "reinit"))


def reinitialise(model: nn.Module, names: list[str], seed: int) -> None:
    """Re-draw the parameters ``names`` with ``model._init_weights``; every other parameter is kept bitwise."""
    params = dict(model.named_parameters())
    targets = {id(params[n]) for n in names}
    owners = [m for m in model.modules() if any(id(p) in targets for p in m.parameters(recurse=False))]
    # _init_weights resets a whole module: keep the module's parameters that are not in the block
    keep = [(p, p.detach().clone()) for m in owners for p in m.parameters(recurse=False) if id(p) not in targets]
    # transformers' init functions skip a tensor flagged as initialised, as every loaded weight is: unflag the block
    flags = [(p, p.__dict__.pop("_is_hf_initialized")) for n in names if "_is_hf_initialized" in (p := params[n]).__dict__]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in owners:
            model._init_weights(module)
        for p, value in keep:
            p.copy_(value)
    for p, flag in flags:
        p._is_hf_initialized = flag


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
