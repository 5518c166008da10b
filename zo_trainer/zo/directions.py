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


def direction_seed(base_seed: int, step: int, query: int, name: str) -> int:
    """A 63-bit seed that depends on nothing but its four arguments (stable across processes and runs)."""
    key = f"{base_seed}/{step}/{query}/{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class DirectionSampler:
    """Draws the direction z_k of query k for one named parameter, as flat chunks.

    With ``correlation`` α ≠ 0 the queries form the chain of the paper's Algorithm 1:
    z_0 = w_0 and z_k = α z_{k-1} + sqrt(1 - α²) w_k with independent w_k, so every z_k keeps unit
    variance and consecutive directions have correlation α (for q = 2 this is exactly Algorithm 1).
    """

    def __init__(self, distribution: str = "gaussian", correlation: float = 0.0, seed: int = 0):
        if distribution not in SAMPLERS:
            raise ValueError(f"distribution={distribution!r} is not supported; choose one of {sorted(SAMPLERS)}")
        if not -1.0 < correlation < 1.0:
            raise ValueError(f"correlation={correlation} must lie in the open interval (-1, 1)")
        self.distribution = distribution
        self.correlation = float(correlation)
        self.seed = int(seed)
        self._fill = SAMPLERS[distribution]

    def chunks(
        self, name: str, numel: int, step: int, queries: list[int], scratch: torch.Tensor, into: torch.Tensor | None = None
    ) -> Iterator[tuple[slice, int, torch.Tensor]]:
        """Yield (slice, k, z_k[slice]) over the flat parameter, chunk by chunk, queries in order.

        ``scratch`` (from :func:`scratch_buffer`, on the parameter's device) holds the yielded view,
        which is only valid until the next iteration: consume it at once. With ``into`` (a flat float32
        tensor of ``numel`` entries, one query), z is drawn straight into it instead.
        """
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

    def _generator(self, step: int, query: int, name: str, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(direction_seed(self.seed, step, query, name))


def scratch_buffer(device: torch.device | str = "cpu") -> torch.Tensor:
    """The reused float32 buffer :meth:`DirectionSampler.chunks` draws into (two chunks wide)."""
    return torch.empty(2 * CHUNK_NUMEL, dtype=torch.float32, device=device)
