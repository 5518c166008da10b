"""The `zo-trainer` console script: plots from a real run, toy figures, the variance probe, errors."""

import re
import shutil
import subprocess

import pytest

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.cli import build_parser, main, probe_settings

from conftest import random_token_dataset, tiny_llama

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "zo-run"
    args = ZOConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                    report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=random_token_dataset(n=8))
    trainer.train()
    trainer.save_state()
    return out


def test_plot_losses_from_a_real_run(run_dir, tmp_path, capsys):
    png = tmp_path / "losses.png"
    assert main(["plot", "losses", str(run_dir), "--out", str(png), "--x", "forward_passes",
                 "--labels", "ZO q=1", "--title", "test"]) == 0
    assert is_png(png)
    assert str(png) in capsys.readouterr().out


def test_plot_losses_of_a_missing_run_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["plot", "losses", str(missing), "--out", str(tmp_path / "x.png")]) != 0
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_density_of_a_missing_file_fails_naming_it(tmp_path, capsys):
    assert main(["plot", "density", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "d.png")]) != 0
    assert "nope.npz" in capsys.readouterr().err


def test_plot_into_a_missing_folder_fails(run_dir, tmp_path, capsys):
    out = tmp_path / "missing-folder" / "losses.png"
    assert main(["plot", "losses", str(run_dir), "--out", str(out)]) != 0
    assert "missing-folder" in capsys.readouterr().err


@pytest.mark.parametrize("figure", ["figure2", "figure3"])
def test_toy_figures(figure, tmp_path):
    png = tmp_path / f"{figure}.png"
    assert main(["toy", figure, "--out", str(png)]) == 0
    assert is_png(png)


def test_bad_arguments_exit_nonzero(capsys):
    for argv in (["frobnicate"], [], ["toy", "figure9", "--out", "x.png"], ["plot", "losses", "run"],
                 ["probe", "--queries", "one"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code != 0, argv
    assert "invalid choice" in capsys.readouterr().err


def test_parser_takes_one_function_per_subcommand():
    from zo_trainer import cli

    def add_extra(subparsers):
        extra = subparsers.add_parser("extra")
        extra.set_defaults(func=lambda args: 7)

    cli.SUBCOMMANDS.append(add_extra)
    try:
        assert main(["extra"]) == 7
    finally:
        cli.SUBCOMMANDS.remove(add_extra)
    assert "extra" not in build_parser().format_help()


def test_probe_settings_are_three_sweeps_or_a_grid():
    assert probe_settings([1, 4], [2, 8], [0.0, -0.5]) == [(1, 2, 0.0), (4, 2, 0.0), (1, 8, 0.0), (2, 2, 0.0),
                                                          (2, 2, -0.5)]
    assert probe_settings([1, 4], [2, 8], [0.0, -0.5], sweeps=["batch", "alpha"]) == [(1, 2, 0.0), (1, 8, 0.0),
                                                                                   (2, 2, 0.0), (2, 2, -0.5)]
    grid = probe_settings([1, 4], [2], [0.0, -0.5], grid=True)
    assert grid == [(1, 2, 0.0), (4, 2, 0.0), (4, 2, -0.5)]  # α needs q >= 2


def parse_table(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"\d+", cells[0]):
            q, batch, alpha = int(cells[0]), int(cells[1]), float(cells[2])
            rows[(q, batch, alpha)] = dict(zip(["zo_var", "fo_var", "ratio", "estimate_var", "cosine", "rel_error"],
                                               map(float, cells[3:])))
    return rows


def test_probe_prints_and_writes_a_variance_table(tmp_path, capsys):
    out = tmp_path / "table.md"
    argv = ["probe", "--queries", "1,4", "--batch_sizes", "2", "--correlations", "0", "--sweeps", "q", "--draws", "24",
            "--block_size", "32", "--vocab_size", "512", "--max_documents", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = parse_table(printed)
    assert set(rows) == {(1, 2, 0.0), (4, 2, 0.0)}
    assert rows == parse_table(out.read_text())
    q1, q4 = rows[(1, 2, 0.0)], rows[(4, 2, 0.0)]
    assert q1["fo_var"] == q4["fo_var"] > 0  # same batch, same model: the same backprop gradient
    # ĝ's entries are (zᵀg) z_i: their variance is ‖g‖²·χ²₁ for q=1 and ≈ ‖g‖²/4 for q=4 (mean reduction)
    assert q4["zo_var"] < q1["zo_var"] / 1.5
    assert q4["estimate_var"] < q1["estimate_var"] / 1.5
    for row in rows.values():
        assert row["ratio"] > 100  # ZO entries spread far wider than FO's (paper Fig. 4)
        assert abs(row["cosine"]) < 0.5


def test_probe_rejects_bad_settings(capsys):
    assert main(["probe", "--correlations", "-1"]) == 2
    assert "correlations" in capsys.readouterr().err
    assert main(["probe", "--sweeps", "q,depth"]) == 2
    assert "depth" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("zo-trainer") is None, reason="console script not installed")
def test_console_script(tmp_path):
    result = subprocess.run(["zo-trainer", "plot", "density", str(tmp_path / "x.npz"), "--out", str(tmp_path / "d.png")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "x.npz" in result.stderr


def test_train_is_the_recipe_runner(tmp_path):
    """`zo-trainer train FLAGS` and recipes/pretrain_zo.py's runner give the same weights bit for bit."""
    import torch
    from safetensors.torch import load_file

    from test_recipes import TINY
    from zo_trainer import run

    flags = ["--scale", "cpu", *TINY, "--save_strategy", "no"]
    assert main(["train", "--output_dir", str(tmp_path / "cli"), *flags]) == 0
    run.main(["--output_dir", str(tmp_path / "runner"), *flags])
    by_cli, by_runner = (load_file(tmp_path / name / "model.safetensors") for name in ("cli", "runner"))
    assert by_cli.keys() == by_runner.keys()
    assert all(torch.equal(by_cli[k], by_runner[k]) for k in by_cli)
    assert not torch.equal(by_cli["model.norm.weight"], torch.ones_like(by_cli["model.norm.weight"]))  # it trained


def test_train_refuses_bad_settings_by_name(tmp_path):
    zo_trainer = shutil.which("zo-trainer")
    assert zo_trainer, "the console script is installed with the package"
    proc = subprocess.run([zo_trainer, "train", "--per_device_train_batch_size", "0", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "zo-trainer train: error: per_device_train_batch_size=0 (set on the command line)" in proc.stderr
    assert "Traceback" not in proc.stderr
