"""Seeded random directions: regenerated on demand, never stored.

Every direction entry is a pure function of (base seed, optimizer step, query index, parameter
name). That is what lets a ZO step run at inference memory (z is drawn again for the update instead
of being kept), and it makes the run independent of parameter order, process count and resume point.

Directions are drawn in fixed-size chunks into a small reused float32 buffer, from one generator per
(step, query, name) on the parameter's device, so the probes and the update see the same numbers and
no parameter-sized temporary is ever needed to hold z.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator

import torch

CHUNK_NUMEL = 1 << 18  # 1 MiB of float32: amortises the call, stays in cache, adds little to peak memory


def _fill_gaussian(out: torch.Tensor, generator: torch.Generator) -> None:
    out.normal_(generator=generator)


def _fill_rademacher(out: torch.Tensor, generator: torch.Generator) -> None:
    out.random_(0, 2, generator=generator).mul_(2).sub_(1)


SAMPLERS: dict[str, Callable[[torch.Tensor, torch.Generator], None]] = {
    "gaussian": _fill_gaussian,
    "rademacher": _fill_rademacher,
}
"""Element-wise distributions with mean 0 and variance 1: E[z zᵀ] = I keeps SPSA unbiased."""

DISTRIBUTIONS = (*SAMPLERS, "lowrank")
"""``lowrank``: SubZero's random-subspace directions for matrices (Gaussian for the other parameters)."""


def direction_seed(base_seed: int, step: int, query: int, name: str) -> int:
    """A 63-bit seed that depends on nothing but its four arguments (stable across processes and runs)."""
    key = f"{base_seed}/{step}/{query}/{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class DirectionSampler:
    """Draws the direction z_k of query k for one named parameter, as flat chunks.

    With ``correlation`` α ≠ 0 the queries form the chain of the paper's Algorithm 1:
    z_0 = w_0 and z_k = α z_{k-1} + sqrt(1 - α²) w_k with independent w_k, so every z_k keeps unit
    variance and consecutive directions have correlation α (for q = 2 this is exactly Algorithm 1).

    SubZero (``lowrank``): a matrix W of shape m×n gets z = sqrt(mn)/r · U S Vᵀ with U (m×r) and
    V (n×r) orthonormal bases drawn once per ``refresh_steps`` steps and a fresh r×r Gaussian S per
    query, so E[vec z vec zᵀ] = I still holds while the noise lives in an r×r subspace; drawing it
    costs r² random numbers instead of mn. The direction is built whole (one tensor-sized temporary).
    """

    def __init__(
        self,
        distribution: str = "gaussian",
        correlation: float = 0.0,
        seed: int = 0,
        rank: int = 4,
        refresh_steps: int = 100,
    ):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={distribution!r} is not supported; choose one of {list(DISTRIBUTIONS)}")
        if not -1.0 < correlation < 1.0:
            raise ValueError(f"correlation={correlation} must lie in the open interval (-1, 1)")
        if rank < 1 or refresh_steps < 1:
            raise ValueError(f"rank={rank} and refresh_steps={refresh_steps} must be >= 1")
        self.distribution = distribution
        self.correlation = float(correlation)
        self.seed = int(seed)
        self.rank, self.refresh_steps = rank, refresh_steps
        self._fill = SAMPLERS.get(distribution, _fill_gaussian)
        self._bases: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (period, U, V)

    def chunks(
        self,
        name: str,
        shape: torch.Size,
        step: int,
        queries: list[int],
        scratch: torch.Tensor,
        into: torch.Tensor | None = None,
    ) -> Iterator[tuple[slice, int, torch.Tensor]]:
        """Yield (slice, k, z_k[slice]) over the flat parameter, chunk by chunk, queries in order.

        ``scratch`` (from :func:`scratch_buffer`, on the parameter's device) holds the yielded view,
        which is only valid until the next iteration: consume it at once. With ``into`` (a flat float32
        tensor of the parameter's size, one query), z is drawn straight into it instead.
        """
        if self.distribution == "lowrank" and len(shape) == 2:
            yield from self._lowrank(name, shape, step, queries, scratch.device, into)
            return
        numel = math.prod(shape)
        chain = list(range(max(queries) + 1)) if self.correlation else list(queries)
        wanted = set(queries)
        generators = {k: self._generator(step, k, name, scratch.device) for k in chain}
        beta = math.sqrt(1.0 - self.correlation**2)
        for start in range(0, numel, CHUNK_NUMEL):
            size = min(CHUNK_NUMEL, numel - start)
            where = slice(start, start + size)
            z = scratch[:size] if into is None else into[where]
            w = scratch[CHUNK_NUMEL : CHUNK_NUMEL + size]
            for k in chain:
                if self.correlation and k > 0:
                    self._fill(w, generators[k])
                    z.mul_(self.correlation).add_(w, alpha=beta)
                else:
                    self._fill(z, generators[k])
                if k in wanted:
                    yield where, k, z

    def _lowrank(self, name, shape, step, queries, device, into):
        rows, cols = shape
        rank = min(self.rank, rows, cols)
        u, v = self._basis(name, rows, cols, rank, step, device)
        scale = math.sqrt(rows * cols) / rank
        beta = math.sqrt(1.0 - self.correlation**2)
        z = None
        for k in range(max(queries) + 1) if self.correlation else queries:
            core = torch.randn(rank, rank, generator=self._generator(step, k, name, device), device=device)
            w = (u @ core @ v.T).mul_(scale).view(-1)
            z = w if z is None or not self.correlation else z.mul_(self.correlation).add_(w, alpha=beta)
            if k in queries:
                if into is not None:
                    z = into.copy_(z)
                yield slice(0, rows * cols), k, z

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


def scratch_buffer(device: torch.device | str = "cpu") -> torch.Tensor:
    """The reused float32 buffer :meth:`DirectionSampler.chunks` draws into (two chunks wide)."""
    return torch.empty(2 * CHUNK_NUMEL, dtype=torch.float32, device=device)
