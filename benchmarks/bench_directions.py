"""What drawing a direction costs, per entry: the floor under a ZO step's overhead on CPU.

    python benchmarks/bench_directions.py                  # 20M entries, 1 thread and all threads
    python benchmarks/bench_directions.py --numel 5000000 --repeats 9

For one flat float32 tensor of --numel entries it times (median of --repeats, after a warm-up):

* ``normal_``: torch's Gaussian draw (mt19937 + Box-Muller) into a reused 65,536-entry buffer, the raw
  cost of random numbers;
* ``add_to``: ``DirectionSampler.add_to`` (draw z chunk by chunk and write ``p + δ·z``), as a ZO probe or
  update does it, for Gaussian and Rademacher directions;

each on one thread and on ``torch.get_num_threads()`` threads, in ns per entry.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zo_trainer.zo import DirectionSampler
from zo_trainer.zo.directions import CHUNK_NUMEL


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
    cli = parser.parse_args()
    source, target = torch.randn(cli.numel), torch.empty(cli.numel)
    buffer, generator = torch.empty(CHUNK_NUMEL), torch.Generator().manual_seed(0)

    def raw_normal():
        for _ in range(0, cli.numel, CHUNK_NUMEL):
            buffer.normal_(generator=generator)

    samplers = {name: DirectionSampler(name, seed=0) for name in ("gaussian", "rademacher")}
    steps = iter(range(10**9))
    kinds = {"normal_ (raw)": raw_normal}
    for name, sampler in samplers.items():
        kinds[f"add_to {name}"] = lambda s=sampler: s.add_to("w", (cli.numel,), next(steps), {0: 1e-3}, source, target)
    all_threads = torch.get_num_threads()
    print(f"# {cli.numel:,} float32 entries, median of {cli.repeats}; ns per entry")
    print(f"{'':<22}{'1 thread':>10}{f'{all_threads} threads':>12}")
    for kind, fn in kinds.items():
        cells = []
        for threads in (1, all_threads):
            torch.set_num_threads(threads)
            cells.append(per_entry_ns(fn, cli.numel, cli.repeats))
        torch.set_num_threads(all_threads)
        note = "  (one generator: never parallel)" if kind.startswith("normal_") else ""
        print(f"{kind:<22}{cells[0]:>10.2f}{cells[1]:>12.2f}{note}")


if __name__ == "__main__":
    main()
