"""Figures from fake-but-realistic Trainer output directories and gradient samples."""
import json

import numpy as np
import pytest

from zo_trainer.plotting import (gradient_density_figure, load_log_history, loss_curves_figure,
                                 plot_gradient_density, plot_loss_curves)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLOCKS = {0: "model.embed_tokens", 1: "model.layers.0", 2: "model.layers.1"}


def blockwise_history():
    """A 3-block ZO run (q=2): train logs every 10 steps, eval every 100 (no wall_time there, as
    Trainer writes it), and the closing summary entry Trainer appends."""
    history = []
    for step in range(10, 301, 10):
        block = (step - 1) // 100
        history.append({"loss": 10.0 - step / 100 + 0.5 * (step % 100 == 10), "step": step,
                        "epoch": step / 300, "learning_rate": 1e-3, "forward_passes": 4 * step,
                        "wall_time": 0.5 * step, "block_index": block, "block_name": BLOCKS[block]})
        if step % 100 == 0:
            history.append({"eval_loss": 9.0 - step / 100, "step": step, "epoch": step / 300})
    history.append({"train_runtime": 150.0, "train_loss": 8.5, "step": 300, "epoch": 1.0})
    return history


def write_state(folder, history):
    folder.mkdir(parents=True, exist_ok=True)
    state = {"global_step": history[-1]["step"], "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))


@pytest.fixture
def runs(tmp_path):
    """A finished blockwise run (top-level state) and a plain FO run that only has checkpoints;
    checkpoint-50 sorts after checkpoint-200 as text, so picking by name alone would be wrong."""
    blockwise, plain = tmp_path / "zo-blockwise", tmp_path / "fo-plain"
    write_state(blockwise, blockwise_history())
    fo = [{"loss": 9.0 - s / 100, "step": s, "epoch": s / 300, "learning_rate": 1e-3}
          for s in range(10, 201, 10)] + [{"eval_loss": 8.5, "step": 200}]
    write_state(plain / "checkpoint-50", fo[:5])
    write_state(plain / "checkpoint-200", fo)
    return blockwise, plain


def lines_by_style(ax):
    return {style: [ln for ln in ax.lines if ln.get_linestyle() == style]
            for style in ("-", "--", ":")}


def test_load_log_history_finds_top_level_newest_checkpoint_or_file(runs, tmp_path):
    blockwise, plain = runs
    assert load_log_history(blockwise) == blockwise_history()
    assert len(load_log_history(plain)) == 21  # checkpoint-200, not checkpoint-50
    assert len(load_log_history(plain / "checkpoint-50" / "trainer_state.json")) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trainer_state.json in .*empty"):
        load_log_history(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="'nope' does not exist"):
        load_log_history("nope")


def test_loss_curves_draw_train_eval_and_block_boundaries(runs):
    blockwise, plain = runs
    fig = loss_curves_figure([blockwise, plain], labels=["ZO blockwise", "FO"], title="demo")
    ax = fig.axes[0]
    lines = lines_by_style(ax)
    assert [ln.get_label() for ln in lines["-"]] == ["ZO blockwise (train)", "FO (train)"]
    assert [ln.get_label() for ln in lines["--"]] == ["ZO blockwise (eval)", "FO (eval)"]
    train = [e for e in blockwise_history() if "loss" in e]
    np.testing.assert_array_equal(lines["-"][0].get_xdata(), [e["step"] for e in train])
    np.testing.assert_array_equal(lines["-"][0].get_ydata(), [e["loss"] for e in train])
    np.testing.assert_array_equal(lines["--"][0].get_ydata(), [8.0, 7.0, 6.0])
    # eval is drawn in its run's colour; boundaries where block_index changes (steps 110, 210)
    assert lines["--"][0].get_color() == lines["-"][0].get_color() != lines["-"][1].get_color()
    assert [ln.get_xdata()[0] for ln in lines[":"]] == [110, 210]
    assert [t.get_text() for t in ax.texts] == list(BLOCKS.values())
    assert ax.get_title() == "demo" and ax.get_xlabel() == "optimizer step"


def test_eval_points_without_x_are_placed_by_step(runs):
    blockwise, _ = runs
    ax = loss_curves_figure([blockwise], x="wall_time").axes[0]
    eval_line = lines_by_style(ax)["--"][0]
    np.testing.assert_allclose(eval_line.get_xdata(), [50.0, 100.0, 150.0])  # wall_time = step / 2
    assert [ln.get_xdata()[0] for ln in lines_by_style(ax)[":"]] == [55.0, 105.0]
    ax = loss_curves_figure([blockwise], x="forward_passes").axes[0]
    np.testing.assert_allclose(lines_by_style(ax)["--"][0].get_xdata(), [400, 800, 1200])
    assert ax.get_xlabel() == "forward passes"


def test_plot_loss_curves_writes_png(runs, tmp_path):
    out = plot_loss_curves(list(runs), tmp_path / "loss.png", x="step")
    assert out == tmp_path / "loss.png"
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000


def test_loss_curves_errors_name_the_bad_value(runs, tmp_path):
    blockwise, plain = runs
    with pytest.raises(ValueError, match=r"x='tokens' is not one of \['forward_passes', 'step', "
                                         r"'wall_time'\]"):
        plot_loss_curves([blockwise], tmp_path / "x.png", x="tokens")
    with pytest.raises(ValueError, match="fo-plain.*'forward_passes'"):
        loss_curves_figure([blockwise, plain], x="forward_passes")
    with pytest.raises(ValueError, match="1 labels for 2 run directories"):
        loss_curves_figure([blockwise, plain], labels=["only one"])
    assert not (tmp_path / "x.png").exists()


def test_gradient_density_panels_match_sample_statistics(tmp_path):
    rng = np.random.default_rng(0)
    samples = {"FO": rng.normal(1e-5, 1e-3, 5000), "ZO q=1": rng.normal(3e-5, 0.3, (50, 100)),
               "ZO q=20": rng.normal(1e-5, 0.07, 5000)}
    fig = gradient_density_figure(samples, bins=50)
    assert [ax.get_title() for ax in fig.axes] == list(samples)
    for ax, v in zip(fig.axes, samples.values()):
        heights = [p.get_height() for p in ax.patches]
        widths = [p.get_width() for p in ax.patches]
        assert len(heights) == 50 and np.dot(heights, widths) == pytest.approx(1.0)
        (fit,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert fit.get_color() == "r"
        assert fit.get_ydata().max() == pytest.approx(1 / np.sqrt(2 * np.pi * np.var(v)), rel=1e-3)
        legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert f"mean = {np.mean(v):.2e}" in legend and f"variance = {np.var(v):.2e}" in legend
    out = plot_gradient_density(samples, tmp_path / "density.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_gradient_density_rejects_bad_samples():
    with pytest.raises(ValueError, match="samples is empty"):
        gradient_density_figure({})
    with pytest.raises(ValueError, match=r"samples\['ZO'\].*1 of them non-finite"):
        gradient_density_figure({"FO": np.ones(3), "ZO": np.array([1.0, np.nan])})
