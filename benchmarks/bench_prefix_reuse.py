"""What a ZO step costs when only a block trains, with and without prefix reuse (`zo_trainer.zo.prefix`).

    python benchmarks/bench_prefix_reuse.py                      # llama-small and llama2-20m, ~20 min on 2 cores
    python benchmarks/bench_prefix_reuse.py --models small --repeats 1   # a quick look (~1 min)
    python benchmarks/bench_prefix_reuse.py --json benchmarks/results/prefix_reuse.json

Random-init Llama models in train mode, 8 x 256 tokens: "small" (the `llama-small` preset: 6 layers, hidden 256,
vocabulary 8192) and "20m" (`llama2-20m`, the paper's model: 12 layers, vocabulary 32,000). For each it times one
plain forward (no_grad) and ZO steps (probe + ZO-SGD update, central, Gaussian) of

* the last MLP (the paper's reduced dimension, §3.2) at q = 1, 8 and 20,
* each layer of the paper's layer-wise schedule (Figure 6: ``model.layers.{i}.*`` in turn, q = 1),

without prefix reuse, with it, and with it and the chunked loss (`zo_trainer.chunked_loss`, what `ZOTrainer` does
by default), one step of each within every repeat (interleaved, so that load drifting on a shared
machine hits all alike), and reports each step in plain forwards (medians over the repeats; every repeat is in the
JSON), the speed-ups, and what share of a forward the LM head and its loss take (what reuse cannot save). Then the peak
memory above the model and batch (VmHWM in fresh processes, glibc with a fixed mmap threshold, so the peak is the
live tensors') of 2 x 2 plain forwards and of 2 last-MLP steps (q = 1) of each kind.
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
from transformers import LlamaConfig, LlamaForCausalLM

from bench_zo_step import rss_kib
from zo_trainer.chunked_loss import ChunkedLoss
from zo_trainer.modeling import PRESETS
from zo_trainer.zo import ZOSGD, ZOEstimator

MODELS = {"small": "llama-small", "20m": "llama2-20m"}
BATCH, SEQUENCE = 8, 256
LAST_MLP_QUERIES = (1, 8, 20)
MEMORY_RUNS = 3
NO_FRAGMENTATION = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def build(name: str):
    config = LlamaConfig(**PRESETS[MODELS[name]], use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    x = torch.randint(config.vocab_size, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    return model, x


def settings(model) -> dict[str, tuple[str, int]]:
    """Setting name -> (prefix of the trained parameters' names, q)."""
    layers = model.config.num_hidden_layers
    last_mlp = {f"last MLP, q={q}": (f"model.layers.{layers - 1}.mlp.", q) for q in LAST_MLP_QUERIES}
    return last_mlp | {f"layer {i}, q=1": (f"model.layers.{i}.", 1) for i in range(layers)}


def train_only(model, prefix: str) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))


VARIANTS = {"no reuse": (False, False), "reuse": (True, False), "reuse + chunked loss": (True, True)}


def make_step(model, x, q: int, variant: str):
    reuse, chunked = VARIANTS[variant]
    estimator = ZOEstimator(model, num_queries=q, seed=0, reuse_prefix=reuse)
    optimizer = ZOSGD([p for p in model.parameters() if p.requires_grad], estimator, lr=1e-4)
    steps = iter(range(10**9))

    def loss_fn():
        with ChunkedLoss(model, x) if chunked else contextlib.nullcontext():
            return model(input_ids=x, labels=x).loss

    def step():
        optimizer.accumulate(estimator.probe(loss_fn, next(steps)))
        optimizer.step()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def head_share(model, x, repeats: int) -> float:
    """Median time of the LM head and its loss on the final hidden states, over that of a whole forward."""
    hidden = model.model(input_ids=x).last_hidden_state
    head = lambda: model.loss_function(model.lm_head(hidden), x, vocab_size=model.config.vocab_size)  # noqa: E731
    whole = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    head(), whole()
    return statistics.median(timed(head) / timed(whole) for _ in range(repeats))


def measure_times(name: str, repeats: int) -> dict:
    model, x = build(name)
    forward = torch.no_grad()(lambda: model(input_ids=x, labels=x).loss)
    steps = {}
    for setting, (prefix, q) in settings(model).items():
        train_only(model, prefix)
        steps[setting] = {variant: make_step(model, x, q, variant) for variant in VARIANTS}
        for step in steps[setting].values():
            step()  # warm-up: the first probe of a set of trainable parameters sizes its buffers
    forward()
    times = {"forward": [], **{f"{s}, {variant}": [] for s in steps for variant in VARIANTS}}
    for repeat in range(repeats):
        times["forward"].append(timed(forward))
        for setting, (prefix, _) in settings(model).items():
            train_only(model, prefix)
            for variant, step in steps[setting].items():
                times[f"{setting}, {variant}"].append(timed(step))
        print(f"  {name}: repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {"times_s": times, "head_share": head_share(model, x, repeats=max(3, repeats))}


def measure_memory(name: str, kind: str) -> dict:
    """Runs in a fresh process: peak RSS above the model and batch, in KiB, of 2 x ``kind``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    model, x = build(name)
    if kind == "inference":
        forwards = torch.no_grad()(lambda: (model(input_ids=x, labels=x).loss, model(input_ids=x, labels=x).loss))
        run = forwards
    else:
        train_only(model, f"model.layers.{model.config.num_hidden_layers - 1}.mlp.")
        run = make_step(model, x, 1, kind)
    base = rss_kib("VmRSS")
    run()
    run()
    return {"increment": rss_kib("VmHWM") - base}


def memory_in_subprocesses(name: str) -> dict:
    measured = {kind: [] for kind in ("inference", *VARIANTS)}
    for _ in range(MEMORY_RUNS):
        for kind in measured:  # alternated
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory", name, kind]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, **NO_FRAGMENTATION}).stdout
            measured[kind].append(json.loads(out.strip().splitlines()[-1])["increment"])
    return {kind: statistics.median(runs) for kind, runs in measured.items()} | {"runs": measured}


def report(name: str, result: dict) -> None:
    times = result["times_s"]
    unit = statistics.median(times["forward"])
    print(f"\n{name} ({MODELS[name]}, {BATCH}x{SEQUENCE} tokens): one forward {unit:.3f} s (median of "
          f"{len(times['forward'])}); LM head + loss: {result['head_share']:.0%} of a forward")
    print(f"{'setting':<18}{'no reuse':>10}{'reuse':>8}{'speed-up':>10}{'+ chunked loss':>16}{'speed-up':>10}   (forwards)")
    for setting in dict.fromkeys(key.split(", ")[0] + ", " + key.split(", ")[1] for key in times if key != "forward"):
        plain, reused, chunked = (statistics.median(times[f"{setting}, {v}"]) for v in VARIANTS)
        print(f"{setting:<18}{plain / unit:>10.2f}{reused / unit:>8.2f}{plain / reused:>9.2f}x{chunked / unit:>16.2f}"
              f"{plain / chunked:>9.2f}x")
    memory = result.get("memory_kib")
    if memory:
        cells = ", ".join(f"{kind} {memory[kind] / 1024:.0f} ({memory[kind] / memory['inference']:.3f}x)"
                          for kind in VARIANTS)
        print(f"peak above model and batch (MiB, median of {MEMORY_RUNS} processes): 2x2 forwards "
              f"{memory['inference'] / 1024:.0f}; 2 last-MLP steps: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,20m", help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", default=None, help="write every measurement to this file")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        print(json.dumps(measure_memory(*args._memory)))
        return
    names = args.models.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown or args.repeats < 1:
        parser.error(f"--models {args.models!r}: choose from {list(MODELS)}; --repeats {args.repeats} must be >= 1")
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name in names:
        results[name] = measure_times(name, args.repeats)
        if not args.no_memory:
            results[name]["memory_kib"] = memory_in_subprocesses(name)
        report(name, results[name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
