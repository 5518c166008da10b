"""Gradient diagnostics: running statistics, ZO vs backprop on an analytic model, the probe callback in a run."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.diagnostics import GradientProbeCallback, GradientStats, compare_to_backprop
from zo_trainer.zo import ZOEstimator

from conftest import random_token_dataset, tiny_llama

PROBE_KEYS = {"probe/fo_mean", "probe/fo_var", "probe/zo_mean", "probe/zo_var", "probe/cosine",
              "probe/rel_error", "probe/estimate_var", "probe/var_ratio"}


# ------------------------------------------------------------------------------------ GradientStats
def test_stats_of_the_exact_gradient():
    g = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    stats = GradientStats(g)
    for _ in range(4):
        stats.update(g.clone())
    report = stats.report()
    assert report.cosine == pytest.approx(1.0, abs=1e-6)
    assert report.rel_error == pytest.approx(0.0, abs=1e-3)
    assert report.estimate_var == 0.0
    assert report.mean_rel_error == pytest.approx(0.0, abs=1e-6)
    assert report.zo_mean == pytest.approx(report.fo_mean, abs=1e-6)
    assert report.zo_var == pytest.approx(report.fo_var, rel=1e-5)
    assert report.var_ratio == pytest.approx(1.0, rel=1e-5)


def test_random_vectors_are_orthogonal_to_the_gradient():
    gen = torch.Generator().manual_seed(1)
    stats = GradientStats(torch.randn(100_000, generator=gen))
    for _ in range(8):
        stats.update(torch.randn(100_000, generator=gen))
    report = stats.report()
    assert abs(report.cosine) < 0.05
    assert report.rel_error == pytest.approx(math.sqrt(2), rel=0.02)  # ‖x − g‖ ≈ √2 ‖g‖ for independent x, g


def test_welford_matches_naive_statistics():
    gen = torch.Generator().manual_seed(2)
    draws = torch.randn(7, 300, generator=gen) * torch.linspace(0.1, 3, 300) + 5.0  # large mean: Welford's case
    reference = torch.randn(300, generator=gen)
    stats = GradientStats(reference, sample_indices=torch.tensor([3, 17, 299]))
    for d in draws:
        stats.update(d)
    report = stats.report()
    d64 = draws.double()
    torch.testing.assert_close(stats.mean, draws.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.variance, draws.var(0), rtol=1e-4, atol=1e-5)  # torch.var: ddof = 1
    assert report.estimate_var == pytest.approx(draws.var(0).mean().item(), rel=1e-5)
    assert report.zo_mean == pytest.approx(d64.mean().item(), rel=1e-6)
    assert report.zo_var == pytest.approx(d64.var(correction=0).item(), rel=1e-5)  # all entries of all draws
    cos = torch.nn.functional.cosine_similarity(draws, reference.expand_as(draws), dim=1).mean().item()
    assert report.cosine == pytest.approx(cos, abs=1e-5)
    rel = ((draws - reference).norm(dim=1) / reference.norm()).mean().item()
    assert report.rel_error == pytest.approx(rel, rel=1e-4)
    assert report.fo_var == pytest.approx(reference.double().var(correction=0).item(), rel=1e-9)
    np.testing.assert_array_equal(report.fo_sample, reference[[3, 17, 299]].numpy())
    np.testing.assert_array_equal(report.zo_sample, draws[:, [3, 17, 299]].reshape(-1).numpy())


def test_stats_reject_a_wrong_size():
    stats = GradientStats(torch.zeros(10))
    with pytest.raises(ValueError, match="10"):
        stats.update(torch.zeros(11))


# ----------------------------------------------------------------------------- compare_to_backprop
def linear_problem(seed=0):
    """L(W, b) = mean((X Wᵀ + b − Y)²), float64: the central difference is exact up to rounding."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(50, 20).double()
    X = torch.randn(64, 50, dtype=torch.float64, generator=gen)
    Y = torch.randn(64, 20, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        residual = model(X) - Y
        scale = 2.0 / residual.numel()
        grad = torch.cat([(scale * residual.T @ X).reshape(-1), (scale * residual.sum(0))]).float()
    return model, (lambda: ((model(X) - Y) ** 2).mean()), grad


def test_compare_to_backprop_fo_stats_are_the_analytic_gradient():
    model, loss_fn, grad = linear_problem()
    report = compare_to_backprop(model, loss_fn, ZOEstimator(model, num_queries=1, seed=0), num_draws=4)
    assert report.num_entries == grad.numel() == 1020
    assert report.fo_mean == pytest.approx(grad.double().mean().item(), rel=1e-5, abs=1e-9)
    assert report.fo_var == pytest.approx(grad.double().var(correction=0).item(), rel=1e-5)


@pytest.mark.slow
def test_estimate_variance_falls_as_one_over_q():
    model, loss_fn, grad = linear_problem()
    sq_norm = grad.double().square().sum().item()
    variances = {}
    for q in (1, 4):
        report = compare_to_backprop(model, loss_fn, ZOEstimator(model, num_queries=q, seed=3), num_draws=500)
        variances[q] = report.estimate_var
        # SPSA with Gaussian z: per-entry variance (‖g‖² + g_i²)/q, averaged over n entries
        assert report.estimate_var == pytest.approx(sq_norm * (1 + 1 / grad.numel()) / q, rel=0.2)
        assert report.var_ratio > 50  # ZO entries spread far wider than FO's (paper Fig. 4)
    assert variances[4] / variances[1] == pytest.approx(0.25, rel=0.25)


def test_compare_to_backprop_restores_grads_rng_and_weights():
    model, loss_fn, _ = linear_problem()
    marker = torch.full_like(model.weight, 7.0)
    model.weight.grad = marker
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    compare_to_backprop(model, loss_fn, ZOEstimator(model, num_queries=2, seed=0), num_draws=3, sample_entries=10)
    assert model.weight.grad is marker and torch.equal(marker, torch.full_like(marker, 7.0))
    assert model.bias.grad is None
    assert torch.equal(torch.get_rng_state(), before)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n])


def test_frozen_parameters_are_left_out():
    model, loss_fn, grad = linear_problem()
    model.bias.requires_grad_(False)
    report = compare_to_backprop(model, loss_fn, ZOEstimator(model, seed=0), num_draws=2)
    assert report.num_entries == 1000
    assert report.fo_var == pytest.approx(grad[:1000].double().var(correction=0).item(), rel=1e-5)
    assert model.bias.grad is None


# -------------------------------------------------------------------------------------- the callback
def run(tmp_path, name, probe=None, max_steps=4):
    args = ZOConfig(output_dir=str(tmp_path / name), max_steps=max_steps, per_device_train_batch_size=4,
                    learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                    disable_tqdm=True, use_cpu=True, seed=0, zo_num_queries=2)
    # dropout makes the trajectory depend on the global RNG: a probe that disturbed it would show
    model = tiny_llama(attention_dropout=0.2)
    trainer = ZOTrainer(model=model, args=args, train_dataset=random_token_dataset(n=32))
    callback = None
    if probe is not None:
        callback = GradientProbeCallback(trainer, **probe)
        trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def test_probe_callback_logs_and_leaves_training_unchanged(tmp_path):
    plain, _ = run(tmp_path, "plain")
    probed, callback = run(tmp_path, "probed", probe=dict(every_steps=2, num_draws=2, save_histograms=True,
                                                            batch_size=2))
    for (n, a), (_, b) in zip(plain.model.named_parameters(), probed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert all(p.grad is None for p in probed.model.parameters())
    assert probed.model.training == plain.model.training
    probe_logs = [e for e in probed.state.log_history if "probe/cosine" in e]
    assert [e["step"] for e in probe_logs] == [0, 2, 4]
    for entry in probe_logs:
        assert PROBE_KEYS <= entry.keys()
        assert entry["probe/zo_var"] > entry["probe/fo_var"] > 0
        assert entry["probe/var_ratio"] == pytest.approx(entry["probe/zo_var"] / entry["probe/fo_var"])
        assert -1 <= entry["probe/cosine"] <= 1
        assert entry["probe/num_entries"] == sum(p.numel() for p in probed.model.parameters())
    # the logged training losses are identical too
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(plain) == losses(probed)

    folder = tmp_path / "probed" / "gradient_probe"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0.npz", "step-2.npz", "step-4.npz"]
    with np.load(folder / "step-2.npz") as npz:
        assert sorted(npz.files) == ["FO", "ZO q=2"]
        assert npz["ZO q=2"].size == 2 * npz["FO"].size  # two draws, same indices
        assert np.all(np.isfinite(npz["FO"])) and npz["FO"].std() > 0

    from zo_trainer.cli import main

    png = tmp_path / "density.png"
    assert main(["plot", "density", str(folder / "step-2.npz"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_callback_validates_its_arguments(tmp_path):
    trainer = ZOTrainer(model=tiny_llama(), args=ZOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                        train_dataset=random_token_dataset(n=4))
    with pytest.raises(ValueError, match="every_steps"):
        GradientProbeCallback(trainer, 0)
    with pytest.raises(ValueError, match="num_draws"):
        GradientProbeCallback(trainer, 10, num_draws=0)
