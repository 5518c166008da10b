"""Where the time of a ZO step goes beyond its forwards: hooks and copies, drawing z, the update.

    python benchmarks/bench_probe_overhead.py                 # 20m, 9 interleaved repeats (~1 min)
    python benchmarks/bench_probe_overhead.py --model small --repeats 30

On the bench_zo_step models (random init, fixed batch) it times, interleaved round-robin, with the
median and the minimum over --repeats after a warm-up:

* ``forward``: a plain no-grad forward with the loss;
* ``probe, copies only``: the same forward under `ZOEstimator.perturbed` with a sampler that copies p
  instead of drawing z: the cost of the hooks and of writing the perturbed copies;
* ``probe, module by module``: the same probe with ``spsa.GROUP_BYTES = 0``, one kernel call per
  module that owns parameters, as before copies were drawn in groups;
* ``probe``: one real probe forward (draws z and writes p + εz, Gaussian, a group of modules per call);
* ``update``: `ZOEstimator.apply_update` for one query (redraws z over every parameter, in place);

and each one's time over the forward's, and how many kernel calls a probe makes each way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_zo_step import build
from zo_trainer.zo import DirectionSampler, ZOEstimator, spsa


class CopyOnlySampler(DirectionSampler):
    """Writes ``p`` where the real sampler writes ``p + Σ scales·z``: the probe without its draws."""

    def add_to(self, step, additions):
        for a in additions:
            if a.target is not a.source:
                a.target.copy_(a.source)

    def add_rows(self, step, name, matrix, rows, out, scales):
        torch.index_select(matrix, 0, rows, out=out)

    def add_row_block(self, step, name, matrix, start, out, scales):
        out.copy_(matrix[start : start + len(out)])


def kernel_calls(estimator: ZOEstimator, probe) -> int:
    """How many `DirectionSampler.add_to` calls ``probe()`` makes through ``estimator``."""
    calls, add_to = [], estimator.sampler.add_to
    estimator.sampler.add_to = lambda *args: calls.append(args) or add_to(*args)
    try:
        probe()
    finally:
        del estimator.sampler.add_to  # the class's method again
    return len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20m", choices=["small", "20m"])
    parser.add_argument("--repeats", type=int, default=9)
    cli = parser.parse_args()
    model, x = build(cli.model)
    loss_fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    real = ZOEstimator(model, eps=1e-3, seed=0)
    copies_only = ZOEstimator(model, eps=1e-3, seed=0)
    copies_only.sampler = CopyOnlySampler()
    one_by_one = ZOEstimator(model, eps=1e-3, seed=0)
    trainable = real.trainable()
    update_args = (torch.tensor([1e-3], dtype=torch.float64), [(p, 1e-6, 0.0) for _, p in trainable])
    steps = iter(range(10**9))

    @torch.no_grad()
    def forward(estimator=None, group_bytes=spsa.GROUP_BYTES):
        if estimator is None:
            return loss_fn()
        default, spsa.GROUP_BYTES = spsa.GROUP_BYTES, group_bytes
        try:
            with estimator.perturbed(trainable, next(steps), 0, +1.0):  # p + εz
                return loss_fn()
        finally:
            spsa.GROUP_BYTES = default

    kinds = {
        "forward": forward,
        "probe, copies only": lambda: forward(copies_only),
        "probe, module by module": lambda: forward(one_by_one, group_bytes=0),
        "probe": lambda: forward(real),
        "update": lambda: real.apply_update(next(steps), *update_args),
    }
    times = {kind: [] for kind in kinds}
    for fn in kinds.values():
        fn()  # warm-up: the probes also record the forward order
    grouped_calls = kernel_calls(real, kinds["probe"])
    one_by_one_calls = kernel_calls(one_by_one, kinds["probe, module by module"])
    for _ in range(cli.repeats):
        for kind, fn in kinds.items():
            start = time.perf_counter()
            fn()
            times[kind].append(time.perf_counter() - start)
    print(f"# {cli.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, {cli.repeats} repeats; seconds")
    print(f"kernel calls per probe: {grouped_calls} in groups, {one_by_one_calls} module by module")
    print(f"{'':<25}{'median':>9}{'/ fwd':>8}{'min':>9}{'/ fwd':>8}")
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    minima = {kind: min(t) for kind, t in times.items()}
    for kind in kinds:
        print(f"{kind:<25}{medians[kind]:>9.4f}{medians[kind] / medians['forward']:>8.3f}"
              f"{minima[kind]:>9.4f}{minima[kind] / minima['forward']:>8.3f}")


if __name__ == "__main__":
    main()
