"""How close is a ZO step to its physical limit: 2q forward passes, at inference memory?

    python benchmarks/bench_zo_step.py                      # small + 20m, ~12 min on 2 cores
    python benchmarks/bench_zo_step.py --quick              # small only, 2 repeats (< 1 min)
    python benchmarks/bench_zo_step.py --models 20m --repeats 5 --json out.json
    python benchmarks/bench_zo_step.py --models 20m --kinds zo_q1,mezo_q1 --repeats 31   # the target, tighter
    python benchmarks/bench_zo_step.py --models 20m --kinds zo_q1 --memory-runs 11       # memory medians, tighter
    python benchmarks/bench_zo_step.py --models 20m --kinds zo_q1,zo_q1_history8 --repeats 9   # momentum from 8 steps' seeds
    python benchmarks/bench_zo_step.py --models small,20m,1b     # on a GPU (CUDA is used when present)
    python benchmarks/bench_zo_step.py --models 128k-vocab --kinds zo_q1,mezo_q1 --repeats 5   # a head larger than its logits
    python benchmarks/bench_zo_step.py --models 20m --memory-only --memory-kinds inference,zo,zo_q20,fo_sgd   # Table 2's memory

Random-init Llama models (no download): "small" (1.3M params, batch 8x128), "20m" (the paper's llama2-20m,
20.0M params, batch 8x256), "128k-vocab" (Llama 3's vocabulary, 157M params, 1x512 tokens: a head larger than
its logits) and, for GPUs, "1b" (TinyLlama's shape, 1.1B params, batch 8x256). For each it reports

* time (median of --repeats after one warm-up; the kinds are interleaved round-robin within each
  repeat so that load drifting on a shared machine hits every kind alike): two forwards back to back
  (the unit of a q = 1 step; one forward is half of it), ZO step
  (zo_trainer.zo: probe + accumulate + step, central, Gaussian) for q=1 and q=4, with Rademacher
  and with SubZero low-rank directions (rank 4) for q=1, an inline MeZO
  reference step (the published 4-sweep algorithm) for q=1 and q=4, and FO steps with SGD and AdamW;
* peak memory of inference (2 x 2 forwards) / ZO step (q=1) / FO-SGD / FO-AdamW step, each the median over
  --memory-runs fresh subprocesses (3; 1 on CUDA, whose count is exact), the kinds alternated, running 2 steps:
  on CUDA ``max_memory_allocated``; on CPU peak RSS in total and as the increment over the RSS right
  after building model and batch, so the Python + torch + weights baseline does not hide a step's cost;
  on CPU twice: with glibc's default allocator, and with a fixed mmap threshold ("no-frag"), whose peak
  is that of the live tensors without heap fragmentation;
* the ratios against the targets: ZO time / (2q forwards) <= 1.05 and ZO peak / inference peak <= 1.02.
  Each time ratio is given twice: over the kinds' medians, and as the median over repeats of the ratio
  within a repeat ("paired": a step against the forwards timed seconds before it, so load that drifts
  between repeats cancels), with a 95% interval of that median (order statistics, no assumption on the
  distribution): on a shared machine it says whether a target is met or within the noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zo_trainer.modeling import PRESETS
from zo_trainer.zo import ZOSGD, ZOEstimator

TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
WIDE_VOCAB = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True)
MODELS = {  # name -> (LlamaConfig kwargs, batch, sequence length)
    "small": (PRESETS["llama-tiny"], 8, 128),
    "20m": (PRESETS["llama2-20m"], 8, 256),
    "1b": (TINYLLAMA_1B, 8, 256),  # TinyLlama's shape, 1.1B params: for GPUs (FO-AdamW needs ~18 GB)
    # Llama 3's 128k vocabulary on a small body, 512 tokens: the tied head's weight (525 MB) outweighs the logits
    # (263 MB), as at Llama 3 8B with a micro-batch of 2048 tokens; where a full perturbed copy of the head would set the peak
    "128k-vocab": (WIDE_VOCAB, 1, 512),
}
DEFAULT_REPEATS = {"small": 41, "20m": 7, "1b": 7, "128k-vocab": 5}  # small: ~1.5 s a repeat, 20m: ~30 s on 2 CPU cores; this machine is noisy
EPS, LR = 1e-3, 1e-4
MEM_KINDS = ("inference", "zo", "fo_sgd", "fo_adamw")  # the default; zo_q20 (the paper's q = 20) on request
MEMORY_KINDS = (*MEM_KINDS, "zo_q20")
QUERIES = {"zo_q1": 1, "zo_q4": 4, "zo_q1_rademacher": 1, "zo_q1_lowrank": 1, "zo_q1_history8": 1, "mezo_q1": 1,
           "mezo_q4": 4}
FO_KINDS = ("fo_sgd", "fo_adamw")
TIMED_KINDS = (*QUERIES, *FO_KINDS)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(name: str):
    """Random-init model (train mode, as in training) and a fixed random batch."""
    kwargs, batch, seq = MODELS[name]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(DEVICE).train()
    x = torch.randint(kwargs["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return model, x


# ------------------------------------------------------------------------------------------- steps
def make_steps(model, x) -> dict:
    """One callable per measured kind; each does exactly one step (or two forwards)."""
    loss_fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    counter = iter(range(10**9))

    def forwards():
        with torch.no_grad():
            loss_fn()
            loss_fn()

    def zo(q, distribution="gaussian", **optimizer_kwargs):
        estimator = ZOEstimator(model, eps=EPS, num_queries=q, seed=0, distribution=distribution)
        optimizer = ZOSGD(model.parameters(), estimator, lr=LR, **optimizer_kwargs)

        def step():
            optimizer.accumulate(estimator.probe(loss_fn, next(counter)))
            optimizer.step()

        return step

    def fo(optimizer):
        def step():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return {
        "2 forwards": forwards,
        "zo_q1": zo(1),
        "zo_q4": zo(4),
        "zo_q20": zo(20),
        "zo_q1_rademacher": zo(1, "rademacher"),
        "zo_q1_lowrank": zo(1, "lowrank"),
        "zo_q1_history8": zo(1, momentum=0.9, momentum_history=8),  # momentum rebuilt from 8 steps' seeds
        "mezo_q1": lambda: mezo_step(model, loss_fn, 1, next(counter)),
        "mezo_q4": lambda: mezo_step(model, loss_fn, 4, next(counter)),
        "fo_sgd": fo(torch.optim.SGD(model.parameters(), lr=LR)),
        "fo_adamw": fo(torch.optim.AdamW(model.parameters(), lr=LR)),  # the usual pretraining optimizer: 2 states
    }


@torch.no_grad()
def mezo_step(model, loss_fn, q: int, step: int) -> None:
    """The published MeZO step (Malladi et al. 2023, Algorithm 1), extended to q queries averaged.

    Per query 4 sweeps over all parameters, each regenerating z with ``torch.manual_seed`` and an
    out-of-place ``p.data = p.data + scale * z``: +eps, -2eps, +eps (restore), then the update.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def sweep(seed, scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z

    seeds, grads = [step * 1000 + k for k in range(q)], []
    for seed in seeds:
        sweep(seed, EPS)
        plus = loss_fn()
        sweep(seed, -2 * EPS)
        minus = loss_fn()
        sweep(seed, EPS)
        grads.append(((plus - minus) / (2 * EPS)).item())
    for seed, g in zip(seeds, grads):
        sweep(seed, -LR * g / q)


# -------------------------------------------------------------------------------------------- time
def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_steps(name: str, repeats: int, kinds: list[str]) -> tuple[int, dict[str, list[float]]]:
    model, x = build(name)
    params = sum(p.numel() for p in model.parameters())
    steps = {kind: step for kind, step in make_steps(model, x).items() if kind in ["2 forwards", *kinds]}
    restore_storage = storage_keeper(model)
    for step in steps.values():  # warm-up: allocator, kernels, lazy init
        step()
        restore_storage()
    times = {kind: [] for kind in steps}
    for _ in range(repeats):
        for kind, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[kind].append(time.perf_counter() - start)
            restore_storage()  # untimed
    return params, times


def storage_keeper(model):
    """A function that moves the parameters' values back into the tensors they had when it was made.

    MeZO's sweeps (``p.data = p.data + scale * z``) give every parameter new storage at every step. Left so,
    the ZO step timed after it would find new parameters and rebuild what its estimator keeps per set of
    trainable parameters (flat views, the arena of copies, the forward order), a cost that no training run
    pays: ZO-SGD updates in place, so the parameters keep their storage from step to step.
    """
    originals = [(p, p.data) for p in model.parameters()]

    @torch.no_grad()
    def restore():
        for p, data in originals:
            if p.data.data_ptr() != data.data_ptr():
                data.copy_(p.data)
                p.data = data

    return restore


# ------------------------------------------------------------------------------------------ memory
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(name: str, kind: str) -> dict:
    """Runs in a fresh process: peak memory of 2 steps of ``kind``, in KiB.

    Inference runs 2 x 2 forwards, as many as 2 ZO steps with q=1: the heap's high-water mark creeps up with
    the number of forwards (glibc fragmentation: 2 forwards of the 20m model peak ~90 MiB below 8), so
    equal forward counts keep the comparison about the step, not about the allocator's history.

    ``ru_maxrss`` of a child started by ``subprocess`` (vfork + exec) starts at the PARENT's peak RSS,
    so the peak is read from VmHWM, whose high-water mark is reset (``/proc/self/clear_refs``) at start;
    ``ru_maxrss`` is kept in the JSON as a cross-check (the parent measures memory before it builds any model).
    """
    if DEVICE.type == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    model, x = build(name)
    step = {"inference": "2 forwards", "zo": "zo_q1"}.get(kind, kind)
    step = make_steps(model, x)[step]
    gc.collect()
    if DEVICE.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated() // 1024
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_kib("VmRSS")
    for _ in range(2):
        step()
    if DEVICE.type == "cuda":
        sync()
        peak = torch.cuda.max_memory_allocated() // 1024
        return {"peak": peak, "base": base, "increment": peak - base}
    peak = rss_kib("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak": peak, "base": base, "increment": peak - base, "ru_maxrss": ru_maxrss}


MEMORY_RUNS = 3 if DEVICE.type == "cpu" else 1  # CUDA's max_memory_allocated is the same in every run
ALLOCATORS = {  # name -> environment of the memory subprocess
    "glibc": {},
    # A fixed mmap threshold turns off glibc's dynamic one: every block >= 128 KiB is mapped and unmapped on
    # its own, so the peak RSS is the live tensors', free of heap fragmentation (which depends on the order
    # of allocations, not on what a step keeps alive).
    "no-frag": {"MALLOC_MMAP_THRESHOLD_": "131072"},
} if DEVICE.type == "cpu" else {"cuda": {}}  # CUDA: the caching allocator's count of live tensors


def memory_in_subprocesses(name: str, allocator: str, runs: int, kinds=MEM_KINDS) -> dict:
    """Per kind, the median over ``runs`` fresh processes, the kinds alternated: glibc's heap grows differently
    from one process to the next (hash seeds, thread timing), so that its peak is either ~630-660 or ~665-700
    MiB above the start at 20m, for inference as for ZO."""
    env = {**os.environ, **ALLOCATORS[allocator]}
    measured = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory", name, kind]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            measured[kind].append(json.loads(out.strip().splitlines()[-1]))
    return {kind: {key: statistics.median(run[key] for run in kind_runs) for key in kind_runs[0]} | {"runs": kind_runs}
            for kind, kind_runs in measured.items()}


# ----------------------------------------------------------------------------------------- results
def summarize(name: str, params: int, times: dict, memory: dict) -> dict:
    med = {kind: statistics.median(ts) for kind, ts in times.items()}
    forwards = {kind: 2 * q for kind, q in QUERIES.items()} | dict.fromkeys(FO_KINDS, 1)  # the forwards each kind is held to
    forwards = {kind: n for kind, n in forwards.items() if kind in times}
    ratios = {}
    for kind, n in forwards.items():
        ratios[f"{kind}_time / {n} fwd"] = med[kind] / (n * med["2 forwards"] / 2)
    for kind, n in forwards.items():
        paired = [t / (n * pair / 2) for t, pair in zip(times[kind], times["2 forwards"])]
        ratios[f"{kind}_time / {n} fwd, paired"] = statistics.median(paired)
        low, high = median_interval(paired)
        ratios[f"{kind}_time / {n} fwd, paired, 95% interval low"] = low
        ratios[f"{kind}_time / {n} fwd, paired, 95% interval high"] = high
    for allocator, mem in memory.items():
        ratios[f"zo_peak / inf_peak ({allocator}, total)"] = mem["zo"]["peak"] / mem["inference"]["peak"]
        ratios[f"zo_peak / inf_peak ({allocator}, increment)"] = mem["zo"]["increment"] / mem["inference"]["increment"]
        for fo in FO_KINDS:
            ratios[f"{fo}_peak / zo_peak ({allocator}, total)"] = mem[fo]["peak"] / mem["zo"]["peak"]
            ratios[f"{fo}_peak / zo_peak ({allocator}, increment)"] = mem[fo]["increment"] / mem["zo"]["increment"]
    return {
        "params": params,
        "batch": list(MODELS[name][1:]),
        "median_s": med,
        "times_s": times,
        "memory_kib": memory,
        "ratios": ratios,
    }


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the order statistics x_(j) and x_(n+1-j) with the largest j
    such that P(x_(j) <= median <= x_(n+1-j)) >= confidence (binomial(n, 1/2)). With 15 repeats: x_(4), x_(12).
    The whole range where n is too small for the confidence asked (n <= 5 at 95%)."""
    ordered, n = sorted(values), len(values)
    below = lambda j: sum(math.comb(n, i) for i in range(j)) / 2**n  # noqa: E731  # P(fewer than j values below the median)
    j = 1
    while j + 1 <= (n + 1) // 2 and 1 - 2 * below(j + 1) >= confidence:
        j += 1
    return ordered[j - 1], ordered[n - j]


def print_table(results: dict) -> None:
    names = list(results)
    rows = [("params", lambda r: f"{r['params'] / 1e6:.2f}M"), ("batch", lambda r: "x".join(map(str, r["batch"])))]
    for kind in next(iter(results.values()))["median_s"]:
        rows.append((f"time {kind} (s)", lambda r, k=kind: f"{r['median_s'][k]:.4f}"))
    unit = "MiB alloc" if DEVICE.type == "cuda" else "MiB RSS"
    for allocator in ALLOCATORS:
        for kind in MEM_KINDS:
            rows.append((f"peak {kind} ({unit}, {allocator})", lambda r, a=allocator, k=kind: f"{r['memory_kib'][a][k]['peak'] / 1024:.1f}"))
            rows.append((f"  increment {kind}", lambda r, a=allocator, k=kind: f"{r['memory_kib'][a][k]['increment'] / 1024:.1f}"))
    for ratio in next(iter(results.values()))["ratios"]:
        rows.append((ratio, lambda r, k=ratio: f"{r['ratios'][k]:.3f}"))
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{n:>10}" for n in names))
    for label, cell in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{cell(results[n]):>10}" for n in names))
    print("targets: zo time / 2q fwd <= 1.05; zo peak / inference peak <= 1.02")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small,20m", help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--repeats", type=int, help=f"timed repeats per kind (default {DEFAULT_REPEATS})")
    parser.add_argument("--kinds", default=",".join(TIMED_KINDS),
                        help="comma-separated steps to time against 2 forwards (fewer kinds, more repeats: tighter medians)")
    parser.add_argument("--memory-runs", type=int, default=MEMORY_RUNS,
                        help=f"fresh processes per memory kind and allocator, medians reported (default {MEMORY_RUNS})")
    parser.add_argument("--memory-kinds", default=",".join(MEM_KINDS),
                        help=f"comma-separated steps whose peak memory is measured, of {list(MEMORY_KINDS)}")
    parser.add_argument("--memory-allocators", default=",".join(ALLOCATORS),
                        help=f"comma-separated allocator settings the peak memory is measured under, of {list(ALLOCATORS)}")
    parser.add_argument("--memory-only", action="store_true", help="measure the peak memory only, no timing")
    parser.add_argument("--quick", action="store_true", help="small model only, 2 repeats: a smoke check")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)  # (model, kind): child process
    args = parser.parse_args()
    if args._memory:
        print(json.dumps(measure_memory(*args._memory)))
        return
    names = ["small"] if args.quick else args.models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    kinds = args.kinds.split(",")
    if set(kinds) - set(TIMED_KINDS):
        parser.error(f"unknown kinds {sorted(set(kinds) - set(TIMED_KINDS))}; choose from {list(TIMED_KINDS)}")
    # memory first: a child's ru_maxrss starts at this process's peak, so keep that small
    if args.memory_runs < 1:
        parser.error(f"--memory-runs={args.memory_runs} must be >= 1")
    memory_kinds = args.memory_kinds.split(",")
    if set(memory_kinds) - set(MEMORY_KINDS):
        parser.error(f"unknown memory kinds {sorted(set(memory_kinds) - set(MEMORY_KINDS))}; choose from {list(MEMORY_KINDS)}")
    if not args.memory_only and set(MEM_KINDS) - set(memory_kinds):
        parser.error(f"the timed report compares {list(MEM_KINDS)}: give them all in --memory-kinds, or --memory-only")
    allocators = args.memory_allocators.split(",")
    if set(allocators) - set(ALLOCATORS):
        parser.error(f"unknown memory allocators {sorted(set(allocators) - set(ALLOCATORS))}; choose from {list(ALLOCATORS)}")
    if not args.memory_only and allocators != list(ALLOCATORS):
        parser.error(f"the timed report compares {list(ALLOCATORS)}: give them all in --memory-allocators, or --memory-only")
    memory = {n: {a: memory_in_subprocesses(n, a, args.memory_runs, memory_kinds) for a in allocators} for n in names}
    env = {"device": str(DEVICE), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.memory_only:
        print(f"# {' '.join(sys.argv)}  ({env})")
        for n in names:
            for allocator, kinds in memory[n].items():
                for kind, m in kinds.items():
                    print(f"{n} {allocator:8s} {kind:10s} peak {m['peak'] / 1024:8.1f} MiB, above the start "
                          f"{m['increment'] / 1024:8.1f} MiB")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "memory_kib": memory}, f, indent=1)
        return
    results = {}
    for n in names:
        repeats = 2 if args.quick else args.repeats or DEFAULT_REPEATS[n]
        results[n] = summarize(n, *time_steps(n, repeats, kinds), memory[n])
    print(f"# {' '.join(sys.argv)}  ({env})")
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
