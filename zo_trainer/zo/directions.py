"""Seeded random directions: regenerated on demand, never stored.

Every direction entry is a pure function of (base seed, optimizer step, query index, parameter
name). That is what lets a ZO step run at inference memory (z is drawn again for the update instead
of being kept), and it makes the run independent of parameter order, process count, thread count and
resume point.

A parameter's flat storage is cut into chunks of ``chunk_numel(device)`` entries and chunk c of z_k is
drawn by its own generator, seeded with ``chunk_seed(direction_seed(seed, step, k, name), c)``. Drawing
z is the largest cost of a ZO step after the forwards, and one generator per chunk is what lets the
chunks be drawn on every CPU core at once while giving the same numbers on any number of threads.
Each chunk is drawn into a small reused buffer and consumed while it is in cache: nothing
parameter-sized is ever allocated to hold z. (The numbers differ between device types anyway: torch's
CPU generator is mt19937, CUDA's is Philox; accelerators take larger chunks, fewer kernel launches.)
"""

from __future__ import annotations

import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

CHUNK_NUMEL = 1 << 16  # CPU: 256 KiB of float32 fits in L2, and splits a 320x320 matrix over two cores
ACCELERATOR_CHUNK_NUMEL = 1 << 22  # 16 MiB per buffer: a 1B-parameter draw is ~250 chunks, not 15,000 launches


def chunk_numel(device: torch.device) -> int:
    return CHUNK_NUMEL if device.type == "cpu" else ACCELERATOR_CHUNK_NUMEL


_MASK64 = (1 << 64) - 1


def _fill_gaussian(buffer: torch.Tensor, size: int, generator: torch.Generator, workspace: "_Workspace") -> torch.Tensor:
    return buffer[:size].normal_(generator=generator)


_SIGNS = torch.tensor([[1.0 if byte >> bit & 1 else -1.0 for bit in range(8)] for byte in range(256)])


def _fill_rademacher(buffer: torch.Tensor, size: int, generator: torch.Generator, workspace: "_Workspace") -> torch.Tensor:
    """±1 with probability ½ each, 8 entries per random byte: a table lookup instead of one draw per entry.

    Bit b of byte i gives entry 8i + b. Whole 64-bit words are expanded (chunk sizes are multiples of 64,
    so they fit in the buffer) and the first ``size`` entries are the direction.
    """
    words = workspace.words[: -(-size // 64)]
    words.random_(-(2**63), None, generator=generator)  # all 64 bits uniform (the default range leaves the top bit 0)
    rows = workspace.rows[: words.numel() * 8]
    rows.copy_(words.view(torch.uint8))
    torch.index_select(workspace.sign_table, 0, rows, out=buffer[: rows.numel() * 8].view(-1, 8))
    return buffer[:size]


SAMPLERS = {"gaussian": _fill_gaussian, "rademacher": _fill_rademacher}
"""Element-wise distributions with mean 0 and variance 1: E[z zᵀ] = I keeps SPSA unbiased."""

DISTRIBUTIONS = (*SAMPLERS, "lowrank")
"""``lowrank``: SubZero's random-subspace directions for matrices (Gaussian for the other parameters)."""


def direction_seed(base_seed: int, step: int, query: int, name: str) -> int:
    """A 63-bit seed that depends on nothing but its four arguments (stable across processes and runs)."""
    key = f"{base_seed}/{step}/{query}/{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a direction seeded with ``seed``: splitmix64 of their sum.

    Well mixed in the low 32 bits too, which are all that torch's CPU generator (mt19937) keeps.
    """
    x = (seed + (chunk + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class DirectionSampler:
    """Draws the direction z_k of query k for one named parameter and adds it, scaled, to a tensor.

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

    @torch.no_grad()
    def add_to(
        self,
        name: str,
        shape: torch.Size,
        step: int,
        scales: dict[int, float],
        source: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        """``target = source + Σ_k scales[k]·z_k`` over flat tensors of the parameter's size.

        ``target`` may be ``source`` (an in-place update). The arithmetic is float32 with one rounding
        to the target's dtype per query, so half-precision copies are exact functions of p and z.
        """
        numel = math.prod(shape)
        for tensor in (source, target):
            if tensor.dim() != 1 or not tensor.is_contiguous() or tensor.numel() != numel:
                raise ValueError(f"add_to needs flat contiguous tensors of {numel} entries, got shape {tuple(tensor.shape)}")
        queries = sorted(scales)
        if not queries:
            if target is not source:
                target.copy_(source)
            return
        if self.distribution == "lowrank" and len(shape) == 2:
            # float32 even under autocast: the probes run inside the forward, the update outside it
            with torch.autocast(source.device.type, enabled=False):
                self._lowrank_add_to(name, shape, step, scales, source, target)
            return
        chain = list(range(queries[-1] + 1)) if self.correlation else queries
        seeds = {k: direction_seed(self.seed, step, k, name) for k in chain}
        beta = math.sqrt(1.0 - self.correlation**2)
        chunk_size = chunk_numel(source.device)

        def draw(chunk: int, workspace: _Workspace) -> None:
            start = chunk * chunk_size
            where = slice(start, min(start + chunk_size, source.numel()))
            size = where.stop - where.start
            generator = workspace.generator
            first, z = True, None
            for k in chain:
                generator.manual_seed(chunk_seed(seeds[k], chunk))
                if self.correlation and z is not None:  # Algorithm 1's chain: z_k = α z_{k-1} + β w_k
                    w = self._fill(workspace.w, size, generator, workspace)
                    z.mul_(self.correlation).add_(w, alpha=beta)
                else:
                    z = self._fill(workspace.z, size, generator, workspace)
                if k in scales:
                    if first:
                        torch.add(source[where], z, alpha=scales[k], out=target[where])
                        first = False
                    else:
                        target[where].add_(z, alpha=scales[k])

        _run_chunks(draw, -(-source.numel() // chunk_size), source.device)

    def direction(self, name: str, shape: torch.Size, step: int, query: int) -> torch.Tensor:
        """z_query of one parameter as drawn on CPU, in float32 (diagnostics and tests; training never needs it)."""
        z = torch.zeros(math.prod(shape))
        self.add_to(name, torch.Size(shape), step, {query: 1.0}, z, z)
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


# ------------------------------------------------------------------------------ drawing on every core
class _Workspace:
    """One thread's reusable buffers and generator, allocated on the calling thread (see `_run_chunks`)."""

    def __init__(self, device: torch.device):
        size = chunk_numel(device)
        self.z = torch.empty(size, device=device)
        self.w = torch.empty(size, device=device)  # the fresh part of a correlated direction
        self.generator = torch.Generator(device=device)
        self.words = torch.empty(size // 64, dtype=torch.int64, device=device)  # Rademacher: 64 entries a word
        self.rows = torch.empty(size // 8, dtype=torch.int32, device=device)
        self.sign_table = _SIGNS.to(device)


_workspaces: dict[torch.device, list[_Workspace]] = {}
_helper_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_draw_lock = threading.Lock()  # one draw at a time: the workspaces are shared


def _run_chunks(draw, num_chunks: int, device: torch.device) -> None:
    """Call ``draw(chunk, workspace)`` for every chunk, spread over ``torch.get_num_threads()`` threads.

    Each thread takes a contiguous run of chunks and keeps to one core: its torch ops run single-
    threaded, so the cores are not oversubscribed. On an accelerator the chunks run in order on the
    calling thread (the device parallelises each draw). Workspaces are made on the calling thread; the
    helpers allocate only small tensor headers (and, for half-precision targets, chunk-sized float32
    temporaries).
    """
    if num_chunks == 0:
        return
    with _draw_lock:
        if device.type != "cpu":
            workspace = _workspaces.setdefault(device, [_Workspace(device)])[0]
            for chunk in range(num_chunks):
                draw(chunk, workspace)
            return
        threads = min(torch.get_num_threads(), num_chunks)
        workspaces = _workspaces.setdefault(device, [])
        while len(workspaces) < threads:
            workspaces.append(_Workspace(device))
        bounds = [num_chunks * i // threads for i in range(threads + 1)]

        def run(i: int) -> None:
            torch.set_num_threads(1)  # a helper's first torch op would otherwise start a team of threads
            for chunk in range(bounds[i], bounds[i + 1]):
                draw(chunk, workspaces[i])

        outer_threads = torch.get_num_threads()
        futures = [_helpers(threads - 1).submit(run, i) for i in range(1, threads)]
        try:
            run(0)
        finally:
            wait(futures)  # never return while a helper still writes into the target or the workspaces
            torch.set_num_threads(outer_threads)
        for future in futures:
            future.result()


def _helpers(count: int) -> ThreadPoolExecutor:
    """The helper threads, created once (under `_draw_lock`)."""
    global _helper_pool
    if _helper_pool is None or _helper_pool[0] < count:
        if _helper_pool is not None:
            _helper_pool[1].shutdown(wait=False)  # more threads than before: replace, do not leak the old ones
        _helper_pool = (count, ThreadPoolExecutor(count, thread_name_prefix="zo-directions"))
    return _helper_pool[1]
