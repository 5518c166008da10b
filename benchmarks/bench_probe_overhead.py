"""Where the time of a ZO step goes beyond its forwards: hooks and copies, drawing z, the update.

    python benchmarks/bench_probe_overhead.py                 # 20m, 9 interleaved repeats (~1 min)
    python benchmarks/bench_probe_overhead.py --model small --repeats 30

On the bench_zo_step models (random init, fixed batch) it times, interleaved round-robin, with the
median and the minimum over --repeats after a warm-up:

* ``forward``: a plain no-grad forward with the loss;
* ``probe, copies only``: the same forward under `ZOEstimator.perturbed` with a sampler that copies p
  instead of drawing z: the cost of the hooks and of writing the perturbed copies;
* ``probe, module by module``: the same probe with ``perturbation.GROUP_BYTES = 0``, one kernel call per
  module that owns parameters, as before copies were drawn in groups;
* ``probe``: one real probe forward (draws z and writes p + εz, Gaussian, a group of modules per call);
* ``update``: `ZOEstimator.apply_update` for one query (redraws z over every parameter, in place);

and each one's time over the forward's, and how many draws of copies a probe makes each way. Then, with the
C kernel, the time a probe spends drawing its groups of copies, the blocks of its LM head and its
embedding rows, and the time of an update, each split into the kernel and the Python around it (a
probe's runs from cold caches, between two layers' products).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_zo_step import DEVICE, build
from zo_trainer.zo import DirectionSampler, ZOEstimator, kernels, perturbation


class CopyOnlySampler(DirectionSampler):
    """Writes ``p`` where the real sampler writes ``p + Σ scales·z``: the probe without its draws."""

    def add_to(self, step, additions, check=True):
        for a in additions:
            if a.target is not a.source:
                a.target.copy_(a.source)

    def add_rows(self, step, name, matrix, rows, out, scales):
        torch.index_select(matrix, 0, rows, out=out)

    def add_row_block(self, step, name, matrix, start, out, scales):
        out.copy_(matrix[start : start + len(out)])

    def prepare(self, names, sources, targets):
        return None  # every group through add_to, which copies


def group_draws(probe) -> int:
    """How many draws of a group of copies ``probe()`` makes (one kernel call each; one for all the copies where
    they fit in the arena at once)."""
    calls, draw = [], perturbation.Perturbation.draw
    perturbation.Perturbation.draw = lambda self, pooled, own: calls.append(len(pooled)) or draw(self, pooled, own)
    try:
        probe()
    finally:
        perturbation.Perturbation.draw = draw
    return len(calls)


PROBE_DRAWS = {  # what a probe draws, and the function that draws it (each makes one kernel call)
    "copies, all at once": (perturbation._WholeModel, "install"),
    "groups of copies": (perturbation._GroupedCopies, "draw_group"),
    "blocks of the LM head": (DirectionSampler, "add_row_block"),
    "embedding rows": (DirectionSampler, "add_rows"),
}
UPDATE_DRAWS = {"update": (ZOEstimator, "apply_update")}


def draw_ms(run, repeats: int, draws: dict) -> dict[str, tuple[float, float]]:
    """For each of ``draws`` (label -> (class, method)), the milliseconds ``run()`` spends in it: in all and in
    the C kernel (medians over ``repeats`` runs). The rest is the Python around the kernel."""
    totals = {label: [] for label in draws}
    kernels = {label: [] for label in draws}
    inside: list[list] = []  # [label, kernel seconds] of the draw running now
    originals, kernel = {label: getattr(*where) for label, where in draws.items()}, kernels.KERNEL

    def timed(label, function):
        def draw(*args, **kwargs):
            start = time.perf_counter()
            inside.append([label, 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                totals[label][-1] += time.perf_counter() - start
                kernels[label][-1] += inside.pop()[1]
        return draw

    def timed_kernel(*args):
        start = time.perf_counter()
        kernel(*args)
        if inside:
            inside[-1][1] += time.perf_counter() - start

    for label, (owner, name) in draws.items():
        setattr(owner, name, timed(label, originals[label]))
    kernels.KERNEL = timed_kernel
    try:
        for _ in range(repeats):
            for label in draws:
                totals[label].append(0.0), kernels[label].append(0.0)
            run()
    finally:
        for label, (owner, name) in draws.items():
            setattr(owner, name, originals[label])
        kernels.KERNEL = kernel
    return {label: (statistics.median(totals[label]) * 1e3, statistics.median(kernels[label]) * 1e3) for label in draws}


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
    def forward(estimator=None, group_bytes=perturbation.GROUP_BYTES):
        if estimator is None:
            return loss_fn()
        default, perturbation.GROUP_BYTES = perturbation.GROUP_BYTES, group_bytes
        try:
            with estimator.perturbed(trainable, next(steps), 0, +1.0):  # p + εz
                return loss_fn()
        finally:
            perturbation.GROUP_BYTES = default

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
    grouped_calls = group_draws(kinds["probe"])
    one_by_one_calls = group_draws(kinds["probe, module by module"])
    for _ in range(cli.repeats):
        for kind, fn in kinds.items():
            start = time.perf_counter()
            fn()
            times[kind].append(time.perf_counter() - start)
    print(f"# {cli.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, {cli.repeats} repeats; seconds")
    print(f"draws of copies per probe: {grouped_calls} in groups, {one_by_one_calls} module by module")
    print(f"{'':<25}{'median':>9}{'/ fwd':>8}{'min':>9}{'/ fwd':>8}")
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    minima = {kind: min(t) for kind, t in times.items()}
    for kind in kinds:
        print(f"{kind:<25}{medians[kind]:>9.4f}{medians[kind] / medians['forward']:>8.3f}"
              f"{minima[kind]:>9.4f}{minima[kind] / minima['forward']:>8.3f}")
    if kernels.KERNEL is not None and DEVICE.type == "cpu":  # the C kernel draws for CPU tensors only
        for run, draws, what in ((kinds["probe"], PROBE_DRAWS, "a probe's "), (kinds["update"], UPDATE_DRAWS, "an ")):
            for label, (total, kernel) in draw_ms(run, cli.repeats, draws).items():
                print(f"{what}{label}: {total:.2f} ms, of which the C kernel {kernel:.2f} ms and the Python around it "
                      f"{total - kernel:.2f} ms (medians of {cli.repeats})")


if __name__ == "__main__":
    main()
