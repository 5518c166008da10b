"""Where a step's time goes: torch.profiler over one step of each kind, after two warm-up steps.

    python benchmarks/profile_zo_step.py --model 1b            # on a GPU: the kernels by GPU time
    python benchmarks/profile_zo_step.py --model small --kinds zo_q1

For each kind (of `bench_zo_step.py`) it prints the wall time of the profiled step and the operators and kernels
that took the most device time (on CPU: self CPU time), e.g. the Triton kernel of the directions
(`_add_directions_kernel`) against the forwards' matrix products.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from bench_zo_step import DEVICE, MODELS, TIMED_KINDS, build, make_steps, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20m", choices=list(MODELS))
    parser.add_argument("--kinds", default="2 forwards,zo_q1,mezo_q1", help=f"comma-separated: '2 forwards' or of {list(TIMED_KINDS)}")
    parser.add_argument("--rows", type=int, default=12)
    cli = parser.parse_args()
    kinds = cli.kinds.split(",")
    if set(kinds) - {"2 forwards", *TIMED_KINDS}:
        parser.error(f"unknown kinds {sorted(set(kinds) - {'2 forwards', *TIMED_KINDS})}")
    model, x = build(cli.model)
    steps = make_steps(model, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    sort = "self_device_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    for kind in kinds:
        for _ in range(2):
            steps[kind]()
        sync()
        with profile(activities=activities) as trace:
            start = time.perf_counter()
            steps[kind]()
            sync()
            wall = time.perf_counter() - start
        print(f"== {cli.model} {kind}: {wall * 1e3:.1f} ms wall (profiled)")
        print(trace.key_averages().table(sort_by=sort, row_limit=cli.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
