"""The directions of `philox` on GPUs: the same numbers bit for bit, drawn and added by one Triton kernel.

`philox` defines entry i of z from Philox4x32-10 block i // 4 (Box-Muller) or i // 128 (±1 bits) using
only exact integer ops and IEEE float32 +, × and sqrt, each rounded on its own. This kernel does the same
operations with fused multiply-add turned off (``enable_fp_fusion=False``) and a correctly rounded square
root (``sqrt_rn``), so a GPU draws what the CPU draws: a run's directions do not depend on its device.

One launch draws and adds z for a whole list of tensors (``target = source + Σ_k scale_k·z_k``), tile by
tile, each tile drawn in registers and added on the spot: a probe's group of perturbed copies costs one
launch, and memory sees one read of the source and one write of the target. Why: on a GPU, the per-tensor
launches of a small model's ~100 tensors cost more than their arithmetic, and a drawn z written to memory
and read back costs two more passes over it. `kernels` imports this module on the first GPU draw, so
Triton is needed only there.
"""

from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

from . import philox
from .philox import chain_coefficients, to_float32

if int(triton.__version__.split(".")[0]) < 3:
    raise ImportError(f"the GPU kernel needs Triton >= 3.0 (tl.join), found {triton.__version__}")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: the kernel on CPU tensors (tests)
TILE = 1024  # entries per program: 256 Philox blocks (Gaussian) or 8 (±1)
DTYPES = {dtype: getattr(tl, str(dtype).removeprefix("torch.")) for dtype in philox.GPU_DTYPES}  # torch's -> Triton's


class KernelCall:
    """``targets[t] = sources[t] + Σ_k scales[t][k]·z_tk`` over fixed flat GPU tensors of one source dtype and one
    target dtype, the tensors' table (pointers, sizes, tiles) sent to the device once; each call sends its seeds
    and scales and launches one kernel. No copy waits for the GPU: a blocking host-to-device copy synchronises the
    stream, and the host would stop queueing the forward's work at every group of copies."""

    def __init__(self, sources: list[torch.Tensor], targets: list[torch.Tensor], firsts: list[int] | None = None):
        firsts = [0] * len(sources) if firsts is None else firsts
        if not sources or len(targets) != len(sources) or len(firsts) != len(sources):
            raise ValueError(f"KernelCall needs as many targets and firsts as sources (at least one), got "
                             f"{len(sources)}, {len(targets)}, {len(firsts)}")
        device = sources[0].device
        for source, target, first in zip(sources, targets, firsts):
            if not (source.device == target.device == device and source.dim() == 1 and source.is_contiguous()
                    and target.is_contiguous() and target.shape == source.shape and first >= 0
                    and source.dtype == sources[0].dtype in DTYPES and target.dtype == targets[0].dtype in DTYPES):
                raise ValueError(f"KernelCall needs flat contiguous tensors of equal size on one GPU, every source of one "
                                 f"dtype and every target of one, each in {list(DTYPES)}; got {source.dtype} "
                                 f"{tuple(source.shape)} on {source.device} and {target.dtype} {tuple(target.shape)} "
                                 f"on {target.device}, first {first}")
        if device.type != ("cpu" if INTERPRETED else "cuda"):
            raise ValueError(f"KernelCall draws on CUDA (or ROCm) devices, got tensors on {device}")
        self.tensors, self.count, self.device = (sources, targets), len(sources), device
        tiles, tile_starts = 0, []
        for source, first in zip(sources, firsts):
            tile_starts.append(tiles)
            tiles += (first + source.numel() - 1) // TILE - first // TILE + 1 if source.numel() else 0
        self.tiles = tiles
        # int64 columns: first tile of each tensor (and the total), source and target addresses, firsts, sizes
        columns = [*tile_starts, tiles, *(t.data_ptr() for t in sources), *(t.data_ptr() for t in targets), *firsts,
                   *(t.numel() for t in sources)]
        self.table = _to_device(struct.pack(f"<{len(columns)}q", *columns), device).view(torch.int64)
        self.source_type, self.target_type = DTYPES[sources[0].dtype], DTYPES[targets[0].dtype]  # Triton's
        # steps of the bisection, rounded up to a multiple of 4 (a step past the answer keeps it): fewer compilations
        self.search_steps = 4 * -(-max(1, (self.count - 1).bit_length()) // 4)

    def __call__(self, seeds: list[int], scales: list[list[float | None]] | list[float | None], correlation: float,
                 is_rademacher: bool) -> None:
        """z_tk drawn from ``seeds[t * chain + k]``; ``scales`` one row per tensor, or one row for all (a probe's ±ε).
        A None scale draws its link of a correlated chain without adding it, at the same links in every row."""
        rows = scales if scales and isinstance(scales[0], list) else [scales] * self.count
        chain = len(rows[0])
        if len(seeds) != self.count * chain or len(rows) != self.count:
            raise ValueError(f"{self.count} tensors x {chain} links need {self.count * chain} seeds and {self.count} rows "
                             f"of scales, got {len(seeds)} and {len(rows)}")
        if not self.tiles:
            return
        used = sum(1 << k for k, s in enumerate(rows[0]) if s is not None)
        flat_scales = [0.0 if s is None else to_float32(s) for row in rows for s in row]
        seed_bits = [s & 0xFFFFFFFFFFFFFFFF for s in seeds]
        per_call = _to_device(struct.pack(f"<{len(seed_bits)}Q{len(flat_scales)}f", *seed_bits, *flat_scales), self.device)
        seeds_on_device = per_call[: 8 * len(seed_bits)].view(torch.int64)
        scales_on_device = per_call[8 * len(seed_bits) :].view(torch.float32)
        alpha, beta = chain_coefficients(correlation)
        with contextlib.nullcontext() if INTERPRETED else torch.cuda.device(self.device):
            _add_directions_kernel[(self.tiles,)](
                self.table, seeds_on_device, scales_on_device, self.count, alpha, beta,
                CHAIN=chain, USED=used, CORRELATED=bool(alpha) and chain > 1, RADEMACHER=bool(is_rademacher),
                SOURCE=self.source_type, TARGET=self.target_type,
                SEARCH_STEPS=self.search_steps, TILE=TILE, enable_fp_fusion=False, num_warps=4,
            )


def _to_device(packed: bytes, device: torch.device) -> torch.Tensor:
    """``packed`` as a uint8 tensor on ``device``, by a copy that does not wait for the GPU (CUDA stages pageable
    host memory before the call returns, so the bytes may go right after it)."""
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(device, non_blocking=True)


def add_directions(sources, targets, seeds, scales, correlation=0.0, is_rademacher=False, firsts=None) -> None:
    """`kernels.add_directions` on a GPU, for tensors that one `KernelCall` serves (one source and one target dtype)."""
    KernelCall(sources, targets, firsts)([s for row in seeds for s in row], [list(row) for row in scales], correlation,
                                         is_rademacher)


# ------------------------------------------------------------------------------------------ kernel
# philox's constants as Triton compile-time values: the float32 ones are exact in float32
_M0, _M1, _W0, _W1 = (tl.constexpr(c) for c in (philox.M0, philox.M1, philox.W0, philox.W1))
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = (tl.constexpr(c) for c in philox.LOG_POLY)
_LN2_LOW, _LN2_HIGH, _HALF_PI = tl.constexpr(philox.LOG_LN2_LOW), tl.constexpr(philox.LOG_LN2_HIGH), tl.constexpr(philox.HALF_PI)
_S0, _S1, _S2 = (tl.constexpr(c) for c in philox.SIN_POLY)
_C0, _C1, _C2 = (tl.constexpr(c) for c in philox.COS_POLY)


@triton.jit
def _philox(seed, block):
    """Philox4x32-10 of counters (block, 0, 0) under key ``seed`` (an int64 holding the key's 64 bits)."""
    x0, x1 = block.to(tl.uint32), (block >> 32).to(tl.uint32)
    x2 = x0 * 0
    x3 = x2
    k0, k1 = seed.to(tl.uint32), (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        hi0, lo0 = tl.umulhi(x0, _M0), x0 * _M0  # unsigned 32-bit: the products and sums wrap around
        hi1, lo1 = tl.umulhi(x2, _M1), x2 * _M1
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = k0 + _W0, k1 + _W1
    return x0, x1, x2, x3


@triton.jit
def _log(u):
    """Cephes' logf, as `philox._log` computes it."""
    bits = u.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 126
    mantissa = (bits & 0x007FFFFF) | 0x3F000000  # in [0.5, 1)
    small = mantissa < 0x3F3504F3  # below sqrt(1/2): use 2m and exponent - 1
    exponent = exponent - small.to(tl.int32)
    m = (mantissa + (small.to(tl.uint32) << 23)).to(tl.float32, bitcast=True) - 1.0
    z = m * m
    y = ((((((((m * 0 + _L0) * m + _L1) * m + _L2) * m + _L3) * m + _L4) * m + _L5) * m + _L6) * m + _L7) * m + _L8
    e = exponent.to(tl.float32)
    y = y * m * z + e * _LN2_LOW + z * -0.5
    return m + y + e * _LN2_HIGH


@triton.jit
def _box_muller(a, t):
    """(r cos θ, r sin θ) of the radius word ``a`` and the angle word ``t``, as `philox.gaussian` computes them."""
    u = (((a >> 9) << 1) | 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # (2k + 1) / 2^24
    radius = tl.sqrt_rn(_log(u) * -2.0)
    angle = (((((t & 0x3FFFFFFF) >> 6) << 1) | 1).to(tl.int32) - (1 << 24)).to(tl.float32) * 2.9802322387695312e-08
    angle = angle * _HALF_PI  # in (-π/4, π/4): the line above is an odd integer times 2^-25
    zz = angle * angle
    sine = ((zz * _S0 + _S1) * zz + _S2) * zz * angle + angle
    cosine = ((zz * _C0 + _C1) * zz + _C2) * zz * zz - zz * 0.5 + 1.0
    odd, negate = ((t >> 30) & 1) == 1, (t >> 31) == 1  # rotate by quadrant / 4 turns
    cosine, sine = tl.where(odd, -sine, cosine), tl.where(odd, cosine, sine)
    cosine, sine = tl.where(negate, -cosine, cosine), tl.where(negate, -sine, sine)
    return radius * cosine, radius * sine


@triton.jit
def _draw(seed, tile, RADEMACHER: tl.constexpr, TILE: tl.constexpr):
    """Entries [tile·TILE, (tile + 1)·TILE) of the direction of ``seed``, in order."""
    if RADEMACHER:  # entry e: bit e % 32 of word (e // 32) % 4 of block e // 128
        x0, x1, x2, x3 = _philox(seed, tile * (TILE // 128) + tl.arange(0, TILE // 128))
        words = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (TILE // 32,))
        bits = (words[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1
        return tl.reshape(bits, (TILE,)).to(tl.int32).to(tl.float32) * 2.0 - 1.0
    else:  # entry 4b + 2p + j: the cosine (j = 0) or the sine of pair p of block b
        x0, x1, x2, x3 = _philox(seed, tile * (TILE // 4) + tl.arange(0, TILE // 4))
        c0, s0 = _box_muller(x0, x1)
        c1, s1 = _box_muller(x2, x3)
        return tl.reshape(tl.join(tl.join(c0, c1), tl.join(s0, s1)), (TILE,))


@triton.jit
def _add_directions_kernel(table, seeds, scales, count, alpha, beta, CHAIN: tl.constexpr, USED: tl.constexpr,
                           CORRELATED: tl.constexpr, RADEMACHER: tl.constexpr, SOURCE: tl.constexpr,
                           TARGET: tl.constexpr, SEARCH_STEPS: tl.constexpr, TILE: tl.constexpr):
    """Program p finds the tensor t whose tiles hold p (bisection of the table's first tiles), then draws one tile."""
    program = tl.program_id(0).to(tl.int64)
    t = program * 0
    size = count + t
    for _ in tl.static_range(SEARCH_STEPS):
        half = size // 2
        t = tl.where(tl.load(table + t + half) <= program, t + half, t)
        size = size - half
    first, numel = tl.load(table + 3 * count + 1 + t), tl.load(table + 4 * count + 1 + t)
    tile = first // TILE + program - tl.load(table + t)
    index = tile * TILE + tl.arange(0, TILE) - first  # the tile's entries, as indices into the tensor
    inside = (index >= 0) & (index < numel)
    source = tl.load(table + count + 1 + t).to(tl.pointer_type(SOURCE))
    target = tl.load(table + 2 * count + 1 + t).to(tl.pointer_type(TARGET))
    acc = tl.load(source + index, mask=inside, other=0.0).to(tl.float32)
    z = acc
    for k in tl.static_range(CHAIN):
        w = _draw(tl.load(seeds + t * CHAIN + k), tile, RADEMACHER, TILE)
        if CORRELATED and k > 0:
            z = alpha * z + beta * w
        else:
            z = w
        if (USED >> k) & 1:
            acc = acc + tl.load(scales + t * CHAIN + k) * z
    tl.store(target + index, acc.to(TARGET), mask=inside)
