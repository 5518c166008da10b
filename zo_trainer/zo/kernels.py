"""Where the directions of `philox` are drawn: one dispatcher over the C kernel (CPU), the Triton kernel (GPUs,
`philox_triton`) and the torch code of `philox` (everywhere else), each giving the same numbers bit for bit.

`add_directions` draws and adds a list of flat tensors, each on the fastest kernel that serves it; `prepare` turns a
repeated call over fixed tensors into a `KernelCall` whose arguments are built once; `add_rows` draws the rows of a
perturbed matrix (an embedding's looked-up rows) without the matrix.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from . import philox

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
    for start in range(0, source.numel(), philox.TORCH_CHUNK):
        piece = slice(start, min(start + philox.TORCH_CHUNK, source.numel()))
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
    alpha, beta = philox.chain_coefficients(correlation)
    seeds = [[int(s) & 0xFFFFFFFFFFFFFFFF for s in row] for row in seeds]
    scales = [[None if s is None else philox.to_float32(s) for s in row] for row in scales]
    batch = []  # float32 CPU tensors: one kernel call for all of them
    on_gpu = defaultdict(list)  # (source dtype, target dtype) -> GPU tensors drawn by one launch
    for source, target, first, row_seeds, row_scales in zip(sources, targets, firsts, seeds, scales):
        if source.device.type != "cpu" and _gpu_kernel_serves(source, target):
            on_gpu[source.dtype, target.dtype].append((source, target, first, row_seeds, row_scales))
        elif KERNEL is None or source.device.type != "cpu" or torch.float64 in (source.dtype, target.dtype):
            _warn_once(source)
            philox.add_directions_reference(source, target, first, row_seeds, row_scales, alpha, beta, is_rademacher)
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
        scale_array[:] = [0.0 if s is None else philox.to_float32(s) for s in scales] * self.count
        used[:] = [s is not None for s in scales]
        KERNEL(self.count, *self.arguments, chain, seed_array, scale_array, used, *philox.chain_coefficients(correlation),
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
    alpha, beta = philox.chain_coefficients(correlation)
    pointer = lambda t, kind: ctypes.cast(t.data_ptr(), ctypes.POINTER(kind))  # noqa: E731  # the tensors outlive the call
    KERNEL(count, pointer(sources, ctypes.c_void_p), pointer(targets, ctypes.c_void_p), pointer(firsts, ctypes.c_int64),
           pointer(sizes, ctypes.c_int64), chain, pointer(seed_rows, ctypes.c_uint64), pointer(scale_rows, ctypes.c_float),
           (ctypes.c_uint8 * chain)(*[s is not None for s in scales]), alpha, beta, int(is_rademacher),
           torch.get_num_threads())


# ------------------------------------------------------------------------------------------ GPUs
_GPU_KERNEL, WHY_NO_GPU_KERNEL = None, None  # philox_triton once imported, or why it cannot be


def _gpu_kernel_serves(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `philox_triton` draws for these tensors: on a CUDA (or ROCm) device, with Triton installed (imported
    on the first call; the CPU never needs it), float32 or half precision."""
    global _GPU_KERNEL, WHY_NO_GPU_KERNEL
    if source.device.type != "cuda" or source.dtype not in philox.GPU_DTYPES or target.dtype not in philox.GPU_DTYPES:
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
