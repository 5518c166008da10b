"""Which method learns: every ZO optimizer against first-order baselines, on the same model, data, seeds and budget.

    python benchmarks/bench_convergence.py                        # CPU scale: llama-tiny on the embedded corpus
    python benchmarks/bench_convergence.py --scale gpu --budget 6000   # a GPU: llama2-20m, 16 x 256 tokens
    python benchmarks/bench_convergence.py --methods zo-sgd fo-sgd --budget 1000 --seeds 0 1 2
    # two processes of one thread each share the runs (one log), then one writes the report
    python benchmarks/bench_convergence.py --threads 1 --methods fo-sgd fo-adamw zo-sgd &
    python benchmarks/bench_convergence.py --threads 1 --methods zo-adam zo-newton; wait
    python benchmarks/bench_convergence.py --report-only
    python benchmarks/bench_convergence.py --memory-only          # only the peak memory of each kept setting

fo-galore and fo-apollo need `pip install galore-torch apollo-torch` (transformers' `optim="galore_adamw"` and
`"apollo_adamw"`).

Protocol (written into the report too): every method gets the same budget in forward-pass equivalents (a ZO step
costs its 2q forwards, +1 for the Newton rule; a first-order step counts 3: one forward and a backward of about
two), the same three-point learning-rate grid around its family's usual value (extended while its best point is at
an edge), the learning rate with the lowest final held-out loss on seed 0 is kept, then that setting runs on every seed. Held-out loss is measured at
``--evals`` points of the budget. Memory above the weights is what the method keeps between steps (gradients and
optimizer state, counted on the live tensors); activations are the same for all methods but FO's backward. Peak
memory is measured for each kept setting in a fresh process of its own, over ``--memory-budget`` forwards of training
(no evaluation): the resident set's peak during training (VmHWM, reset after the model, the data and the Trainer are
built), in all and above the resident set at its start (weights, data and libraries loaded), with glibc's mmap
threshold fixed (every block of 128 KiB or more mapped on its own, as `bench_zo_step.py`'s "no-frag"): without it,
the heap's fragmentation moves one method's peak by ~15 MiB from one process to the next.
Output: ``<out>/runs.jsonl`` (one line per run, appended, so a rerun skips what is done), ``<out>/memory.jsonl``,
and ``<out>/report.md`` with ``<out>/curves.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP workers stall parallel runs

import argparse
import ctypes
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, default_data_collator, set_seed

from zo_trainer.config import ZOConfig
from zo_trainer.data import DataArguments, build_lm_datasets, load_raw_dataset
from zo_trainer.memory import peak_memory_mb, reset_peak_memory
from zo_trainer.modeling import ModelArguments, build_model, tokenizer_vocab_size
from zo_trainer.tokenizer import build_tokenizer
from zo_trainer.trainer import ZOTrainer

FO_STEP_FORWARDS = 3
# the model, its batch and the device of each scale; both run on the embedded corpus (a lent GPU has no network)
SCALES = {"cpu": dict(model_preset="llama-tiny", block_size=128, batch=8, use_cpu=True),
          "gpu": dict(model_preset="llama2-20m", block_size=256, batch=16, use_cpu=False)}
SCALE = SCALES["cpu"]  # set by main's --scale
LOW_RANK_MODULES = [r".*\.(self_attn|mlp)\..*"]  # GaLore / APOLLO project these matrices' gradients
GRID_EXTENSIONS = 2  # points added beyond a grid edge that holds the best learning rate
# name -> (ZOConfig settings, learning-rate grid). The grids are three points, a factor ~3 apart, around the
# family's usual value; the same rule for every method.
METHODS: dict[str, tuple[dict, list[float]]] = {
    "fo-sgd": (dict(training_order="fo", optim="sgd"), [3e-2, 1e-1, 3e-1]),
    "fo-adamw": (dict(training_order="fo", optim="adamw_torch"), [1e-3, 3e-3, 1e-2]),
    # the memory-efficient first-order baselines (pip install galore-torch apollo-torch): rank 1/4 of the hidden
    # size on the attention and MLP matrices, as the GaLore paper's smallest model; AdamW on the rest
    "fo-galore": (dict(training_order="fo", optim="galore_adamw", optim_target_modules=LOW_RANK_MODULES,
                       optim_args="rank=32,update_proj_gap=200,scale=0.25"), [1e-3, 3e-3, 1e-2]),
    "fo-apollo": (dict(training_order="fo", optim="apollo_adamw", optim_target_modules=LOW_RANK_MODULES,
                       optim_args="rank=32,update_proj_gap=200,scale=1.0,proj=random,scale_type=channel"),
                  [1e-3, 3e-3, 1e-2]),
    "zo-sgd": (dict(), [1e-3, 3e-3, 1e-2]),
    "zo-sgd-q4": (dict(zo_num_queries=4), [3e-3, 1e-2, 3e-2]),
    "zo-momentum": (dict(zo_momentum=0.9), [1e-4, 3e-4, 1e-3]),
    "zo-momentum-history8": (dict(zo_momentum=0.9, zo_momentum_history=8), [1e-4, 3e-4, 1e-3]),
    "zo-adam": (dict(zo_optimizer="adam"), [1e-4, 3e-4, 1e-3]),
    "zo-sign": (dict(zo_optimizer="sign"), [1e-5, 3e-5, 1e-4]),
    "zo-newton": (dict(zo_step_rule="newton"), [0.3, 1.0, 3.0]),
    "zo-normalized": (dict(zo_step_rule="normalized"), [1e-4, 3e-4, 1e-3]),
    "zo-spread-q4": (dict(zo_num_queries=4, zo_step_rule="spread"), [1e-4, 3e-4, 1e-3]),
    # HiZOO's diagonal-Hessian preconditioner, its Hessian_smooth α at 1e-2 (the largest of HiZOO's schedules)
    "zo-hizoo": (dict(zo_optimizer="hizoo", zo_hessian_smooth=1e-2), [1e-4, 3e-4, 1e-3]),
    "zo-lowrank": (dict(zo_distribution="lowrank"), [1e-3, 3e-3, 1e-2]),
    # blockwise (paper §3.2): the embedding (tied to the head) by first-order SGD for a quarter of the budget at
    # fo-sgd's best rate, then the layers by ZO-SGD (the ZO estimate fed to the same SGD); the grid is the ZO block's
    "zo-blockwise-fo-embedding": (dict(optim="sgd", fo_share=0.25, fo_learning_rate=0.1), [1e-4, 3e-4, 1e-3]),
    # fine-tuning from a first-order pretrained base (`--methods` names them; not in the default set): a LoRA
    # adapter (examples/zo_peft.py's: r 8 on q_proj and v_proj, MeZO's ε 1e-2 for LoRA) and the full weights
    "fo-lora": (dict(training_order="fo", optim="adamw_torch"), [1e-3, 3e-3, 1e-2]),
    "zo-lora": (dict(zo_eps=1e-2), [1e-3, 3e-3, 1e-2]),
    "zo-lora-normalized": (dict(zo_eps=1e-2, zo_step_rule="normalized"), [1e-4, 3e-4, 1e-3]),
    "zo-sgd-from-base": (dict(), [1e-4, 3e-4, 1e-3]),
}
FROM_BASE = {"fo-lora": "lora", "zo-lora": "lora", "zo-lora-normalized": "lora", "zo-sgd-from-base": None}
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
BASE = dict(training_order="fo", optim="adamw_torch", learning_rate=1e-3, max_steps=300)  # fo-adamw's best lr


def forwards_per_step(settings: dict) -> int:
    if settings.get("training_order") == "fo":
        return FO_STEP_FORWARDS
    with_base = settings.get("zo_step_rule") == "newton" or settings.get("zo_optimizer") == "hizoo"  # L0
    return 2 * settings.get("zo_num_queries", 1) + with_base


def schedule(settings: dict, budget: int) -> tuple[dict, list[int]]:
    """The ZOConfig settings of a method for ``budget`` forwards, and the forwards each of its steps costs: a
    blockwise method (``fo_share``) spends that share of the budget on the first-order embedding block."""
    settings = dict(settings)
    share, fo_lr = settings.pop("fo_share", None), settings.pop("fo_learning_rate", None)
    if share is None:
        per_step = forwards_per_step(settings)
        return settings, [per_step] * (budget // per_step)
    fo_steps = round(budget * share / FO_STEP_FORWARDS)
    zo_per_step = forwards_per_step(settings)
    zo_steps = (budget - fo_steps * FO_STEP_FORWARDS) // zo_per_step
    settings["block_schedule"] = [
        {"name": "embedding", "parameters": ["model.embed_tokens.*"], "steps": fo_steps, "training_order": "fo",
         "learning_rate": fo_lr},
        {"name": "layers", "parameters": ["model.layers.*", "model.norm.*"], "steps": zo_steps, "training_order": "zo"},
    ]
    return settings, [FO_STEP_FORWARDS] * fo_steps + [zo_per_step] * zo_steps


class _Curve(TrainerCallback):
    """Held-out loss against forwards and wall time, at the evaluations the Trainer runs."""

    def __init__(self, costs: list[int]):
        self.spent = [0, *itertools.accumulate(costs)]  # forwards after each step
        self.points, self.start = [], time.monotonic()
        self.last_estimate = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "zo_projected_grad_abs" in logs:
            self.last_estimate = logs["zo_projected_grad_abs"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.points.append({"step": state.global_step, "forwards": self.spent[state.global_step],
                            "seconds": round(time.monotonic() - self.start, 2), "eval_loss": metrics["eval_loss"]})


def kept_bytes(trainer: ZOTrainer) -> int:
    """Bytes a method keeps above the weights during a step: the gradient (first order; the Trainer frees it
    after the step) and the optimizer state tensors."""
    total = 0
    sizes = {n: p.numel() * p.element_size() for n, p in trainer.model.named_parameters()}
    if trainer.block_schedule is not None:  # each block's gradient (a ZO block's estimate written to .grad)
        total += max(sum(map(sizes.get, names)) for names in trainer.block_schedule.names.values())
    elif trainer.args.training_order == "fo":
        total += sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for state in optimizer.state.values():
        for value in state.values():  # tensors, and the tensors of objects kept there (GaLore's projectors)
            for v in [value] if torch.is_tensor(value) else vars(value).values() if hasattr(value, "__dict__") else []:
                total += v.numel() * v.element_size() if torch.is_tensor(v) and v.dim() else 0
    return total


def new_trainer(data, name: str, lr: float, seed: int, budget: int, evals: int | None, out: Path):
    """The Trainer of one run and the forwards each of its steps costs; ``evals=None``: no evaluation."""
    settings, costs = schedule(METHODS[name][0], budget)
    steps = len(costs)
    tokenizer, train, valid = data
    set_seed(seed)
    model = new_model(tokenizer) if name not in FROM_BASE else base_model(out, FROM_BASE[name])
    every = max(1, steps // (evals or 1))
    args = ZOConfig(output_dir=str(out / "scratch" / f"{name}-{lr:g}-{seed}"), overwrite_output_dir=True,
                    max_steps=steps, learning_rate=lr, seed=seed, zo_seed=seed, per_device_train_batch_size=SCALE["batch"],
                    per_device_eval_batch_size=32, lr_scheduler_type="constant",
                    eval_strategy="steps" if evals else "no", eval_steps=every, logging_steps=every,
                    save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=SCALE["use_cpu"],
                    max_grad_norm=0.0, **settings)
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                        data_collator=default_data_collator)
    return trainer, costs


def run_one(data, name: str, lr: float, seed: int, budget: int, evals: int, out: Path) -> dict:
    trainer, costs = new_trainer(data, name, lr, seed, budget, evals, out)
    curve = _Curve(costs)
    trainer.add_callback(curve)
    steps, tokenizer, model = len(costs), data[0], trainer.model
    initial = trainer.evaluate()["eval_loss"]
    curve.points.clear()
    curve.start = time.monotonic()
    try:
        trainer.train()
        final = trainer.evaluate()["eval_loss"] if not curve.points or curve.points[-1]["step"] != steps \
            else curve.points[-1]["eval_loss"]
    except RuntimeError as err:  # a diverged run: reported as such
        final, curve.points = math.inf, curve.points + [{"error": str(err)[:200]}]
    return {"method": name, "lr": lr, "seed": seed, "budget": budget, "steps": steps, "initial_loss": initial,
            "final_loss": final if math.isfinite(final) else None, "curve": curve.points,
            "uniform_loss": math.log(len(tokenizer)), "frozen": curve.last_estimate == 0.0,
            "seconds": round(time.monotonic() - curve.start, 1), "kept_bytes": kept_bytes(trainer),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def measure_peak(data, name: str, lr: float, budget: int, out: Path) -> dict:
    """The resident set of training alone (`zo_trainer.memory`), in MiB: at its start and at its peak. Freed heap is
    handed back first, so the peak counts what this run allocates (call it in a fresh process)."""
    trainer, _ = new_trainer(data, name, lr, 0, budget, None, out)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory()
    start = peak_memory_mb()
    trainer.train()
    return {"method": name, "lr": lr, "budget": budget, "start_mib": round(start, 1),
            "peak_mib": round(peak_memory_mb(), 1)}


def peak_of(name: str, lr: float, args) -> dict:
    """`measure_peak` in a process of its own (``--measure``), cached in ``<out>/memory.jsonl``."""
    cached = _cached_peak(name, lr, args)
    if cached is not None:
        return cached
    command = [sys.executable, __file__, "--measure", name, repr(lr), "--memory-budget", str(args.memory_budget),
               "--scale", args.scale, "--out", str(args.out), *(["--threads", str(args.threads)] if args.threads else [])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # as bench_zo_step's "no-frag": the live tensors' peak
    row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1])
    with (args.out / "memory.jsonl").open("a") as file:
        file.write(json.dumps(row) + "\n")
    print(f"{name:22s} lr={lr:<8g} peak {row['peak_mib']} MiB, {row['peak_mib'] - row['start_mib']:.1f} above its start",
          flush=True)
    return row


def new_model(tokenizer):
    return build_model(ModelArguments(model_preset=SCALE["model_preset"]), vocab_size=len(tokenizer),
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def train_base(data, out: Path) -> None:
    """The model the fine-tuning methods start from: llama-tiny after `BASE` (first-order AdamW, seed 0)."""
    if (out / "base" / "config.json").is_file():
        return
    tokenizer, train, valid = data
    set_seed(0)
    args = ZOConfig(output_dir=str(out / "scratch" / "base"), overwrite_output_dir=True, seed=0,
                    per_device_train_batch_size=SCALE["batch"], lr_scheduler_type="constant", save_strategy="no",
                    report_to="none", disable_tqdm=True, use_cpu=SCALE["use_cpu"], max_grad_norm=0.0, **BASE)
    trainer = ZOTrainer(model=new_model(tokenizer), args=args, train_dataset=train, data_collator=default_data_collator)
    trainer.train()
    trainer.model.save_pretrained(out / "base")


def base_model(out: Path, adapter: str | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "base")
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    return model


def load_data():
    data_args = DataArguments(dataset_name="sotu", block_size=SCALE["block_size"], max_eval_samples=128)
    raw = load_raw_dataset(data_args)
    model_args = ModelArguments(model_preset=SCALE["model_preset"])
    tokenizer = build_tokenizer(None, raw["train"]["text"], tokenizer_vocab_size(model_args), 512)
    train, valid = build_lm_datasets(data_args, tokenizer, raw_datasets=raw)
    return tokenizer, train, valid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in FROM_BASE],
                        choices=list(METHODS))
    parser.add_argument("--budget", type=int, default=1200, help="forward-pass equivalents per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evals", type=int, default=6, help="held-out evaluations per run")
    parser.add_argument("--scale", choices=list(SCALES), default="cpu",
                        help="cpu: llama-tiny, 8 x 128 tokens; gpu: llama2-20m, 16 x 256 tokens, on the GPU")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/convergence[-gpu]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure the peak memory of each method's kept setting, then write the report")
    parser.add_argument("--memory-budget", type=int, default=120, help="forwards of training per peak measurement")
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "LR"), help=argparse.SUPPRESS)  # peak_of's process
    args = parser.parse_args(argv)
    global SCALE
    SCALE = SCALES[args.scale]
    args.out = args.out or Path("benchmarks/results/convergence" + ("" if args.scale == "cpu" else f"-{args.scale}"))
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.measure:
        print(json.dumps(measure_peak(load_data(), args.measure[0], float(args.measure[1]), args.memory_budget, args.out)))
        return None
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if args.report_only or args.memory_only:
        return write_report([row for row in done if row["budget"] == args.budget], args, measure=args.memory_only)
    data = load_data()
    if any(name in FROM_BASE for name in args.methods):
        train_base(data, args.out)

    def result(name, lr, seed):
        for row in done:
            if (row["method"], row["lr"], row["seed"], row["budget"]) == (name, lr, seed, args.budget):
                return row
        row = run_one(data, name, lr, seed, args.budget, args.evals, args.out)
        done.append(row)
        with log.open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"{name:22s} lr={lr:<8g} seed={seed} final={row['final_loss']} ({row['seconds']} s)", flush=True)
        return row

    for name in args.methods:
        sweep = {lr: result(name, lr, args.seeds[0]) for lr in METHODS[name][1]}
        best = min(sweep, key=lambda lr: _score(sweep[lr]))
        for _ in range(GRID_EXTENSIONS):  # the best at an edge of the grid: one more point beyond it, same rule
            if best not in (min(sweep), max(sweep)) or math.isinf(_score(sweep[best])):
                break
            lr = _next_on_ladder(best, up=best == max(sweep))
            sweep[lr] = result(name, lr, args.seeds[0])
            best = min(sweep, key=lambda lr: _score(sweep[lr]))
        for seed in args.seeds[1:]:
            result(name, best, seed)
    write_report([row for row in done if row["budget"] == args.budget], args, measure=True)


def _next_on_ladder(lr: float, up: bool) -> float:
    """The neighbour of lr on the 1-3-10 ladder the grids use: 1e-3 -> 3e-3 (up) or 3e-4 (down)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    if up:
        return float(f"{3 if mantissa == 1 else 1}e{exponent if mantissa == 1 else exponent + 1}")
    return float(f"{1 if mantissa == 3 else 3}e{exponent if mantissa == 3 else exponent - 1}")


def _failed(row: dict) -> str | None:
    """"diverged" (not finite), "frozen" (pinned at the uniform prediction ln V: every estimate exactly 0, which
    a frozen model reaches from above, so its loss would look like progress), or None."""
    if row["final_loss"] is None:
        return "diverged"
    uniform = row.get("uniform_loss", math.log(4096))  # runs logged before the field: llama-tiny's vocabulary
    if row.get("frozen") or abs(row["final_loss"] - uniform) < 1e-4:
        return "frozen"
    return None


def _score(row: dict) -> float:
    return math.inf if _failed(row) else row["final_loss"]


def _best(rows: list[dict], name: str, first_seed: int) -> float:
    return min((r for r in rows if r["method"] == name and r["seed"] == first_seed), key=_score)["lr"]


def write_report(rows: list[dict], args, measure: bool = False) -> None:
    """The report of ``rows``; ``measure``: the peak memory of each kept setting is measured where not cached."""
    names = [n for n in args.methods if any(r["method"] == n for r in rows)]
    table, curves = [], {}
    fo_sgd = None
    for name in names:
        lr = _best(rows, name, args.seeds[0])
        runs = [r for r in rows if r["method"] == name and r["lr"] == lr and r["seed"] in args.seeds]
        finals = [r["final_loss"] for r in runs if not _failed(r)]
        drops = [r["initial_loss"] - r["final_loss"] for r in runs if not _failed(r)]
        spread = statistics.stdev(drops) if len(drops) > 1 else 0.0
        seconds = statistics.median(r["seconds"] for r in runs)
        sweep = ", ".join(f"{r['lr']:g}: {_failed(r) or format(r['final_loss'], '.3f')}"
                          for r in sorted((r for r in rows if r["method"] == name and r["seed"] == args.seeds[0]),
                                          key=lambda r: r["lr"]))
        tried = [r["lr"] for r in rows if r["method"] == name and r["seed"] == args.seeds[0]]
        edge = " (grid edge)" if lr in (min(tried), max(tried)) else ""
        peak = peak_of(name, lr, args) if measure else _cached_peak(name, lr, args)
        peak = f"{peak['peak_mib'] - peak['start_mib']:.0f} / {peak['peak_mib']:.0f}" if peak else "not measured"
        table.append((name, f"{lr:g}{edge}", len(runs), statistics.mean(finals) if finals else math.nan,
                      statistics.mean(drops) if drops else math.nan, spread, seconds, runs[0]["kept_bytes"],
                      runs[0]["weight_bytes"], peak, sweep))
        curves[name] = runs
        if name == "fo-sgd":
            fo_sgd = runs
    fine_tuned = any(name in FROM_BASE for name in names)
    start = (f"fine-tuned from a base trained by {BASE['max_steps']} first-order AdamW steps at lr "
             f"{BASE['learning_rate']:g}: a LoRA adapter (r {LORA['r']} on {', '.join(LORA['target_modules'])}) or "
             "the full weights") if fine_tuned else "random init"
    methods = f" --out {args.out} --methods {' '.join(names)}" if fine_tuned else ""
    lines = [
        "# Convergence: ZO optimizers against first-order baselines",
        "",
        f"`python benchmarks/bench_convergence.py --budget {args.budget} --seeds {' '.join(map(str, args.seeds))}"
        f"{'' if args.scale == 'cpu' else ' --scale ' + args.scale}{methods}`: "
        f"{SCALE['model_preset']} ({start}), the embedded `sotu` corpus, batch {SCALE['batch']} x "
        f"{SCALE['block_size']} tokens, constant "
        f"learning rate, {args.budget} forward-pass equivalents per run (a first-order step counts "
        f"{FO_STEP_FORWARDS}), held-out loss on 128 blocks.",
        "",
        "Learning rate: three grid points per method, extended by up to "
        f"{GRID_EXTENSIONS} more on the 1-3-10 ladder while the best lies at an edge (all listed), the lowest final held-out loss of seed "
        f"{args.seeds[0]} among the runs that neither diverged nor froze (a model pinned at the uniform prediction "
        "ln V, every estimate exactly 0) is kept, then every seed runs it. Drop = untrained minus final held-out loss (nat), mean "
        "and standard deviation over the seeds. Kept memory = gradients and optimizer state between steps, above "
        f"the weights. Peak = the resident set's peak over {args.memory_budget} forwards of training with the kept "
        "setting, in a fresh process with glibc's mmap threshold fixed (no heap fragmentation): above the resident set at the start of training (weights, data and libraries "
        "loaded) / in all, in MiB" + ("; at 1.3M parameters (5 MiB of weights) it is the activations and the logits "
        "(8 x 128 x 4096 floats: 16 MiB) that it counts" if args.scale == "cpu" else "") + ". A kept learning rate at the edge of its grid is marked: the optimum may lie beyond it. Wall "
        "times are as run (here two runs at a time, one torch thread each, on a shared 2-core machine): compare them "
        "within this report only.",
        "",
        "| method | lr | seeds | final loss | drop (nat) | ± | median s | kept memory / weights | peak MiB (above "
        f"start / total) | sweep (seed {args.seeds[0]}: lr: final) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, lr, n, final, drop, spread, seconds, kept, weights, peak, sweep in table:
        lines.append(f"| {name} | {lr} | {n} | {final:.3f} | {drop:.3f} | {spread:.3f} | {seconds:.0f} | "
                     f"{kept / weights:.2f} | {peak} | {sweep} |")
    if fo_sgd:
        lines += ["", "Forwards each ZO method needs to reach FO-SGD's held-out loss at points of FO-SGD's curve "
                  "(seed-mean curves; '>' = not reached within the budget):", "",
                  "| method | " + " | ".join(f"FO-SGD @ {p['forwards']} fwd ({p['eval_loss']:.3f})"
                                           for p in _mean_curve(fo_sgd)[1::2]) + " |",
                  "|---|" + "---|" * len(_mean_curve(fo_sgd)[1::2])]
        for name in names:
            if name.startswith("zo"):
                curve = _mean_curve(curves[name])
                cells = []
                for target in _mean_curve(fo_sgd)[1::2]:
                    hit = next((p["forwards"] for p in curve if p["eval_loss"] <= target["eval_loss"]), None)
                    cells.append(f"{hit} ({hit / target['forwards']:.1f}x)" if hit else f"> {args.budget}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    _plot(curves, args.out / "curves.png")
    lines += ["", "![held-out loss against forward passes and wall time](curves.png)", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _cached_peak(name: str, lr: float, args) -> dict | None:
    log = args.out / "memory.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return next((r for r in rows if (r["method"], r["lr"], r["budget"]) == (name, lr, args.memory_budget)), None)


def _mean_curve(runs: list[dict]) -> list[dict]:
    points = [[p for p in r["curve"] if "eval_loss" in p] for r in runs]
    length = min(len(p) for p in points)
    return [{"forwards": points[0][i]["forwards"], "seconds": statistics.mean(p[i]["seconds"] for p in points),
             "eval_loss": statistics.mean(p[i]["eval_loss"] for p in points)} for i in range(length)]


def _plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_forwards, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in curves.items():
        curve = _mean_curve(runs)
        style = "--" if name.startswith("fo") else "-"
        by_forwards.plot([p["forwards"] for p in curve], [p["eval_loss"] for p in curve], style, label=name)
        by_time.plot([p["seconds"] for p in curve], [p["eval_loss"] for p in curve], style, label=name)
    by_forwards.set(xlabel="forward-pass equivalents", ylabel="held-out loss (nat)")
    by_time.set(xlabel="wall time (s, as run: compare within this figure only)")
    by_forwards.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
