"""Figures from real runs: loss curves read from HuggingFace Trainer output directories, and the
paper's Figure 4 (density of gradient entries, FO vs ZO).

Figures are built with `matplotlib.figure.Figure` (Agg rendering, no pyplot), so plotting never
touches global state or needs a display. Each `*_figure` function returns the Figure for
inspection; each `plot_*` function saves it as a PNG and returns the path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

X_AXES = {"step": "optimizer step", "wall_time": "wall-clock time (s)",
          "forward_passes": "forward passes"}


def find_trainer_state(run_dir) -> Path:
    """The run's `trainer_state.json`: at the top level (written at the end of training), else in
    the highest-numbered `checkpoint-*/` (a run that was stopped early or is still going)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name.endswith(".json"):
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    checkpoints = [p for p in run_dir.glob("checkpoint-*/trainer_state.json")
                   if re.fullmatch(r"checkpoint-\d+", p.parent.name)]
    if not checkpoints:
        raise FileNotFoundError(f"no trainer_state.json in {str(run_dir)!r} nor in any of its "
                                f"checkpoint-*/ folders: is it a Trainer output_dir?")
    return max(checkpoints, key=lambda p: int(p.parent.name.split("-")[1]))


def load_log_history(run_dir) -> list[dict]:
    """`log_history` of a run directory (or of a trainer_state.json path)."""
    path = find_trainer_state(run_dir)
    history = json.loads(path.read_text()).get("log_history")
    if not isinstance(history, list):
        raise ValueError(f"{path} has no log_history list")
    return history


# --- Loss curves ------------------------------------------------------------------------------

def _arrays(rows) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.array(v, dtype=float) for v in zip(*rows)) if rows else (np.empty(0),) * 2


def _train_series(history: list[dict], x: str) -> tuple[np.ndarray, np.ndarray]:
    return _arrays([(e[x], e["loss"]) for e in history if "loss" in e and x in e])


def _eval_series(history: list[dict], x: str) -> tuple[np.ndarray, np.ndarray]:
    """Eval entries rarely carry wall_time / forward_passes: those without x are placed by their
    step, interpolating x from the training entries."""
    steps, xs = _arrays([(e["step"], e[x]) for e in history
                         if "loss" in e and "step" in e and x in e])
    rows = []
    for e in history:
        if "eval_loss" in e and x in e:
            rows.append((e[x], e["eval_loss"]))
        elif "eval_loss" in e and "step" in e and len(steps):
            rows.append((np.interp(e["step"], steps, xs), e["eval_loss"]))
    return _arrays(rows)


def _block_starts(history: list[dict], x: str) -> list[tuple[float, str]]:
    """(x, name) where each block began, from `block_index` changes: at the logged `block_start` step
    (x interpolated from the training entries), else at the block's first training entry."""
    steps, xs = _arrays([(e["step"], e[x]) for e in history if "loss" in e and "step" in e and x in e])
    starts, current = [], None
    for e in history:
        if "loss" in e and "block_index" in e and x in e and e["block_index"] != current:
            current = e["block_index"]
            at = float(e[x]) if "block_start" not in e else float(np.interp(e["block_start"], steps, xs))
            starts.append((at, str(e.get("block_name", f"block {current}"))))
    return starts


def loss_curves_figure(run_dirs, x: str = "step", labels=None, title=None) -> Figure:
    """Train loss (solid) and eval loss (dashed, same colour) per run; block starts of blockwise
    runs as dotted vertical lines annotated with the block's name."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r} is not one of {sorted(X_AXES)}")
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("run_dirs is empty: give at least one run directory")
    labels = list(labels) if labels is not None else [(r.parent if r.is_file() else r).resolve().name
                                                       for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        history = load_log_history(run_dir)
        train_x, train_y = _train_series(history, x)
        if not len(train_x):
            raise ValueError(f"run {str(run_dir)!r} has no training entries with both 'loss' and "
                             f"{x!r} in its log_history; choose another x from {sorted(X_AXES)}")
        color = f"C{i % 10}"
        ax.plot(train_x, train_y, "-", color=color, lw=1.2, label=f"{label} (train)")
        eval_x, eval_y = _eval_series(history, x)
        if len(eval_x):
            ax.plot(eval_x, eval_y, "--o", color=color, ms=3, lw=1.2, label=f"{label} (eval)")
        for j, (bx, name) in enumerate(_block_starts(history, x)):
            if j:  # the first block starts with the run: no boundary to mark
                ax.axvline(bx, color=color, ls=":", lw=1)
            ax.annotate(name, (bx, 1), xycoords=("data", "axes fraction"), xytext=(2, -4),
                        textcoords="offset points", rotation=90, va="top", fontsize=8, color=color)
    ax.set(xlabel=X_AXES[x], ylabel="loss (cross-entropy)", title=title or f"Loss vs {X_AXES[x]}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_loss_curves(run_dirs, path, x: str = "step", labels=None, title=None) -> Path:
    """Save `loss_curves_figure(...)` as a PNG at `path`."""
    loss_curves_figure(run_dirs, x=x, labels=labels, title=title).savefig(path, dpi=120)
    return Path(path)


# --- Gradient density (paper Figure 4) --------------------------------------------------------

def gradient_density_figure(samples: dict, bins: int = 100) -> Figure:
    """One panel per entry (e.g. "FO", "ZO q=1", "ZO q=20"): density histogram of the gradient
    entries, the normal with the same mean and variance (red dashed), both numbers in the legend."""
    if not samples:
        raise ValueError("samples is empty: give at least one {name: gradient entries} pair")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    fig = Figure(figsize=(4 * len(samples), 3.6), layout="constrained")
    axes = fig.subplots(1, len(samples), squeeze=False)[0]
    for ax, (name, values) in zip(axes, samples.items()):
        v = np.asarray(values, dtype=float).ravel()
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"samples[{name!r}] must be non-empty and finite; got {v.size} "
                             f"entries, {np.sum(~np.isfinite(v))} of them non-finite")
        mean, var = v.mean(), v.var()
        ax.hist(v, bins=bins, density=True, color="tab:green", alpha=0.7, label="density")
        stats = f"normal fit\nmean = {mean:.2e}\nvariance = {var:.2e}"
        if var > 0:
            t = np.linspace(v.min(), v.max(), 400)
            ax.plot(t, np.exp(-(t - mean) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var), "r--",
                    lw=1.5, label=stats)
        else:  # all entries equal: the fitted normal is a spike at the mean
            ax.axvline(mean, color="red", ls="--", lw=1.5, label=stats)
        ax.set(title=name, xlabel="gradient entry", ylabel="density")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=8)
    return fig


def plot_gradient_density(samples: dict, path, bins: int = 100) -> Path:
    """Save `gradient_density_figure(...)` as a PNG at `path`."""
    gradient_density_figure(samples, bins=bins).savefig(path, dpi=120)
    return Path(path)
