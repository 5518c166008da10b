"""Prefix reuse: what a batch's forward computes before it reads anything perturbed is computed once per batch.

When only a block trains (the paper's last MLP, a layer-wise schedule), every module that runs before the
first read of a trainable parameter sees the same input in all 2q probe forwards of a batch and gives the same
output. `PrefixReuse` records the module calls of the batch's first forward up to that read and serves their
outputs to the batch's other forwards, in place of running them:

* **what is recorded**: the calls that end before the first read of a trainable parameter or of a perturbed copy
  (watched by a `TorchFunctionMode`, so a weight read outside its module counts too), whose module holds no
  trainable parameter, whose inputs and output are tensors, numbers, strings and tuples/lists/dicts of them
  (tuples only in the output: a list a later line appends to cannot be watched), that change no buffer, and that
  mutate none of their inputs; the outermost of these calls are served. A call that drew random numbers (dropout)
  is served with the global RNG state it left, so what runs after it draws the same numbers as without reuse.
* **what is checked when serving**: each served call's inputs equal the recorded ones (the same object, or the
  same shape, dtype, strides and values), its RNG state at entry is the recorded one where it drew random numbers,
  and no tensor the record holds was modified in place since (checked after every forward too). Where a check
  fails the module runs as usual and reuse stops for the batch, with a log line saying why; so probe losses, and
  the weights, are bitwise those of a run without reuse.
* **what is recorded again**: the first batch of a set of trainable parameters watches every module call, which
  costs more than a small model's forward; the served calls found there are kept (the plan), and each later batch
  watches only those calls (with the same checks, a read of a trainable parameter inside them ruling them out).
  Where that serves less than the plan, the next batch watches every call again.
* **what it cannot see**: Python attributes a module's forward sets on itself and generators other than the
  global one. Modules with such side effects in the prefix are not reused safely: turn reuse off
  (``ZOEstimator(reuse_prefix=False)``, ``ZOConfig.zo_reuse_prefix``). Hooks on a module inside a served call do
  not fire in the served forwards.

Memory: the outputs of the served calls stay alive for the batch's probes: one boundary tensor per served call
(a decoder layer's hidden states), where a forward without reuse frees each as it goes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .rng import RngState

logger = logging.getLogger(__name__)

_ATOMS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format, torch.layout)
_TENSOR = object()  # where a tensor sits in a structure


def _structure(obj, tensors: list[torch.Tensor], containers: tuple[type, ...]) -> Any:
    """A hashable-free description of ``obj`` with its tensors taken out into ``tensors`` (in order); raises
    TypeError naming the first object that cannot be compared between two forwards."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TENSOR
    if obj is None or type(obj) in _ATOMS:
        return obj
    if type(obj) in containers and type(obj) in (tuple, list):
        return type(obj), tuple(_structure(item, tensors, containers) for item in obj)
    if type(obj) in containers and type(obj) is dict:
        return dict, tuple((key, _structure(value, tensors, containers)) for key, value in obj.items())
    raise TypeError(type(obj).__name__)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` may stand in for ``a`` with bitwise the same results: the same object, or the same layout and
    values (NaNs compare unequal: the call then runs)."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
                      and a.storage_offset() == b.storage_offset() and torch.equal(a, b))


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    return [t._version for t in tensors]


AFTER_READ = "it had not returned by the first read of a trainable parameter"
HOLDS_TRAINABLE = "it holds a trainable parameter"


@dataclass
class _Call:
    """One module call of the recorded forward."""

    module: nn.Module
    parent: _Call | None
    position: int  # in the recorded calls: the calls after it, until it returns, are nested in it
    inputs: Any  # the structure of (args, kwargs), tensors taken out
    input_tensors: list[torch.Tensor]
    input_versions: list[int]
    buffers: list[tuple[int, int]]  # (id, version) of the module's buffers at entry
    rng_before: RngState
    why_not: str | None  # why it is not served; None: served
    output: Any = None
    output_tensors: list[torch.Tensor] = field(default_factory=list)
    output_versions: list[int] = field(default_factory=list)
    rng_after: RngState | None = None  # where the call drew random numbers

    def unchanged(self) -> bool:
        """No tensor this call holds was modified in place since it was recorded."""
        return (_versions(self.input_tensors) == self.input_versions
                and _versions(self.output_tensors) == self.output_versions)

    def matches(self, args, kwargs) -> bool:
        tensors = []
        try:
            inputs = _structure((args, kwargs), tensors, (tuple, list, dict))
        except TypeError:
            return False
        return (inputs == self.inputs and len(tensors) == len(self.input_tensors)
                and all(map(_same_tensor, self.input_tensors, tensors)))

    def refused_for_itself(self) -> bool:
        """Not served for a reason of its own, where every call around it was served or holds the trainable block."""
        return self.why_not not in (None, AFTER_READ, HOLDS_TRAINABLE) and all(
            a.why_not in (AFTER_READ, HOLDS_TRAINABLE) for a in _ancestors(self))


def _ancestors(call: _Call):
    while call.parent is not None:
        call = call.parent
        yield call


def _reads(obj, watched: set[int]) -> bool:
    """Whether ``obj`` (a torch function's arguments) holds one of the tensors whose ids are ``watched``."""
    if isinstance(obj, torch.Tensor):
        return id(obj) in watched
    if isinstance(obj, (tuple, list)):
        return any(_reads(item, watched) for item in obj)
    if isinstance(obj, dict):
        return any(_reads(item, watched) for item in obj.values())
    return False


def _holds_tensor(obj) -> bool:
    return isinstance(obj, torch.Tensor) or (isinstance(obj, (tuple, list)) and any(map(_holds_tensor, obj)))


class _FirstRead(TorchFunctionMode):
    """Sets ``done`` at the first torch function that reads one of ``watched`` (ids of trainable parameters and of
    their perturbed copies) and returns a tensor: metadata (a dtype, a shape) carries no perturbation. It runs at
    every torch function of the watched span, so it is kept to a few type checks."""

    def __init__(self, watched: set[int]):
        super().__init__()
        self.watched, self.done = watched, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.done and _holds_tensor(out):
            self.done = _reads(args, self.watched) or _reads(kwargs, self.watched)
        return out


class PrefixReuse:
    """Records the prefix of each batch's first probe forward and serves it to the batch's other forwards.

    One instance per set of trainable parameters: ``with reuse.batch():`` around a batch's probe forwards and
    ``with reuse.forward(perturbed): loss_fn()`` around each, where ``perturbed`` holds the ids of the tensors that
    carry the perturbation (the trainable parameters and the copies swapped in for the whole forward).
    """

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], device: torch.device):
        self.model = model
        self.device = device
        ids = {id(p) for p in trainable}
        self.owners = {m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))}
        self.holds_trainable = {m for m in model.modules() if any(id(p) in ids for p in m.parameters())}
        # module -> its number of calls, served in the last batch that watched every call; None: watch every call
        self.plan: dict[nn.Module, int] | None = None
        self.served: dict[nn.Module, list[_Call]] | None = None  # module -> this batch's served calls, once recorded
        self.refused: dict[str, str] = {}  # module name -> why its calls run at every probe
        self.why_stopped: str | None = None  # why serving stopped for this batch
        self.logged: str | None = None  # the last summary logged

    @contextlib.contextmanager
    def batch(self):
        """Context of one batch's probe forwards; the outputs kept for it are freed when it ends."""
        self.served, self.refused, self.why_stopped = None, {}, None
        try:
            yield self
        finally:
            if self.served is not None and self.summary() != self.logged:
                self.logged = self.summary()
                if self.num_served or self.refused:
                    logger.info(self.logged)
            self.served = None

    def forward(self, perturbed: set[int]):
        """Context of one probe forward: the batch's first records, the others are served."""
        if self.served is not None:
            return _Serving(self)
        if self.plan == {}:  # nothing was served (the whole model trains): watching again would cost for nothing
            return contextlib.nullcontext()
        return _Recording(self, perturbed)

    @property
    def num_served(self) -> int:
        return sum(map(len, (self.served or {}).values()))

    def summary(self) -> str:
        """What is served and what is not, in a line for the log."""
        served = ", ".join(self.name_of(m) for m in self.served or {})
        line = f"prefix reuse: {self.num_served} module calls computed once per batch ({served or 'none'})"
        return line + "".join(f"; {name} runs at every probe: {why}" for name, why in self.refused.items())

    def name_of(self, module: nn.Module) -> str:
        return self._names.get(module, type(module).__name__)

    @functools.cached_property
    def _names(self) -> dict[nn.Module, str]:
        return {m: name or type(m).__name__ for name, m in self.model.named_modules()}

    def _finish_recording(self, calls: list[_Call]) -> None:
        for call in calls:
            if call.why_not is None and not call.unchanged():
                call.why_not = "a tensor it read or returned was modified in place later in the forward"
        served: dict[nn.Module, list[_Call]] = {}
        for call in calls:  # the calls nested in a served one were dropped when it returned
            if call.why_not is None:
                served.setdefault(call.module, []).append(call)
        recorded = Counter(call.module for call in calls)
        # a module is served only where each of its calls is, so the n-th call of a forward is the n-th recorded
        self.served = {module: calls_ for module, calls_ in served.items() if len(calls_) == recorded[module]}
        for call in calls:
            if call.why_not is None and call.module not in self.served:
                call.why_not = "another call of its module is not served"
        self.refused = {self.name_of(c.module): c.why_not for c in calls if c.refused_for_itself()}
        for calls_ in self.served.values():
            for call in calls_:
                call.parent = None  # the calls around it, and what they read, are freed with the recording
        counts = {module: len(calls_) for module, calls_ in self.served.items()}
        # a batch that served less than the plan has the next one watch every call again
        self.plan = counts if self.plan is None or counts == self.plan else None


class _Recording:
    """The batch's first forward, run as usual, with hooks recording the calls of the prefix: on every module, or,
    once a plan exists, on the planned modules only (and a pre-hook on the modules owning trainable parameters,
    which end the prefix), with the first-read watch running only inside the planned calls."""

    def __init__(self, reuse: PrefixReuse, perturbed: set[int]):
        self.reuse = reuse
        self.calls: list[_Call] = []
        self.open: list[_Call] = []
        self.read = _FirstRead(perturbed)  # done: the first read of a trainable parameter happened
        self.watching_all = reuse.plan is None
        self.watch_entered = False

    def __enter__(self):
        modules = list(self.reuse.model.modules()) if self.watching_all else list(self.reuse.plan)
        self.handles = [m.register_forward_pre_hook(self._enter, with_kwargs=True) for m in modules]
        # prepended: this hook sees the output of forward itself, which a served call stands in for
        self.handles += [m.register_forward_hook(self._exit, with_kwargs=True, always_call=True, prepend=True)
                         for m in modules]
        if self.watching_all:
            self._watch(True)
        else:
            self.handles += [m.register_forward_pre_hook(self._end_prefix) for m in self.reuse.owners]
        return self

    def __exit__(self, *exc):
        self._watch(False)
        for handle in self.handles:
            handle.remove()
        if exc[0] is None:
            self.reuse._finish_recording(self.calls)

    def _watch(self, on: bool) -> None:
        if on != self.watch_entered:
            self.read.__enter__() if on else self.read.__exit__(None, None, None)
            self.watch_entered = on

    def _end_prefix(self, module, args):
        self.read.done = True

    def _enter(self, module, args, kwargs):
        if module in self.reuse.owners:
            self.read.done = True
        if self.read.done:
            return
        tensors, why_not = [], AFTER_READ
        try:
            inputs = _structure((args, kwargs), tensors, (tuple, list, dict))
        except TypeError as e:
            inputs, why_not = None, f"an input of type {e} cannot be compared between forwards"
        call = _Call(module, self.open[-1] if self.open else None, len(self.calls), inputs, tensors, _versions(tensors),
                     [(id(b), b._version) for b in module.buffers()], RngState(self.reuse.device), why_not)
        self.calls.append(call)
        self.open.append(call)
        self._watch(True)

    def _exit(self, module, args, kwargs, output):
        if not self.open or self.open[-1].module is not module:
            return None  # entered after the first read
        call = self.open.pop()
        if not self.open and not self.watching_all:
            self._watch(False)
        if self.read.done or call.why_not != AFTER_READ:
            return None
        call.why_not = self._why_not(call, module, output)
        if call.why_not is None:
            call.output, call.output_versions = output, _versions(call.output_tensors)
            rng = RngState(self.reuse.device)
            call.rng_after = None if rng == call.rng_before else rng
            del self.calls[call.position + 1 :]  # nested in it: they do not run when it is served
        return None

    def _why_not(self, call: _Call, module, output) -> str | None:
        if module in self.reuse.holds_trainable:
            return HOLDS_TRAINABLE
        try:
            _structure(output, call.output_tensors, (tuple,))
        except TypeError as e:
            call.output_tensors = []
            return f"its output holds a {e}, which a later line could change unseen"
        if [(id(b), b._version) for b in module.buffers()] != call.buffers:
            return "it changed one of its buffers (a side effect)"
        if _versions(call.input_tensors) != call.input_versions:
            return "it modified one of its inputs in place"
        return None


class _Serving:
    """One of the batch's other forwards: each served module returns its recorded output instead of running."""

    def __init__(self, reuse: PrefixReuse):
        self.reuse = reuse
        self.counts: dict[nn.Module, int] = {}
        self.replaced: dict[nn.Module, Any] = {}

    def __enter__(self):
        if self.reuse.why_stopped is None:
            for module in self.reuse.served:
                self.replaced[module] = vars(module).get("forward")
                module.forward = functools.partial(self._serve, module, module.forward)
        return self

    def __exit__(self, *exc):
        for module, own in self.replaced.items():
            if own is None:
                del module.forward
            else:
                module.forward = own
        served = [call for calls in self.reuse.served.values() for call in calls]
        if self.reuse.why_stopped is None and not all(call.unchanged() for call in served):
            self._stop("a served output was modified in place by a probe forward")

    def _serve(self, module, forward, *args, **kwargs):
        n = self.counts[module] = self.counts.get(module, -1) + 1
        calls = self.reuse.served[module]
        if self.reuse.why_stopped is not None or n >= len(calls):
            return forward(*args, **kwargs)
        call = calls[n]
        if not call.unchanged():
            self._stop(f"{self.reuse.name_of(module)}'s recorded input or output was modified in place")
        elif not call.matches(args, kwargs):
            self._stop(f"{self.reuse.name_of(module)} got other inputs than in the batch's first forward")
        elif call.rng_after is not None and RngState(self.reuse.device) != call.rng_before:
            self._stop(f"{self.reuse.name_of(module)} draws random numbers from another RNG state than in the first forward")
        else:
            if call.rng_after is not None:
                call.rng_after.restore()
            return call.output
        return forward(*args, **kwargs)

    def _stop(self, why: str) -> None:
        self.reuse.why_stopped = why
        logger.info("prefix reuse stops for this batch: %s; the modules run at every probe", why)
