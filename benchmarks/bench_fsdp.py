"""ZO on an FSDP2-sharded model against the whole model: per-process memory, step time and bytes communicated.

    python benchmarks/bench_fsdp.py                        # 20m, 1 and 2 processes, ~5 min on 2 cores
    python benchmarks/bench_fsdp.py --model small --steps 5 --json out.json

Each setting is a fresh `torchrun` launch (gloo on CPU) running the engine's loop (`ZOEstimator` + `ZOSGD`, q = 1,
the whole model trains, 4 x 256 tokens per process, data-parallel: the projected gradients are averaged) on the
`bench_zo_step.py` model: "whole" gives every process the whole model, "sharded" shards it with ``fully_shard``
(each decoder layer, then the root). Reported per process (the largest over the processes):

* the bytes of weights the process holds between steps (its shards, or the whole model), and the peak resident
  memory of the steps above the process's once torch, transformers and the process group are set up (FSDP2's
  all-gather buffers and the layer gathered for each forward included);
* the median time of a step, after one warm-up step;
* the bytes each process receives per step: FSDP2's all-gathers (counted at ``dist.all_gather_single`` /
  ``all_gather_into_tensor``) and the data-parallel all-reduce of the q projected gradients.
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

SETTINGS = (("whole", 1), ("sharded", 1), ("whole", 2), ("sharded", 2))
BATCH, SEQUENCE = 4, 256


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def count_gathers(received: list[int], world: int) -> None:
    """Adds to ``received`` the bytes each all-gather brings this process from the others."""
    import torch.distributed as dist

    for name in ("all_gather_single", "all_gather_into_tensor"):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(output, input, *args, original=original, **kwargs):
            received.append(output.numel() * output.element_size() * (world - 1) // world)
            return original(output, input, *args, **kwargs)

        setattr(dist, name, counted)


def worker(args) -> None:
    """One process of a launch: builds, shards (or not), steps; process 0 writes the result."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from zo_trainer.modeling import PRESETS
    from zo_trainer.zo import ZOSGD, ZOEstimator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    received: list[int] = []
    count_gathers(received, world)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: the peak is the steps', not the imports'
    base = rss_kib("VmRSS")
    config = LlamaConfig(**PRESETS[{"20m": "llama2-20m", "small": "llama-tiny"}[args.model]], use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if args.layout == "sharded":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    held = sum((p.to_local() if type(p).__name__ == "DTensor" else p).numel() * p.element_size()
               for p in model.parameters())
    estimator = ZOEstimator(model, num_queries=1, seed=0)
    optimizer = ZOSGD([p for p in model.parameters() if p.requires_grad], estimator, lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(config.vocab_size, (BATCH, SEQUENCE), generator=generator) for _ in range(args.steps + 1)]
    times, bytes_per_step = [], []
    for i, x in enumerate(batches):
        dist.barrier()
        received.clear()
        begin = time.perf_counter()
        probe = estimator.probe(lambda: model(input_ids=x, labels=x).loss, i)
        if world > 1:
            dist.all_reduce(probe.projected_grads)
            probe.projected_grads /= world
        optimizer.accumulate(probe)
        optimizer.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - begin)
            bytes_per_step.append(sum(received) + (probe.projected_grads.numel() * 8 if world > 1 else 0))
    mine = {"weights_held_mib": held / 2**20, "peak_mib": (rss_kib("VmHWM") - base) / 1024,
            "step_s": statistics.median(times), "received_bytes_per_step": statistics.median(bytes_per_step)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        worst = {key: max(r[key] for r in everyone) for key in mine}
        Path(args.out).write_text(json.dumps(worst))
    dist.destroy_process_group()


def launch(model: str, layout: str, world: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", "29571",
               __file__, "--_worker", "--model", model, "--layout", layout, "--steps", str(steps), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{layout} on {world} process(es) failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("20m", "small"), default="20m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per launch, after one warm-up")
    parser.add_argument("--json")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=("whole", "sharded"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return worker(args)
    results = {f"{layout}, {world} process{'es' if world > 1 else ''}": launch(args.model, layout, world, args.steps)
               for layout, world in SETTINGS}
    print(f"{args.model}, ZO-SGD q=1, {BATCH}x{SEQUENCE} tokens per process, data-parallel (largest over processes)")
    print(f"{'setting':24} {'weights MiB':>10} {'peak MiB':>9} {'step s':>8} {'received per step':>18}")
    for name, r in results.items():
        print(f"{name:24} {r['weights_held_mib']:10.1f} {r['peak_mib']:9.1f} {r['step_s']:8.3f} "
              f"{r['received_bytes_per_step'] / 2**20:14.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
