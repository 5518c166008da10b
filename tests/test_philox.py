"""Counter-based directions against independent references: Random123's known answers, a float64
Box-Muller of the same bits, and the C kernel against the torch code bit for bit."""

import math
import warnings

import pytest
import torch

from zo_trainer.zo import kernels, philox

KNOWN_ANSWERS = [  # Random123 kat_vectors: philox4x32 10 (counter, key) -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
SEED = 0x243F6A8885A308D3
needs_kernel = pytest.mark.skipif(kernels.KERNEL is None, reason="the C kernel was not built (no C compiler at install)")


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_scalar_philox_gives_random123_known_answers(counter, key, expected):
    assert philox.philox4x32_10(counter, key) == expected


def test_torch_blocks_equal_scalar_philox_across_the_32_bit_counter_boundary():
    first = 2**32 - 3
    blocks = philox.philox_blocks(SEED, first, 6)
    for i, row in enumerate(blocks.tolist()):
        c = first + i
        assert tuple(row) == philox.philox4x32_10((c & 0xFFFFFFFF, c >> 32, 0, 0), (SEED & 0xFFFFFFFF, SEED >> 32))


@needs_kernel
@pytest.mark.parametrize("isa", [0, 1, 2], ids=["portable", "avx2", "avx512"])
def test_each_kernel_implementation_gives_the_scalar_philox_blocks(isa):
    first = 2**32 - 32  # the counter's high word becomes 1 at lane 32
    out = torch.empty(4, 64, dtype=torch.int32)
    if not kernels.LIBRARY.zo_philox_blocks(SEED, first, 64, isa, out.data_ptr()):
        pytest.skip(f"this CPU lacks the instructions of implementation {isa}")
    for lane in (0, 1, 15, 31, 32, 63):
        c = first + lane
        expected = philox.philox4x32_10((c & 0xFFFFFFFF, c >> 32, 0, 0), (SEED & 0xFFFFFFFF, SEED >> 32))
        assert tuple(w & 0xFFFFFFFF for w in out[:, lane].tolist()) == expected


def float64_box_muller(seed, count):
    """The documented recipe in float64 with torch's log/cos/sin, from the scalar generator's bits."""
    out = []
    for b in range(-(-count // 4)):
        words = philox.philox4x32_10((b, 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
        for a, t in (words[0:2], words[2:4]):
            radius = math.sqrt(-2 * math.log(((a >> 9) * 2 + 1) / 2**24))
            fraction = (((t & 0x3FFFFFFF) >> 6) * 2 + 1 - 2**24) / 2**25  # in (-1/2, 1/2)
            theta = ((t >> 30) + fraction) * math.pi / 2
            out += [radius * math.cos(theta), radius * math.sin(theta)]
    return torch.tensor(out[:count], dtype=torch.float64)


def test_gaussian_entries_are_box_muller_of_the_philox_bits():
    z = philox.gaussian(SEED, 0, 4001).double()
    reference = float64_box_muller(SEED, 4001)
    assert (z - reference).abs().max() < 2e-6  # float32 polynomials for ln, sin, cos: a few ulp
    assert ((z - reference).abs() / reference.abs()).median() < 1e-7


def test_rademacher_entries_are_the_philox_bits():
    z = philox.rademacher(SEED, 0, 300)
    for i in range(300):
        word = philox.philox4x32_10((i // 128, 0, 0, 0), (SEED & 0xFFFFFFFF, SEED >> 32))[(i // 32) % 4]
        assert z[i].item() == (1.0 if word >> (i % 32) & 1 else -1.0)


@pytest.mark.parametrize("draw", [philox.gaussian, philox.rademacher])
def test_a_slice_drawn_on_its_own_equals_the_same_slice_of_the_whole(draw):
    whole = draw(SEED, 0, 1000)
    for first, count in ((0, 1), (3, 5), (129, 300), (997, 3)):
        assert torch.equal(draw(SEED, first, count), whole[first : first + count])


def test_gaussian_has_the_moments_and_the_distribution_of_a_standard_normal():
    z = philox.gaussian(7, 0, 1 << 21).double()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(z.pow(4).mean() - 3) < 5 * math.sqrt(96 / n)
    cdf = torch.special.ndtr(z.sort().values)
    ks = (cdf - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1% level
    assert abs((z[1:] * z[:-1]).mean()) < 5 / math.sqrt(n)


def both_paths(source, target_dtype, seeds, scales, correlation, is_rademacher, threads):
    """``add_directions`` through the C kernel and through the torch code."""
    results = []
    before = torch.get_num_threads()
    for kernel in (kernels.KERNEL, None):
        target = torch.empty(source.numel(), dtype=target_dtype)
        old, kernels.KERNEL = kernels.KERNEL, kernel
        torch.set_num_threads(threads)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the torch code's one-time notice
                kernels.add_directions([source], [target], [seeds], [scales], correlation, is_rademacher)
        finally:
            kernels.KERNEL = old
            torch.set_num_threads(before)
        results.append(target)
    return results


@needs_kernel
@pytest.mark.parametrize("is_rademacher", [False, True])
@pytest.mark.parametrize("numel", [0, 1, 7, 255, 256, 257, 3 * 65536 + 13])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_torch_code_bit_for_bit(is_rademacher, numel, threads):
    source = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    for seeds, scales, correlation in (
        ([5], [1e-3], 0.0),
        ([5, 2**64 - 1, 11], [0.5, None, -3.0], 0.0),
        ([5, 9, 11], [None, 0.3, 0.7], -0.5),
    ):
        kernel, reference = both_paths(source, torch.float32, seeds, scales, correlation, is_rademacher, threads)
        assert torch.equal(kernel.view(torch.int32), reference.view(torch.int32))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_equals_torch_code_in_half_precision(dtype):
    source = torch.randn(philox.TORCH_CHUNK + 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    kernel, reference = both_paths(source, dtype, [3, 4], [1e-2, -1e-2], 0.0, False, 2)
    assert torch.equal(kernel.view(torch.int16), reference.view(torch.int16))


def test_in_place_update_equals_out_of_place():
    source = torch.randn(70_001, generator=torch.Generator().manual_seed(1))
    out = torch.empty_like(source)
    kernels.add_directions([source], [out], [[8]], [[0.25]])
    kernels.add_directions([source], [source], [[8]], [[0.25]])
    assert torch.equal(source, out)


@pytest.mark.parametrize("kernel", [pytest.param(kernels.KERNEL, marks=needs_kernel, id="kernel"), pytest.param(None, id="torch code")])
def test_one_call_over_many_tensors_equals_one_call_each(kernel, monkeypatch):
    """The kernel draws a list of tensors in one parallel region; each must come out as if drawn alone,
    with its own seeds and scales, whatever its dtype and size (sizes straddle the tile and the thread split)."""
    monkeypatch.setattr(kernels, "_warned", {"cpu"})  # the torch code's one-time notice
    monkeypatch.setattr(kernels, "KERNEL", kernel)
    g = torch.Generator().manual_seed(2)
    sizes_and_dtypes = [(5000, torch.float32), (1, torch.float32), (300, torch.bfloat16), (70_001, torch.float32),
                        (256, torch.float32), (999, torch.float64), (4095, torch.float32)]  # fmt: skip
    sources = [torch.randn(n, generator=g).to(dtype) for n, dtype in sizes_and_dtypes]
    seeds = [[11 + t, 2**63 + t, 7 * t] for t in range(len(sources))]
    scales = [[0.5 / (t + 1), None, -1e-3 * t] for t in range(len(sources))]
    together = [torch.empty_like(s) for s in sources]
    kernels.add_directions(sources, together, seeds, scales, -0.25)
    for t, source in enumerate(sources):
        alone = torch.empty_like(source)
        kernels.add_directions([source], [alone], [seeds[t]], [scales[t]], -0.25)
        assert torch.equal(together[t], alone), f"tensor {t} of {sizes_and_dtypes[t]}"


@needs_kernel
@pytest.mark.parametrize("is_rademacher", [False, True])
def test_slices_and_matrix_rows_drawn_from_any_entry_equal_the_torch_code(is_rademacher):
    """The kernel's tiles start at multiples of 256; a slice that starts or ends inside one (a row of a matrix, or
    a slice within one tile) adds the part of the tile it overlaps. Reference: the torch code, which draws any
    entry on its own."""
    g = torch.Generator().manual_seed(4)
    seeds, scales, correlation = [21, 2**64 - 3], [None, 0.125], 0.6
    for first, count in ((37, 1000), (255, 1), (300, 50), (1000 * 320 + 64, 320), (513, 300_001)):
        source = torch.randn(count, generator=g)
        kernel, torch_code = torch.empty(count), torch.empty(count)
        kernels.add_directions([source], [kernel], [seeds], [scales], correlation, is_rademacher, firsts=[first])
        alpha, beta = philox.chain_coefficients(correlation)
        philox.add_directions_reference(source, torch_code, first, seeds, scales, alpha, beta, is_rademacher)
        assert torch.equal(kernel.view(torch.int32), torch_code.view(torch.int32)), (first, count)
    matrix = torch.randn(3000, 320, generator=g)
    whole = torch.empty_like(matrix)
    kernels.add_directions([matrix.view(-1)], [whole.view(-1)], [seeds], [scales], correlation, is_rademacher)
    rows = torch.tensor([2999, 0, 17, 17, 801, 4])
    out = torch.empty(len(rows), 320)
    kernels.add_rows(matrix, rows, out, seeds, scales, correlation, is_rademacher)
    assert torch.equal(out, whole[rows])


def test_add_rows_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="add_rows needs"):
        kernels.add_rows(torch.zeros(4, 3, dtype=torch.bfloat16), torch.tensor([1]), torch.zeros(1, 3), [1], [1.0])
    with pytest.raises(ValueError, match="add_rows needs"):
        kernels.add_rows(torch.zeros(4, 3), torch.tensor([[1]]), torch.zeros(1, 3), [1], [1.0])
    with pytest.raises(ValueError, match="firsts"):
        kernels.add_directions([torch.zeros(3)], [torch.zeros(3)], [[1]], [[1.0]], firsts=[-1])


@needs_kernel
@pytest.mark.parametrize("row", [4, -1])
def test_add_rows_refuses_rows_outside_the_matrix(row):
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        kernels.add_rows(torch.zeros(4, 3), torch.tensor([row]), torch.zeros(1, 3), [1], [1.0])


def test_rows_must_agree_on_the_links_they_add():
    one = torch.zeros(10)
    with pytest.raises(ValueError, match="None at the same links"):
        kernels.add_directions([one, one.clone()], [one, one.clone()], [[1, 2], [3, 4]], [[0.1, None], [0.1, 0.2]])


def test_coefficients_beyond_float32_range_become_infinite_not_an_error():
    assert philox.to_float32(1e39) == math.inf and philox.to_float32(-1e39) == -math.inf
    assert philox.to_float32(0.1) == float(torch.tensor(0.1, dtype=torch.float32))
