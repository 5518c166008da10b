"""Counter-based random directions: entry i of z is a pure function of (seed, i), the same on every device.

Philox4x32-10 (Salmon et al., SC 2011; the generator of cuRAND and of torch on CUDA) maps a 64-bit
counter and a 64-bit key to 128 random bits. Direction entries are drawn from those bits:

* Gaussian: block b = i // 4 (counter b, key = seed) gives two Box-Muller pairs. Words 2p and 2p + 1
  give entries 4b + 2p and 4b + 2p + 1: a radius sqrt(-2 ln u) from u = (2⌊w/2⁹⌋ + 1)/2²⁴ and an angle
  from the other word's top 2 bits (quadrant) and next 24 bits. ln, sin and cos are Cephes' float32
  polynomials, so every operation is an exact integer op or one IEEE float32 +, ×, or sqrt.
* Rademacher: entry i is bit i % 32 of word (i // 32) % 4 of block i // 128, mapped to ±1.

Because nothing depends on a generator's state, any slice of z can be drawn on its own: a C kernel
(``_philox.c``, built by ``pip install``) draws and adds tile by tile on every core, at about a third
of the cost of ``torch.normal_`` alone (``benchmarks/bench_directions.py``); on GPUs a Triton kernel
(`philox_triton`) does the same operations; and the torch code below (the fallback where neither kernel
serves, and the tests' reference) gives the same numbers bit for bit, on any device.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import math
import struct
import warnings
from collections import defaultdict
from pathlib import Path

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF

# float32 constants, written as the exact values the C kernel spells in hex
LOG_POLY = [float.fromhex(h) for h in (
    "0x1.204376p-4", "-0x1.d7a37p-4", "0x1.de4a34p-4", "-0x1.fcba9ep-4", "0x1.23d37ep-3",
    "-0x1.555cap-3", "0x1.999d58p-3", "-0x1.fffff8p-3", "0x1.555554p-2",
)]
LOG_LN2_LOW, LOG_LN2_HIGH = float.fromhex("-0x1.bd0106p-13"), float.fromhex("0x1.63p-1")
SIN_POLY = [float.fromhex(h) for h in ("-0x1.9943f2p-13", "0x1.11073cp-7", "-0x1.555546p-3")]
COS_POLY = [float.fromhex(h) for h in ("0x1.99eb9cp-16", "-0x1.6c0c34p-10", "0x1.55554ap-5")]
HALF_PI = float.fromhex("0x1.921fb6p+0")

TORCH_CHUNK = 1 << 18  # entries per pass of the torch code and per half-precision kernel call


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block in plain Python integers (checked against Random123's known answers)."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * x0, M1 * x2
        x0, x1, x2, x3 = (p1 >> 32) ^ x1 ^ k0, p1 & MASK32, (p0 >> 32) ^ x3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return x0, x1, x2, x3


# ------------------------------------------------------------------------------------- torch code
def philox_blocks(seed: int, first_block: int, num_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Blocks ``first_block ...`` of key ``seed`` as an int64 tensor (num_blocks, 4) of 32-bit words."""
    counter = torch.arange(first_block, first_block + num_blocks, dtype=torch.int64, device=device)
    x0, x1 = counter & MASK32, counter >> 32
    x2 = x3 = torch.zeros_like(counter)
    k0, k1 = seed & MASK32, seed >> 32 & MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(x0, M0)
        hi1, lo1 = _mulhilo(x2, M1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return torch.stack([x0, x1, x2, x3], dim=1)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·m (a < 2³², m < 2³²) without leaving int64's range."""
    low, high = (a & 0xFFFF) * m, (a >> 16) * m  # each < 2⁴⁸
    return (high + (low >> 16)) >> 16, (low + ((high & 0xFFFF) << 16)) & MASK32


def gaussian(seed: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries ``first ... first + count - 1`` of the Gaussian direction of ``seed`` (float32)."""
    first_block = first // 4
    words = philox_blocks(seed, first_block, -(-(first + count) // 4) - first_block, device)
    a, t = words[:, 0::2], words[:, 1::2]  # radius and angle words of the two pairs of each block
    u = (((a >> 9) << 1) | 1).float() * 2.0**-24
    # torch.sqrt of float32 differs from IEEE sqrtf on ~20% of inputs on this CPU build; float64 sqrt
    # rounded to float32 is the correctly rounded float32 sqrt (53 >= 2·24 + 2 bits)
    radius = torch.sqrt((_log(u) * -2.0).double()).float()
    quadrant = t >> 30
    angle = (((((t & 0x3FFFFFFF) >> 6) << 1) | 1) - (1 << 24)).float() * 2.0**-25 * HALF_PI
    zz = angle * angle
    sine = ((zz * SIN_POLY[0] + SIN_POLY[1]) * zz + SIN_POLY[2]) * zz * angle + angle
    cosine = ((zz * COS_POLY[0] + COS_POLY[1]) * zz + COS_POLY[2]) * zz * zz - zz * 0.5 + 1.0
    odd, negate = (quadrant & 1).bool(), (quadrant & 2).bool()
    cosine, sine = torch.where(odd, -sine, cosine), torch.where(odd, cosine, sine)
    cosine, sine = torch.where(negate, -cosine, cosine), torch.where(negate, -sine, sine)
    z = torch.stack([radius * cosine, radius * sine], dim=-1).reshape(-1)
    return z[first - 4 * first_block :][:count]


def _log(u: torch.Tensor) -> torch.Tensor:
    """ln u for float32 u in (0, 1): Cephes' logf, as the kernel computes it."""
    bits = u.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 126
    mantissa = (bits & 0x007FFFFF) | 0x3F000000  # in [0.5, 1)
    small = (mantissa < 0x3F3504F3).int()  # below sqrt(1/2): use 2m and exponent - 1
    exponent = (exponent - small).float()
    m = (mantissa + (small << 23)).view(torch.float32) - 1.0
    z = m * m
    y = torch.full_like(m, LOG_POLY[0])
    for c in LOG_POLY[1:]:
        y = y * m + c
    y = y * m * z + exponent * LOG_LN2_LOW + z * -0.5
    return m + y + exponent * LOG_LN2_HIGH


def rademacher(seed: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries ``first ... first + count - 1`` of the ±1 direction of ``seed`` (float32)."""
    first_block = first // 128
    words = philox_blocks(seed, first_block, -(-(first + count) // 128) - first_block, device)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=device)) & 1  # (block, word, bit): entry order
    return (bits.reshape(-1)[first - 128 * first_block :][:count] * 2 - 1).float()


def _add_directions_torch(source, target, first, seeds, scales, alpha, beta, is_rademacher):
    draw = rademacher if is_rademacher else gaussian
    wide = torch.float64 in (source.dtype, target.dtype)
    for start in range(0, source.numel(), TORCH_CHUNK):
        piece = slice(start, min(start + TORCH_CHUNK, source.numel()))
        acc = source[piece].to(torch.float64 if wide else torch.float32, copy=True)
        z = None
        for seed, scale in zip(seeds, scales):
            w = draw(seed, first + start, piece.stop - start, source.device)
            z = w if z is None or not alpha else z * alpha + w * beta
            if scale is not None:
                acc = acc + z.to(acc.dtype) * scale
        target[piece].copy_(acc)


# -------------------------------------------------------------------------------------- C kernel
ABI_VERSION = 3  # ZO_PHILOX_ABI of _philox.c: a kernel built from an older source is not used


def _load_library():
    """The compiled kernel, or None (with the reason) where ``pip install`` could not build it."""
    path = next(
        (p for s in importlib.machinery.EXTENSION_SUFFIXES if (p := Path(__file__).with_name(f"_philox{s}")).exists()),
        None,
    )
    if path is None:
        return None, "it was not built (no C compiler at install?)"
    try:
        library = ctypes.CDLL(str(path))  # ctypes releases the GIL for each call
        library.zo_abi_version.restype = ctypes.c_int32
        version = library.zo_abi_version()
    except (OSError, AttributeError) as error:
        return None, f"{path.name} cannot be loaded ({error}); reinstall with pip install -e ."
    if version != ABI_VERSION:
        return None, f"{path.name} was built from another version of _philox.c; reinstall with pip install -e ."
    library.zo_add_directions.restype = None
    library.zo_add_directions.argtypes = [
        ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64), ctypes.c_int32,
        ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8),
        ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_int32,
    ]  # fmt: skip
    library.zo_philox_blocks.restype = ctypes.c_int32
    library.zo_philox_blocks.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    return library, None


LIBRARY, WHY_NO_KERNEL = _load_library()
KERNEL = LIBRARY.zo_add_directions if LIBRARY is not None else None


def _kernel(pieces, seeds, scales, alpha, beta, is_rademacher):
    """One kernel call over float32 ``pieces`` (source, target, first), with one row of seeds and scales each."""
    count, chain = len(pieces), len(seeds[0])
    KERNEL(
        count,
        (ctypes.c_void_p * count)(*[source.data_ptr() for source, _, _ in pieces]),
        (ctypes.c_void_p * count)(*[target.data_ptr() for _, target, _ in pieces]),
        (ctypes.c_int64 * count)(*[first for _, _, first in pieces]),
        (ctypes.c_int64 * count)(*[source.numel() for source, _, _ in pieces]),
        chain,
        (ctypes.c_uint64 * (count * chain))(*[s for row in seeds for s in row]),
        (ctypes.c_float * (count * chain))(*[0.0 if s is None else s for row in scales for s in row]),
        (ctypes.c_uint8 * chain)(*[s is not None for s in scales[0]]),
        alpha,
        beta,
        int(is_rademacher),
        torch.get_num_threads(),
    )


def _add_directions_half(source, target, first, seeds, scales, alpha, beta, is_rademacher):
    """Half precision through the kernel: float32 chunks, one rounding to the target's dtype."""
    for start in range(0, source.numel(), TORCH_CHUNK):
        piece = slice(start, min(start + TORCH_CHUNK, source.numel()))
        acc = source[piece].to(torch.float32, copy=True)
        _kernel([(acc, acc, first + start)], [seeds], [scales], alpha, beta, is_rademacher)
        target[piece].copy_(acc)


def add_directions(
    sources: list[torch.Tensor],
    targets: list[torch.Tensor],
    seeds: list[list[int]],
    scales: list[list[float | None]],
    correlation: float = 0.0,
    is_rademacher: bool = False,
    firsts: list[int] | None = None,
    check: bool = True,
) -> None:
    """``targets[t] = sources[t] + Σ_k scales[t][k]·z_tk[firsts[t]:]`` for each t, over flat tensors on any device.

    z_tk is drawn with ``seeds[t][k]``, from its entry ``firsts[t]`` on (0 by default: a whole tensor).
    With ``correlation`` α ≠ 0 the z_tk form the chain z_tk = α z_t,k-1 + sqrt(1 - α²) w_tk; a ``None``
    scale draws its link of the chain without adding it, and must be ``None`` in every row. Arithmetic is
    float32 with one rounding to the target's dtype (float64 if either tensor is float64, with z still drawn
    in float32); scales and α are rounded to float32 first. ``targets[t]`` may be ``sources[t]``. The
    float32 tensors are drawn by one kernel call, so a list of small tensors costs one call, not one each; on a
    GPU, the tensors of one source and one target dtype by one launch of `philox_triton`'s kernel (the same numbers).
    Where neither kernel serves, the torch code draws the same numbers on the tensors' device, more slowly.
    ``check=False`` skips the checks of the arguments, for a caller that has made them already (`DirectionSampler`).
    """
    firsts = [0] * len(sources) if firsts is None else firsts
    if check:
        _check(sources, targets, seeds, scales, firsts)
    if not sources:
        return
    alpha, beta = _chain_coefficients(correlation)
    seeds = [[int(s) & 0xFFFFFFFFFFFFFFFF for s in row] for row in seeds]
    scales = [[None if s is None else _float32(s) for s in row] for row in scales]
    batch = []  # float32 CPU tensors: one kernel call for all of them
    on_gpu = defaultdict(list)  # (source dtype, target dtype) -> GPU tensors drawn by one launch
    for source, target, first, row_seeds, row_scales in zip(sources, targets, firsts, seeds, scales):
        if source.device.type != "cpu" and _gpu_kernel_serves(source, target):
            on_gpu[source.dtype, target.dtype].append((source, target, first, row_seeds, row_scales))
        elif KERNEL is None or source.device.type != "cpu" or torch.float64 in (source.dtype, target.dtype):
            _warn_once(source)
            _add_directions_torch(source, target, first, row_seeds, row_scales, alpha, beta, is_rademacher)
        elif source.dtype == target.dtype == torch.float32:
            batch.append(((source, target, first), row_seeds, row_scales))
        else:
            _add_directions_half(source, target, first, row_seeds, row_scales, alpha, beta, is_rademacher)
    if batch:
        _kernel([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch], alpha, beta, is_rademacher)
    for rows in on_gpu.values():
        gpu_sources, gpu_targets, gpu_firsts, gpu_seeds, gpu_scales = map(list, zip(*rows))
        _GPU_KERNEL.add_directions(gpu_sources, gpu_targets, gpu_seeds, gpu_scales, correlation, is_rademacher, gpu_firsts)


def prepare(sources: list[torch.Tensor], targets: list[torch.Tensor]):
    """A prepared `add_directions` over these fixed flat tensors, from their first entries: a `KernelCall` (float32 CPU
    tensors, the C kernel) or a `philox_triton.KernelCall` (GPU tensors of one source and one target dtype, Triton),
    called as ``call(seeds, scales, correlation, is_rademacher)``; None where no kernel serves them in one call."""
    if not sources:
        return None
    if sources[0].device.type == "cpu":
        if KERNEL is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (*sources, *targets)):
            return None
        return KernelCall(sources, targets)
    if not all(_gpu_kernel_serves(s, t) and (s.dtype, t.dtype) == (sources[0].dtype, targets[0].dtype)
               for s, t in zip(sources, targets)):
        return None
    return _GPU_KERNEL.KernelCall(sources, targets)


def _check(sources, targets, seeds, scales, firsts) -> None:
    if any(first < 0 for first in firsts):
        raise ValueError(f"firsts must be entries >= 0, got {firsts}")
    if not len(sources) == len(targets) == len(seeds) == len(scales) == len(firsts):
        raise ValueError(f"one row of seeds and scales per tensor: got {len(sources)} sources, "
                         f"{len(targets)} targets, {len(seeds)} rows of seeds, {len(scales)} rows of scales")
    used = [s is not None for s in scales[0]] if scales else []
    for row_seeds, row_scales in zip(seeds, scales):
        if len(row_seeds) != len(used) or [s is not None for s in row_scales] != used:
            raise ValueError(f"every row needs {len(used)} seeds and scales with None at the same links, "
                             f"got seeds {row_seeds} and scales {row_scales}")
    for source, target in zip(sources, targets):  # raw pointers go to the kernels: refuse anything but flat storage
        if source.device != target.device or source.dim() != 1 or not source.is_contiguous() \
                or not target.is_contiguous() or target.shape != source.shape:
            raise ValueError(f"add_directions needs flat contiguous tensors of equal size on one device, got "
                             f"{tuple(source.shape)} on {source.device} and {tuple(target.shape)} on {target.device}")


class KernelCall:
    """`add_directions` over fixed float32 CPU tensors, with their pointers and sizes turned into the kernel's
    arguments once, for a caller that repeats the same call with new seeds and scales.

    Why: a probe draws each group of perturbed copies between two layers' matrix products, at every forward,
    and there every Python and torch call runs from cold caches: building the arguments (pointers, sizes, dtype
    checks, ctypes arrays) cost more than drawing a small group (`benchmarks/bench_probe_overhead.py` splits a
    probe's draws into the kernel and the Python around it). The tensors are kept, so the pointers stay valid
    while the call lives.
    """

    def __init__(self, sources: list[torch.Tensor], targets: list[torch.Tensor]):
        if KERNEL is None:
            raise RuntimeError(f"the C kernel is unavailable: {WHY_NO_KERNEL}")
        _check(sources, targets, [[0]] * len(sources), [[1.0]] * len(sources), [0] * len(sources))
        if any(t.dtype != torch.float32 for t in (*sources, *targets)):
            raise ValueError("KernelCall serves float32 tensors only (add_directions rounds other dtypes)")
        self.tensors, self.count = (sources, targets), len(sources)
        count = self.count
        self.arguments = (
            (ctypes.c_void_p * count)(*[t.data_ptr() for t in sources]),
            (ctypes.c_void_p * count)(*[t.data_ptr() for t in targets]),
            (ctypes.c_int64 * count)(),  # every tensor from its first entry
            (ctypes.c_int64 * count)(*[t.numel() for t in sources]),
        )
        self.rows: dict[int, tuple] = {}  # chain length -> (seeds, scales, used) arrays, filled at each call

    def __call__(self, seeds: list[int], scales: list[float | None], correlation: float, is_rademacher: bool) -> None:
        """``targets[t] = sources[t] + Σ_k scales[k]·z_tk`` with z_tk drawn from ``seeds[t * len(scales) + k]``: the
        same scales for every tensor (a probe's ±ε), None for a link drawn and not added (see `add_directions`)."""
        chain = len(scales)
        if len(seeds) != self.count * chain:
            raise ValueError(f"{self.count} tensors x {chain} links need {self.count * chain} seeds, got {len(seeds)}")
        if chain not in self.rows:
            self.rows[chain] = ((ctypes.c_uint64 * (self.count * chain))(), (ctypes.c_float * (self.count * chain))(),
                                (ctypes.c_uint8 * chain)())
        seed_array, scale_array, used = self.rows[chain]
        seed_array[:] = [s & 0xFFFFFFFFFFFFFFFF for s in seeds]
        scale_array[:] = [0.0 if s is None else _float32(s) for s in scales] * self.count
        used[:] = [s is not None for s in scales]
        KERNEL(self.count, *self.arguments, chain, seed_array, scale_array, used, *_chain_coefficients(correlation),
               int(is_rademacher), torch.get_num_threads())


def add_rows(
    matrix: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    seeds: list[int],
    scales: list[float | None],
    correlation: float = 0.0,
    is_rademacher: bool = False,
) -> None:
    """``out[i] = matrix[rows[i]] + Σ_k scales[k]·z_k[rows[i]]``: the rows of a perturbed matrix, without the matrix.

    z_k is the direction of ``seeds[k]`` over the whole (flat) matrix, so each row equals the same row of
    `add_directions` over the matrix, bit for bit. One kernel call, its arguments built by torch, not by a
    Python loop over rows: an embedding's rows for a batch are thousands. Float32 CPU tensors and the kernel only.
    """
    if KERNEL is None or matrix.dtype != torch.float32 or out.dtype != torch.float32 or rows.dtype != torch.int64 \
            or {matrix.device.type, out.device.type, rows.device.type} != {"cpu"} or matrix.dim() != 2 or rows.dim() != 1 \
            or not (matrix.is_contiguous() and out.is_contiguous() and rows.is_contiguous()) \
            or out.shape != (len(rows), matrix.shape[1]):
        raise ValueError(f"add_rows needs the C kernel, a contiguous float32 CPU matrix, flat int64 CPU rows and an out "
                         f"of shape (rows, columns); got {matrix.dtype} {tuple(matrix.shape)} on {matrix.device}, "
                         f"{rows.dtype} rows of shape {tuple(rows.shape)}, {out.dtype} {tuple(out.shape)}, kernel "
                         f"{'present' if KERNEL else 'absent'}")
    count, width, chain = len(rows), matrix.shape[1], len(seeds)
    if not count:
        return
    if rows.min() < 0 or rows.max() >= matrix.shape[0]:
        raise IndexError(f"add_rows: rows must lie in [0, {matrix.shape[0]}), got {rows.min().item()}..{rows.max().item()}")
    firsts = rows * width
    item = matrix.element_size()
    sources = firsts * item + matrix.data_ptr()
    targets = torch.arange(count, dtype=torch.int64) * (width * item) + out.data_ptr()
    sizes = torch.full((count,), width, dtype=torch.int64)
    seed_bits = [int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds]  # as int64 with the same bits: the kernel reads uint64
    seed_rows = torch.tensor([s - (1 << 64) if s >> 63 else s for s in seed_bits], dtype=torch.int64).repeat(count)
    scale_rows = torch.tensor([0.0 if s is None else s for s in scales], dtype=torch.float32).repeat(count)
    alpha, beta = _chain_coefficients(correlation)
    pointer = lambda t, kind: ctypes.cast(t.data_ptr(), ctypes.POINTER(kind))  # noqa: E731  # the tensors outlive the call
    KERNEL(count, pointer(sources, ctypes.c_void_p), pointer(targets, ctypes.c_void_p), pointer(firsts, ctypes.c_int64),
           pointer(sizes, ctypes.c_int64), chain, pointer(seed_rows, ctypes.c_uint64), pointer(scale_rows, ctypes.c_float),
           (ctypes.c_uint8 * chain)(*[s is not None for s in scales]), alpha, beta, int(is_rademacher),
           torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _chain_coefficients(correlation: float) -> tuple[float, float]:
    """α and sqrt(1 - α²) of the correlated chain, rounded to float32 as the kernel uses them."""
    return _float32(correlation), _float32((1.0 - correlation**2) ** 0.5)


def _float32(x: float) -> float:
    """x rounded to float32, ±inf beyond its range (as torch rounds; struct raises there on newer Pythons)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


# ------------------------------------------------------------------------------------------ GPUs
_GPU_KERNEL, WHY_NO_GPU_KERNEL = None, None  # philox_triton once imported, or why it cannot be
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what philox_triton draws (float64: the torch code)


def _gpu_kernel_serves(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `philox_triton` draws for these tensors: on a CUDA (or ROCm) device, with Triton installed (imported
    on the first call; the CPU never needs it), float32 or half precision."""
    global _GPU_KERNEL, WHY_NO_GPU_KERNEL
    if source.device.type != "cuda" or source.dtype not in GPU_DTYPES or target.dtype not in GPU_DTYPES:
        return False
    if _GPU_KERNEL is None and WHY_NO_GPU_KERNEL is None:
        try:
            from . import philox_triton
        except ImportError as error:
            WHY_NO_GPU_KERNEL = f"Triton cannot be imported ({error}); pip install triton"
        else:
            _GPU_KERNEL = philox_triton
    return _GPU_KERNEL is not None


_warned: set[str] = set()  # the device types whose missing kernel was reported


def _warn_once(tensor: torch.Tensor) -> None:
    """Say once per device type that its kernel is missing (float64, which no kernel draws, is not news)."""
    kind = tensor.device.type
    why = {"cpu": f"the C kernel is unavailable: {WHY_NO_KERNEL}", "cuda": WHY_NO_GPU_KERNEL}.get(kind)
    if kind in _warned or why is None or (kind == "cpu" and KERNEL is not None):
        return
    _warned.add(kind)
    warnings.warn(f"zo_trainer draws {kind} directions with torch code because {why}. The numbers are identical but "
                  "drawing is many times slower.", stacklevel=3)
