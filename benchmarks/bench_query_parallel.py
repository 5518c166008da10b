"""Query-parallel ZO: time per step with P processes against one process, same global batch and q.

    python benchmarks/bench_query_parallel.py                 # q=4, 2 processes vs 1, one thread each, 3 rounds
    python benchmarks/bench_query_parallel.py --queries 8 --steps 30 --model llama-small

Each configuration is a real `accelerate launch` of ZOTrainer (gloo on CPU, NCCL on GPUs) with one
thread per process (OMP_NUM_THREADS=1), so P processes use P cores. With `zo_parallel: query` every
process evaluates q/P directions on the whole global batch and exchanges 2 losses per direction, so
the ideal speed-up is P. Time per step is the median over the run's steps after the first few
(start-up, tokenizer and data are not counted); both runs must end with the same weights. The two
launches alternate over --rounds rounds and the median of the per-round speed-ups is reported.

Each round also measures what the machine allows: P independent processes (no trainer, no
communication) each running 2q/P plain forwards of the same model and batch per step, against one
process running 2q; the slowest process sets the P-process step, as in a synchronised run. The ratio
of the two speed-ups is the share of the machine's own parallel speed-up that query-parallel ZO keeps.

Every process runs with glibc's mmap threshold fixed at 32 MiB and heap trimming off (MALLOC_ENV). With
the default dynamic threshold a process either keeps freed activations in its heap or hands them back and
page-faults them in again at every forward, depending on its allocation history: one-process launches
took 0.42-0.54 s per step with the default thresholds and 0.38-0.44 s with the fixed ones
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def worker(cli) -> None:
    """Runs inside `accelerate launch`: train, record each optimizer step's end time, save rank 0's result."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from zo_trainer import ZOConfig, ZOTrainer
    from zo_trainer.modeling import PRESETS

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    config = PRESETS[cli.model]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = cli.global_batch * (cli.steps + 1)
    ids = torch.randint(config["vocab_size"], (rows, cli.seq), generator=torch.Generator().manual_seed(0)).tolist()
    args = ZOConfig(
        output_dir=cli.out, max_steps=cli.steps, per_device_train_batch_size=cli.global_batch // world,
        zo_num_queries=cli.queries, zo_parallel="query", learning_rate=1e-4, report_to="none",
        save_strategy="no", logging_steps=cli.steps, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        seed=0, dataloader_drop_last=True,
    )
    clock = StepClock()
    trainer = ZOTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                        callbacks=[clock])
    trainer.train()
    if trainer.accelerator.is_main_process:
        step_times = [b - a for a, b in zip(clock.ends, clock.ends[1:])][WARMUP_STEPS:]
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        Path(cli.out, "result.json").write_text(json.dumps({
            "world": world, "step_s": statistics.median(step_times), "weights_sum": weights.double().sum().item(),
            "weights_abs_sum": weights.double().abs().sum().item(),
        }))
    trainer.accelerator.wait_for_everyone()  # then destroy the process group: gloo can abort at exit otherwise
    trainer.accelerator.end_training()


def forwards_worker(cli) -> None:
    """One process of the ceiling measurement: --forwards plain forwards per step, median step time to --out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zo_trainer.modeling import PRESETS

    config = PRESETS[cli.model]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).train()
    x = torch.randint(config["vocab_size"], (cli.global_batch, cli.seq), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(cli.steps):
            start = time.perf_counter()
            for _ in range(cli.forwards):
                model(input_ids=x, labels=x)
            times.append(time.perf_counter() - start)
    Path(cli.out).write_text(json.dumps({"step_s": statistics.median(times[WARMUP_STEPS:])}))


def ceiling(processes: int, cli, out: Path) -> float:
    """Step time of `processes` concurrent forward-only processes sharing the 2q forwards (the slowest counts)."""
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--forwards", str(2 * cli.queries // processes), "--model", cli.model,
           "--steps", str(cli.steps), "--global_batch", str(cli.global_batch), "--seq", str(cli.seq)]
    workers = [subprocess.Popen([*cmd, "--out", str(out / f"ceiling{processes}_{r}.json")], env=env, cwd=ROOT)
               for r in range(processes)]
    if any(w.wait() for w in workers):
        sys.exit(f"a forward-only process of the {processes}-process ceiling failed")
    return max(json.loads((out / f"ceiling{processes}_{r}.json").read_text())["step_s"] for r in range(processes))


def launch(processes: int, cli, out: Path) -> dict:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes > 1 and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's multi-process launcher does not set it for CPU runs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           *(["--multi_gpu"] if processes > 1 else []), __file__, "--worker", "--out", str(out),
           "--model", cli.model, "--queries", str(cli.queries), "--steps", str(cli.steps),
           "--global_batch", str(cli.global_batch), "--seq", str(cli.seq)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"launch with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-tiny", help="a preset of zo_trainer.modeling.PRESETS")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of launches (1 process, then P); the median counts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forwards", type=int, help=argparse.SUPPRESS)  # a process of the ceiling measurement
    parser.add_argument("--out", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return worker(cli)
    if cli.forwards:
        return forwards_worker(cli)
    rounds, ceilings = [], []  # 1 process and P processes back to back, so drifting machine load hits both alike
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cli.rounds):
            rounds.append((launch(1, cli, Path(tmp, f"one{r}")), launch(cli.processes, cli, Path(tmp, f"many{r}"))))
            ceilings.append((ceiling(1, cli, Path(tmp)), ceiling(cli.processes, cli, Path(tmp))))
    print(f"# {' '.join(sys.argv)}  (model {cli.model}, q={cli.queries}, global batch {cli.global_batch}x{cli.seq}, "
          f"{cli.steps} steps, median step time after {WARMUP_STEPS}, one thread per process, nproc={os.cpu_count()})")
    speedups = [one["step_s"] / many["step_s"] for one, many in rounds]
    plain = [one / many for one, many in ceilings]
    for r, (one, many) in enumerate(rounds):
        same = abs(one["weights_sum"] - many["weights_sum"]) <= 1e-6 * one["weights_abs_sum"]
        print(f"round {r}: 1 process {one['step_s']:.4f} s/step, {cli.processes} processes {many['step_s']:.4f} s/step, "
              f"speed-up {speedups[r]:.2f}x, same weights: {same}; plain forwards {ceilings[r][0]:.4f} / "
              f"{ceilings[r][1]:.4f} s/step, {plain[r]:.2f}x")
    print(f"median speed-up: {statistics.median(speedups):.2f}x over {cli.rounds} rounds "
          f"(ideal {cli.processes}x; target >= {0.9 * cli.processes:.1f}x)")
    print(f"median speed-up of {cli.processes} independent processes of plain forwards: {statistics.median(plain):.2f}x; "
          f"query-parallel ZO keeps {statistics.median(s / c for s, c in zip(speedups, plain)):.0%} of it (median per round)")

if __name__ == "__main__":
    main()
