"""A ZO step below inference memory: the loss a chunk of tokens at a time (`zo_trainer.chunked_loss`).

    python benchmarks/bench_chunked_loss.py                  # 20m and small, ~6 min on 2 cores
    python benchmarks/bench_chunked_loss.py --models small --repeats 3

The models and batches of `bench_zo_step.py` (random-init Llama in train mode: "20m" is the paper's `llama2-20m`,
8 x 256 tokens, vocabulary 32,000, tied head; "small" is `llama-tiny`, 8 x 128, vocabulary 4096). Reports

* peak memory, in fresh processes (the median of 3, kinds alternated), of plain HF inference (2 x 2 forwards with
  labels, no_grad: the loss from the full logits), of 2 ZO steps (q = 1, the whole model trains) with the loss from
  the full logits, and of 2 ZO steps with the chunked loss: in total and above the model and batch, with glibc's
  default allocator and with a fixed mmap threshold (the peak of the live tensors);
* time of a ZO step with each loss (medians of interleaved repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench_zo_step import ALLOCATORS, MODELS, build, rss_kib
from zo_trainer.chunked_loss import ChunkedLoss
from zo_trainer.zo import ZOSGD, ZOEstimator

KINDS = ("inference", "zo", "zo_chunked")
MEMORY_RUNS = 3


def make_step(model, x, kind: str):
    if kind == "inference":
        return torch.no_grad()(lambda: (model(input_ids=x, labels=x).loss, model(input_ids=x, labels=x).loss))
    estimator = ZOEstimator(model, num_queries=1, seed=0)
    optimizer = ZOSGD(model.parameters(), estimator, lr=1e-4)
    steps = iter(range(10**9))

    def loss_fn():
        with ChunkedLoss(model, x) if kind == "zo_chunked" else contextlib.nullcontext():
            return model(input_ids=x, labels=x).loss

    def step():
        optimizer.accumulate(estimator.probe(loss_fn, next(steps)))
        optimizer.step()

    return step


def measure_memory(name: str, kind: str) -> dict:
    """Runs in a fresh process: peak RSS of 2 x ``kind`` in KiB, in total and above the model and batch."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model, x = build(name)
    step = make_step(model, x, kind)
    base = rss_kib("VmRSS")
    step()
    step()
    peak = rss_kib("VmHWM")
    return {"peak": peak, "increment": peak - base}


def memory(name: str) -> dict:
    out = {}
    for allocator, env in ALLOCATORS.items():
        runs = {kind: [] for kind in KINDS}
        for _ in range(MEMORY_RUNS):
            for kind in KINDS:
                cmd = [sys.executable, os.path.abspath(__file__), "--_memory", name, kind]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
        out[allocator] = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in runs.items()}
    return out


def times(name: str, repeats: int) -> dict:
    model, x = build(name)
    steps = {kind: make_step(model, x, kind) for kind in ("zo", "zo_chunked")}
    for step in steps.values():
        step()
    measured = {kind: [] for kind in steps}
    for _ in range(repeats):
        for kind, step in steps.items():
            start = time.perf_counter()
            step()
            measured[kind].append(time.perf_counter() - start)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="20m,small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        print(json.dumps(measure_memory(*args._memory)))
        return
    names = args.models.split(",")
    if any(name not in MODELS for name in names) or args.repeats < 1:
        parser.error(f"--models {args.models!r}: choose from {list(MODELS)}; --repeats must be >= 1")
    results = {}
    for name in names:
        results[name] = {"memory_kib": memory(name), "times_s": times(name, args.repeats)}
        mem, ts = results[name]["memory_kib"], results[name]["times_s"]
        print(f"\n{name}: peak memory in MiB (median of {MEMORY_RUNS} processes), total / above model and batch")
        for allocator, kinds in mem.items():
            cells = ", ".join(f"{kind} {m['peak'] / 1024:.0f} / {m['increment'] / 1024:.0f}" for kind, m in kinds.items())
            ratio = kinds["zo_chunked"]["increment"] / kinds["inference"]["increment"]
            total = kinds["zo_chunked"]["peak"] / kinds["inference"]["peak"]
            print(f"  {allocator}: {cells}; chunked ZO / inference: {total:.3f} total, {ratio:.3f} above")
        medians = {kind: statistics.median(t) for kind, t in ts.items()}
        print(f"  ZO step (q=1), median of {args.repeats}: {medians['zo']:.3f} s with the full logits, "
              f"{medians['zo_chunked']:.3f} s chunked ({medians['zo_chunked'] / medians['zo']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
