"""Seeded random directions: regenerated on demand, never stored.

Every direction entry is a pure function of (base seed, optimizer step, query index, parameter
name). That is what lets a ZO step run at inference memory (z is drawn again for the update instead
of being kept), and it makes the run independent of parameter order, process count, thread count and
resume point.

Entry i of z_k comes from Philox4x32-10 block i // 4 (i // 128 for ±1 entries) under the key
``direction_seed(seed, step, k, name)`` (see `philox`): no generator state, so a kernel draws and adds
z tile by tile, in cache or in registers, and nothing parameter-sized is ever allocated to hold z. Drawing
z is the largest cost of a ZO step after the forwards. The numbers are the same on every device: the C
kernel on CPU, a Triton kernel on GPUs (`philox_triton`), and the torch code of `philox` elsewhere, chosen by
`kernels`.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import NamedTuple, Sequence

import torch

from . import kernels

SEED_CACHE_ENTRIES = 2**16  # direction seeds kept for reuse (a step's probes, its update, a momentum's history)
DISTRIBUTIONS = ("gaussian", "rademacher", "lowrank")
"""``gaussian`` and ``rademacher`` (±1) are element-wise with mean 0 and variance 1: E[z zᵀ] = I keeps
SPSA unbiased. ``lowrank``: SubZero's random-subspace directions for matrices (Gaussian for the other
parameters)."""


class Addition(NamedTuple):
    """One parameter's part of `DirectionSampler.add_to`: ``target = source + m ⊙ Σ_k scales[k]·z_k(name)``, with
    ``m`` the multiplier where one is given (a diagonal preconditioner, `ZOHiZOO`), else 1."""

    name: str
    shape: torch.Size
    scales: dict[int, float]  # query k -> its scale; a correlated chain draws the links in between
    source: torch.Tensor  # flat
    target: torch.Tensor  # flat, may be source
    multiplier: torch.Tensor | None = None  # flat float32, the parameter's size


def direction_seed(base_seed: int, step: int, query: int, name: str) -> int:
    """A 63-bit seed that depends on nothing but its four arguments (stable across processes and runs)."""
    key = f"{base_seed}/{step}/{query}/{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class DirectionSampler:
    """Draws the direction z_k of query k for named parameters and adds it, scaled, to tensors.

    With ``correlation`` α ≠ 0 the queries form the chain of the paper's Algorithm 1:
    z_0 = w_0 and z_k = α z_{k-1} + sqrt(1 - α²) w_k with independent w_k, so every z_k keeps unit
    variance and consecutive directions have correlation α (for q = 2 this is exactly Algorithm 1).

    SubZero (``lowrank``): a matrix W of shape m×n gets z = sqrt(mn)/r · U S Vᵀ with U (m×r) and
    V (n×r) orthonormal bases drawn once per ``refresh_steps`` steps and a fresh r×r Gaussian S per
    query, so E[vec z vec zᵀ] = I still holds while the noise lives in an r×r subspace; drawing it
    costs r² random numbers instead of mn. The direction is built whole (one tensor-sized temporary).
    """

    @staticmethod
    def check_settings(distribution: str = "gaussian", correlation: float = 0.0, rank: int = 4,
                       refresh_steps: int = 100) -> None:
        """Raises ValueError naming the first setting the sampler refuses."""
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={distribution!r} is not supported; choose one of {list(DISTRIBUTIONS)}")
        if not -1.0 < correlation < 1.0:
            raise ValueError(f"correlation={correlation} must lie in the open interval (-1, 1)")
        if rank < 1 or refresh_steps < 1:
            raise ValueError(f"rank={rank} and refresh_steps={refresh_steps} must be >= 1")

    def __init__(
        self,
        distribution: str = "gaussian",
        correlation: float = 0.0,
        seed: int = 0,
        rank: int = 4,
        refresh_steps: int = 100,
    ):
        self.check_settings(distribution, correlation, rank, refresh_steps)
        self.distribution = distribution
        self.correlation = float(correlation)
        self.seed = int(seed)
        self.rank, self.refresh_steps = rank, refresh_steps
        self._bases: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (period, U, V)
        self._seeds: dict[tuple[int, int, int, str], int] = {}  # (seed, step, query, name) -> direction_seed

    @torch.no_grad()
    def add_to(self, step: int, additions: Sequence[Addition], check: bool = True) -> None:
        """For each addition, ``target = source + Σ_k scales[k]·z_k`` over flat tensors of its parameter's size.

        ``target`` may be ``source`` (an in-place update). The arithmetic is float32 (float64 for float64
        tensors) with one rounding to the target's dtype, so half-precision copies are exact functions of
        p and z. The additions that draw the same links of the chain share one kernel call (`kernels.add_directions`).
        ``check=False`` skips the checks of the tensors, for a caller that made them flat itself (a probe
        draws between two layers' products, where every check costs microseconds: `benchmarks/bench_directions.py`).
        """
        if check:
            for a in additions:
                numel = math.prod(a.shape)
                for tensor in (a.source, a.target):
                    if tensor.dim() != 1 or not tensor.is_contiguous() or tensor.numel() != numel:
                        raise ValueError(f"add_to needs flat contiguous tensors of {numel} entries, got shape {tuple(tensor.shape)}")
                if a.multiplier is not None and a.multiplier.numel() != numel:
                    raise ValueError(f"add_to needs a multiplier of {numel} entries, got {a.multiplier.numel()}")
                if a.source.device != a.target.device:
                    raise ValueError(f"add_to needs source and target on one device, got {a.source.device} and {a.target.device}")
        batches = defaultdict(list)  # additions with the same links of the chain: one philox call
        for a in additions:
            if a.multiplier is not None and a.scales:
                self._add_multiplied(step, a)
            elif not a.scales:
                if a.target is not a.source:
                    a.target.copy_(a.source)
            elif self.distribution == "lowrank" and len(a.shape) == 2:
                # float32 even under autocast: the probes run inside the forward, the update outside it
                with torch.autocast(a.source.device.type, enabled=False):
                    self._lowrank_add_to(a.name, a.shape, step, a.scales, a.source, a.target)
            else:
                chain = self._links(a.scales)
                batches[chain, tuple(k in a.scales for k in chain)].append(a)
        for (chain, _), batch in batches.items():
            seeds = [[self._seed(step, k, a.name) for k in chain] for a in batch]
            scales = [[a.scales.get(k) for k in chain] for a in batch]
            # checked above or by the caller; the batch has the same links in every row
            kernels.add_directions([a.source for a in batch], [a.target for a in batch], seeds, scales, self.correlation,
                                  self.distribution == "rademacher", check=False)

    def _add_multiplied(self, step: int, a: Addition) -> None:
        """``target = source + m ⊙ Σ_k scales[k]·z_k`` in float32 (float64 for float64 tensors), one rounding to the
        target's dtype: the sum of the directions is drawn into a temporary of the parameter's size."""
        dtype = torch.promote_types(a.source.dtype, torch.float32)
        drawn = torch.zeros(a.source.numel(), dtype=dtype, device=a.source.device)
        self.add_to(step, [a._replace(source=drawn, target=drawn, multiplier=None)], check=False)
        a.target.copy_(torch.addcmul(a.source.to(dtype), drawn, a.multiplier.to(dtype)))

    def add_sum(self, terms: Sequence[tuple[int, dict[int, float]]], additions: Sequence[Addition]) -> None:
        """``target = source + Σ_(step, scales) Σ_k scales[k]·z_k(step)`` for each addition (whose own scales are
        ignored): the directions of several steps added in one sweep over each tensor where the directions are
        element-wise and independent (one kernel call, all seeds in a row), else one sweep per step."""
        if len(terms) == 1 or self.correlation or self.distribution == "lowrank":
            for i, (step, scales) in enumerate(terms):
                self.add_to(step, [a._replace(scales=scales, source=a.source if i == 0 else a.target) for a in additions],
                            check=False)
            return
        seeds = [[self._seed(step, k, a.name) for step, scales in terms for k in sorted(scales)] for a in additions]
        scales = [[scales[k] for _, scales in terms for k in sorted(scales)]] * len(additions)
        kernels.add_directions([a.source for a in additions], [a.target for a in additions], seeds, scales, 0.0,
                              self.distribution == "rademacher", check=False)

    def prepare(self, names: list[str], sources: list[torch.Tensor], targets: list[torch.Tensor]):
        """``add(step, scales)``, the same as ``add_to(step, [Addition(names[i], ., scales, sources[i], targets[i]) ...])``
        over these fixed flat tensors, with the kernel's arguments built once (`kernels.prepare`); None where
        `add_to` would not draw them in one kernel call (no kernel for them, SubZero's directions)."""
        call = None if self.distribution == "lowrank" else kernels.prepare(sources, targets)
        if call is None:
            return None
        rademacher = self.distribution == "rademacher"

        def add(step: int, scales: dict[int, float]) -> None:
            chain = self._links(scales)
            call([self._seed(step, k, name) for name in names for k in chain], [scales.get(k) for k in chain],
                 self.correlation, rademacher)

        return add

    def can_add_rows(self, matrix: torch.Tensor) -> bool:
        """Whether `add_rows` serves ``matrix``: the C kernel, a float32 CPU matrix, element-wise directions."""
        return (kernels.KERNEL is not None and self.distribution != "lowrank" and matrix.dtype == torch.float32
                and matrix.device.type == "cpu" and matrix.dim() == 2 and matrix.is_contiguous())

    @torch.no_grad()
    def add_rows(self, step: int, name: str, matrix: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
                 scales: dict[int, float]) -> None:
        """``out[i] = matrix[rows[i]] + Σ_k scales[k]·z_k[rows[i]]``, bit for bit those rows of `add_to` over the
        matrix, drawing only them (an embedding's lookup needs a few rows of a large table)."""
        chain = self._links(scales)
        kernels.add_rows(matrix, rows, out, [self._seed(step, k, name) for k in chain],
                        [scales.get(k) for k in chain], self.correlation, self.distribution == "rademacher")

    @torch.no_grad()
    def add_row_block(self, step: int, name: str, matrix: torch.Tensor, start: int, out: torch.Tensor,
                      scales: dict[int, float]) -> None:
        """``out = matrix[start : start + len(out)] + Σ_k scales[k]·z_k[those rows]``, bit for bit those rows of
        `add_to` over the matrix, drawn as one slice (a large linear layer multiplies its perturbed weight a block
        of rows at a time)."""
        if not (self.can_add_rows(matrix) and out.dtype == matrix.dtype and out.dim() == 2 and out.is_contiguous()
                and out.shape[1] == matrix.shape[1] and 0 <= start and start + len(out) <= len(matrix)):
            raise ValueError(f"add_row_block needs a matrix that add_rows serves and a contiguous block of its rows, "
                             f"got rows {start}..{start + len(out)} of {out.dtype} {tuple(out.shape)} from "
                             f"{matrix.dtype} {tuple(matrix.shape)} on {matrix.device}")
        width = matrix.shape[1]
        self.add_slice(step, name, matrix.view(-1)[start * width : (start + len(out)) * width], out.view(-1),
                       start * width, scales)

    @torch.no_grad()
    def add_slice(self, step: int, name: str, source: torch.Tensor, target: torch.Tensor, first: int,
                  scales: dict[int, float]) -> None:
        """``target = source + Σ_k scales[k]·z_k[first : first + len(source)]`` for flat contiguous tensors: entries
        ``first`` on of the parameter's flat z, bit for bit those of `add_to` over the whole parameter (a block of an LM
        head's rows; the shard of a parameter that each process of a sharded model holds). Element-wise directions
        only: SubZero's are built whole."""
        if self.distribution == "lowrank":
            raise ValueError(f"{name}: a slice of a direction needs element-wise directions (gaussian or rademacher); "
                             "SubZero's low-rank directions are built whole")
        chain = self._links(scales)
        kernels.add_directions([source], [target], [[self._seed(step, k, name) for k in chain]],
                               [[scales.get(k) for k in chain]], self.correlation, self.distribution == "rademacher",
                               firsts=[first], check=False)

    def _seed(self, step: int, query: int, name: str) -> int:
        """`direction_seed` of this sampler, kept for the steps last asked: a step's probes and its update draw the
        same, and a momentum rebuilt from past seeds draws the last few steps again."""
        key = (self.seed, step, query, name)
        seed = self._seeds.get(key)
        if seed is None:
            if len(self._seeds) >= SEED_CACHE_ENTRIES:
                self._seeds.clear()
            seed = self._seeds[key] = direction_seed(self.seed, step, query, name)
        return seed

    def _links(self, scales: dict[int, float]) -> tuple[int, ...]:
        """The queries whose directions are drawn to add ``scales``: every link up to the last for a correlated chain."""
        queries = sorted(scales)
        return tuple(range(queries[-1] + 1)) if self.correlation else tuple(queries)

    def direction(self, name: str, shape: torch.Size, step: int, query: int) -> torch.Tensor:
        """z_query of one parameter as drawn on CPU, in float32 (diagnostics and tests; training never needs it)."""
        z = torch.zeros(math.prod(shape))
        self.add_to(step, [Addition(name, torch.Size(shape), {query: 1.0}, z, z)])
        return z.view(shape)

    def _lowrank_add_to(self, name, shape, step, scales, source, target):
        rows, cols = shape
        rank = min(self.rank, rows, cols)
        u, v = self._basis(name, rows, cols, rank, step, source.device)
        scale = math.sqrt(rows * cols) / rank
        beta = math.sqrt(1.0 - self.correlation**2)
        queries = sorted(scales)
        z, first = None, True
        for k in range(queries[-1] + 1) if self.correlation else queries:
            core = torch.randn(rank, rank, generator=self._generator(step, k, name, source.device), device=source.device)
            w = (u @ core @ v.T).view(-1)
            z = w if z is None or not self.correlation else z.mul_(self.correlation).add_(w, alpha=beta)
            if k in scales:
                torch.add(source if first else target, z, alpha=scales[k] * scale, out=target)
                first = False

    def _basis(self, name, rows, cols, rank, step, device):
        """U, V of the current refresh period: drawn from seeds, cached for the period only."""
        period = step // self.refresh_steps
        cached = self._bases.get(name)
        if cached is None or cached[0] != period:
            generator = self._generator(period, -1, name, device)  # query -1: never a direction's seed
            u = torch.linalg.qr(torch.randn(rows, rank, generator=generator, device=device)).Q
            v = torch.linalg.qr(torch.randn(cols, rank, generator=generator, device=device)).Q
            cached = self._bases[name] = (period, u, v)
        return cached[1], cached[2]

    def _generator(self, step: int, query: int, name: str, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(direction_seed(self.seed, step, query, name))
