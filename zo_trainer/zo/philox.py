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
serves, and the tests' reference) gives the same numbers bit for bit, on any device. `kernels` picks
which one draws; this module only defines the numbers.
"""

from __future__ import annotations

import functools
import math
import struct

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
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the GPU kernel draws (float64: the torch code)


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


def add_directions_reference(source, target, first, seeds, scales, alpha, beta, is_rademacher):
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


@functools.lru_cache(maxsize=8)
def chain_coefficients(correlation: float) -> tuple[float, float]:
    """α and sqrt(1 - α²) of the correlated chain, rounded to float32 as the kernel uses them."""
    return to_float32(correlation), to_float32((1.0 - correlation**2) ** 0.5)


def to_float32(x: float) -> float:
    """x rounded to float32, ±inf beyond its range (as torch rounds; struct raises there on newer Pythons)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)
