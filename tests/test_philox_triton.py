"""The GPU kernel of the directions (`philox_triton`) against the torch code of `philox`, bit for bit.

Without a GPU, Triton's interpreter runs the same kernel source on CPU tensors, one IEEE float32 operation at a
time (numpy): that checks its arithmetic, tiling, table and chain against the independent reference. The
interpreter is chosen when Triton is imported, so these checks run in a subprocess. It rounds float32 to bfloat16
by truncation where GPUs round to nearest, so bfloat16 targets are checked on a GPU only. `tests/test_cuda.py` checks
the compiled kernel on a GPU against the CPU's C kernel.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the GPU kernel needs Triton (pip install triton; Linux)")

CHECKS = textwrap.dedent("""
    import torch
    from zo_trainer.zo import philox, philox_triton

    g = torch.Generator().manual_seed(0)
    sizes_and_firsts = [(1, 0), (1000, 0), (0, 0), (1024, 0), (1025, 0), (3000, 37), (257, 1023), (5, 2**40 + 3)]
    for is_rademacher in (False, True):
        for seeds, scales, correlation in (([[5]], [[1e-3]], 0.0), ([[2**64 - 3, 9]], [[None, -0.5]], 0.6),
                                           ([[7, 2**63 + 1, 11]], [[0.25, None, 2.0]], -0.3)):
            for dtype in (torch.float32, torch.float16):  # the interpreter truncates to bfloat16 (GPUs round: test_cuda)
                sources = [torch.randn(n, generator=g).to(dtype) for n, _ in sizes_and_firsts]
                targets = [torch.empty_like(s) for s in sources]
                firsts = [f for _, f in sizes_and_firsts]
                rows = seeds * len(sources)
                philox_triton.add_directions(sources, targets, rows, scales * len(sources), correlation, is_rademacher,
                                             firsts)
                alpha, beta = philox.chain_coefficients(correlation)
                for source, target, first in zip(sources, targets, firsts):
                    expected = torch.empty_like(source)
                    philox.add_directions_reference(source, expected, first, seeds[0], scales[0], alpha, beta, is_rademacher)
                    bits = torch.int16 if dtype == torch.float16 else torch.int32
                    same = torch.equal(target.view(bits), expected.view(bits))
                    assert same, (is_rademacher, seeds, correlation, dtype, source.numel(), first,
                                  (target.float() - expected.float()).abs().max().item())
    # a prepared call, in place, over several steps: what a ZO update does
    params = [torch.randn(n, generator=g) for n in (300, 2048, 5)]
    expected = [p.clone() for p in params]
    call = philox_triton.KernelCall(params, params)
    for step in range(3):
        seeds = [100 * step + t for t in range(len(params))]
        call(seeds, [-0.01], 0.0, False)
        for p, seed in zip(expected, seeds):
            philox.add_directions_reference(p, p, 0, [seed], [-0.01], 0.0, 1.0, False)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))
    print("checked")
""")


def test_the_gpu_kernel_draws_the_numbers_of_the_torch_code_under_the_interpreter():
    result = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "checked", result.stderr[-3000:]


def test_the_gpu_kernel_refuses_mixed_tensors():
    import torch

    from zo_trainer.zo import philox_triton

    with pytest.raises(ValueError, match="one dtype"):
        philox_triton.KernelCall([torch.zeros(4), torch.zeros(4, dtype=torch.float16)], [torch.zeros(4)] * 2)
    with pytest.raises(ValueError, match="CUDA"):
        philox_triton.KernelCall([torch.zeros(4)], [torch.zeros(4)])
