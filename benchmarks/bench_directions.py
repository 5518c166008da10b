"""What drawing a direction costs, per entry: the floor under a ZO step's overhead.

    python benchmarks/bench_directions.py                  # 20M entries, 1 thread and all threads
    python benchmarks/bench_directions.py --numel 5000000 --repeats 9
    python benchmarks/bench_directions.py --device cuda    # on a GPU: Triton kernel vs torch's generator

For one flat float32 tensor of --numel entries it times (median of --repeats, after a warm-up):

* ``normal_``: torch's own Gaussian draw (mt19937 + Box-Muller) into a reused 65,536-entry buffer,
  the raw cost of random numbers the way MeZO draws them (one generator: never parallel);
* ``add_to``: ``DirectionSampler.add_to`` (draw z and write ``p + δ·z``), as a ZO probe or update
  does it, for Gaussian and Rademacher directions, through the C kernel;
* ``add_to gaussian, torch code``: the same numbers drawn by the torch fallback (no C compiler at
  install), on a tenth of the entries;

each on one thread and on ``torch.get_num_threads()`` threads, in ns per entry. Then the fixed cost of
one call, the reason a probe draws a group of modules per call: ``add_to`` of one 320-entry norm weight,
warm (back to back) and cold (right after a matrix product of a 20M-model MLP's size, as a module's
pre-hook runs it), median of 200 calls each, in microseconds; and ``add_rows`` of the rows a 20M-model
batch looks up in its embedding (8 x 256 random tokens of 32,000: ~2,000 rows of 320 entries, each
starting inside a 256-entry tile of the kernel), median of 100 calls on all threads.

With ``--device cuda``, on one flat float32 GPU tensor (CUDA events, median of --repeats): MeZO's way,
``torch.normal`` of the whole tensor then ``p + δ·z`` (torch's Philox, two passes over z in memory); ``add_to``
through `philox_triton`'s kernel (drawn in registers: one read, one write) for both distributions, and through
the torch code (the same numbers without Triton); in ns per entry and in GB/s of the 8 bytes an entry must move.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from zo_trainer.zo import Addition, DirectionSampler, kernels

BUFFER_NUMEL = 1 << 16


def per_entry_ns(fn, numel: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / numel * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    cli = parser.parse_args()
    if cli.device == "cuda":
        return gpu_main(cli.numel, cli.repeats)
    if kernels.KERNEL is None:
        print("# the C kernel is not built: add_to runs the torch code")
    source, target = torch.randn(cli.numel), torch.empty(cli.numel)
    buffer, generator = torch.empty(BUFFER_NUMEL), torch.Generator().manual_seed(0)

    def raw_normal():
        for _ in range(0, cli.numel, BUFFER_NUMEL):
            buffer.normal_(generator=generator)

    def add_to(sampler, numel=cli.numel):
        sampler.add_to(next(steps), [Addition("w", (numel,), {0: 1e-3}, source[:numel], target[:numel])])

    def torch_code():
        kernel, kernels.KERNEL = kernels.KERNEL, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fallback's notice: deliberate here
                add_to(samplers["gaussian"], cli.numel // 10)
        finally:
            kernels.KERNEL = kernel

    samplers = {name: DirectionSampler(name, seed=0) for name in ("gaussian", "rademacher")}
    steps = iter(range(10**9))
    kinds = {"normal_ (raw)": (raw_normal, cli.numel)}
    for name, sampler in samplers.items():
        kinds[f"add_to {name}"] = (lambda s=sampler: add_to(s), cli.numel)
    kinds["add_to gaussian, torch code"] = (torch_code, cli.numel // 10)
    all_threads = torch.get_num_threads()
    print(f"# {cli.numel:,} float32 entries, median of {cli.repeats}; ns per entry")
    print(f"{'':<30}{'1 thread':>10}{f'{all_threads} threads':>12}")
    for kind, (fn, numel) in kinds.items():
        cells = []
        for threads in (1, all_threads):
            torch.set_num_threads(threads)
            cells.append(per_entry_ns(fn, numel, cli.repeats))
        torch.set_num_threads(all_threads)
        print(f"{kind:<30}{cells[0]:>10.2f}{cells[1]:>12.2f}")
    warm, cold = call_cost_us(samplers["gaussian"], steps)
    print(f"one add_to call of 320 entries: {warm:.1f} us warm, {cold:.1f} us right after a matrix product")
    if kernels.KERNEL is not None:  # add_rows draws through the kernel only
        rows, milliseconds = embedding_rows_ms(samplers["gaussian"], steps)
        print(f"add_rows of {rows} embedding rows of 320 entries: {milliseconds:.3f} ms a call")


def call_cost_us(sampler: DirectionSampler, steps, calls: int = 200) -> tuple[float, float]:
    norm, copy = torch.randn(320), torch.empty(320)
    hidden, mlp = torch.randn(2048, 320), torch.randn(864, 320)
    times = {"warm": [], "cold": []}
    for _ in range(calls):
        for kind in times:
            if kind == "cold":
                hidden @ mlp.T
            start = time.perf_counter()
            sampler.add_to(next(steps), [Addition("norm", (320,), {0: 1e-3}, norm, copy)])
            times[kind].append(time.perf_counter() - start)
    return statistics.median(times["warm"]) * 1e6, statistics.median(times["cold"]) * 1e6


def embedding_rows_ms(sampler: DirectionSampler, steps, calls: int = 100) -> tuple[int, float]:
    table = torch.randn(32000, 320)
    rows = torch.unique(torch.randint(32000, (8 * 256,), generator=torch.Generator().manual_seed(0)))
    out = torch.empty(len(rows), 320)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sampler.add_rows(next(steps), "embed", table, rows, out, {0: 1e-3})
        times.append(time.perf_counter() - start)
    return len(rows), statistics.median(times) * 1e3


def gpu_main(numel: int, repeats: int) -> None:
    source, target = torch.randn(numel, device="cuda"), torch.empty(numel, device="cuda")
    steps = iter(range(10**9))
    samplers = {name: DirectionSampler(name, seed=0) for name in ("gaussian", "rademacher")}

    def mezo():
        torch.manual_seed(next(steps))
        torch.add(source, torch.normal(0.0, 1.0, size=source.shape, device="cuda"), alpha=1e-3, out=target)

    def add_to(sampler):
        sampler.add_to(next(steps), [Addition("w", (numel,), {0: 1e-3}, source, target)])

    def torch_code():
        serves, kernels._gpu_kernel_serves = kernels._gpu_kernel_serves, lambda source, target: False
        try:
            add_to(samplers["gaussian"])
        finally:
            kernels._gpu_kernel_serves = serves

    kinds = {"MeZO: normal + add": mezo, **{f"add_to {n} (Triton)": lambda s=s: add_to(s) for n, s in samplers.items()},
             "add_to gaussian, torch code": torch_code}
    print(f"# {numel:,} float32 entries on {torch.cuda.get_device_name()}, median of {repeats}")
    print(f"{'':<32}{'ns/entry':>10}{'GB/s':>8}")
    for kind, fn in kinds.items():
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        seconds = statistics.median(times)
        print(f"{kind:<32}{seconds / numel * 1e9:>10.4f}{8 * numel / seconds / 1e9:>8.0f}")


if __name__ == "__main__":
    main()
