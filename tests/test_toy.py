"""The paper's §2 theory against brute-force references: line search, eigenvalues, analytic
gradients, and full-batch equivalences."""
import numpy as np
import pytest

from zo_trainer.toy import (Quadratic, StochasticQuadratic, figure2, figure3_left, line_search_lr,
                            lr_bounds, optimal_lr, run_gd, run_sgd, run_zo_sgd, spsa_gradient)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_spd(rng, n):
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return Q @ np.diag(rng.uniform(0.1, 10.0, n)) @ Q.T


# --- Theorem 1 -------------------------------------------------------------------------------

def test_theorem1_matches_line_search_on_random_diagonal_quadratics():
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(1, 30))
        h, g = rng.uniform(0.01, 100.0, n), rng.normal(size=n) * 10 ** rng.uniform(-3, 3)
        assert optimal_lr(g, h) == pytest.approx(line_search_lr(g, np.diag(h)), rel=1e-4)


def test_lemma1_constant_diagonal_gives_one_over_lambda_and_one_step_convergence():
    problem = Quadratic(3.0 * np.eye(4), np.arange(4.0))
    theta0 = np.array([5.0, -1.0, 2.0, 7.0])
    eta = optimal_lr(problem.grad(theta0), np.full(4, 3.0))
    assert eta == pytest.approx(1 / 3)
    assert run_gd(problem, theta0, eta, 1).losses[-1] == pytest.approx(0.0, abs=1e-20)


def test_diagonal_formula_breaks_for_non_diagonal_hessian():
    # Theorem 1's Σg²/Σh_ii g² assumes H diagonal: on diag(H) of a coupled H it misses the true
    # line-search optimum, whereas the proof's general gᵀg/gᵀHg still hits it.
    rng = np.random.default_rng(1)
    misses = 0
    for _ in range(20):
        H, g = random_spd(rng, 6), rng.normal(size=6)
        searched = line_search_lr(g, H)
        assert (g @ g) / (g @ H @ g) == pytest.approx(searched, rel=1e-4)
        misses += abs(optimal_lr(g, np.diag(H)) - searched) > 1e-2 * searched
    assert misses >= 18
    H, g = np.array([[1.0, 0.9], [0.9, 1.0]]), np.ones(2)
    assert optimal_lr(g, np.diag(H)) == pytest.approx(1.0)
    assert line_search_lr(g, H) == pytest.approx(2 / 3.8, rel=1e-6)


@pytest.mark.parametrize("h_diag, match", [
    ([1.0, 0.0], "h_ii > 0"), ([2.0, -1.0], "h_ii > 0"),
    (np.eye(2), "must be 1-D"), ([1.0, 2.0, 3.0], "shape"),
])
def test_optimal_lr_rejects_what_theorem1_excludes(h_diag, match):
    with pytest.raises(ValueError, match=match):
        optimal_lr([1.0, 1.0], h_diag)


def test_zero_gradient_is_rejected():
    with pytest.raises(ValueError, match="g is zero"):
        optimal_lr([0.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="g is zero"):
        line_search_lr([0.0, 0.0], np.eye(2))


# --- Theorem 2 -------------------------------------------------------------------------------

def test_theorem2_bounds_hold_on_random_positive_definite_quadratics():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(1, 20))
        h, g = rng.uniform(0.01, 100.0, n), rng.normal(size=n)
        lo, hi = lr_bounds(h)
        assert (lo, hi) == pytest.approx((1 / h.max(), 1 / h.min()))
        assert lo * (1 - 1e-6) <= line_search_lr(g, np.diag(h)) <= hi * (1 + 1e-6)
        H = random_spd(rng, n)  # Theorem 2 only assumes positive definite, not diagonal
        eig = np.linalg.eigvalsh(H)
        assert lr_bounds(H) == pytest.approx((1 / eig.max(), 1 / eig.min()))
        assert lr_bounds(H)[0] * (1 - 1e-6) <= line_search_lr(g, H) <= lr_bounds(H)[1] * (1 + 1e-6)


def test_theorem2_bounds_are_attained_at_extreme_eigenvectors():
    h = np.array([0.5, 2.0, 8.0])
    assert line_search_lr([0.0, 0.0, 1.0], np.diag(h)) == pytest.approx(lr_bounds(h)[0], rel=1e-6)
    assert line_search_lr([1.0, 0.0, 0.0], np.diag(h)) == pytest.approx(lr_bounds(h)[1], rel=1e-6)


def test_indefinite_hessian_breaks_theorem2_and_is_rejected():
    h = np.array([1.0, -0.5])
    # Along g = (1, 1) the quadratic is still convex (gᵀHg = 0.5 > 0), so a line-search optimum
    # exists: η = 2/0.5 = 4. It violates η* ≤ 1/λmin = -2, the bound positive definiteness buys.
    g = np.ones(2)
    eta = line_search_lr(g, np.diag(h))
    assert eta == pytest.approx(4.0, rel=1e-6)
    assert not eta <= 1 / h.min()
    # Along the negative-curvature direction there is no optimum at all; the closed form would
    # return a negative "step size" (gᵀg/gᵀHg = -2).
    with pytest.raises(ValueError, match="without bound"):
        line_search_lr([0.0, 1.0], np.diag(h))
    with pytest.raises(ValueError, match="positive definite Hessian; smallest eigenvalue is -0.5"):
        lr_bounds(h)
    with pytest.raises(ValueError, match="positive definite Hessian; smallest eigenvalue is -1"):
        lr_bounds(np.array([[0.0, 1.0], [1.0, 0.0]]))  # indefinite with a positive diagonal
    with pytest.raises(ValueError, match="h_ii > 0"):
        optimal_lr(g, h)


# --- Problems and solvers --------------------------------------------------------------------

def test_stochastic_quadratic_is_the_mean_of_its_per_sample_losses():
    rng = np.random.default_rng(3)
    problem = StochasticQuadratic(random_spd(rng, 5), rng.normal(size=(40, 5)))
    for _ in range(5):
        theta = rng.normal(size=5)
        d = theta - problem.centers.mean(axis=0)
        all_idx = np.arange(40)
        assert problem.batch_loss(theta, all_idx) == pytest.approx(0.5 * d @ problem.H @ d)
        assert problem.loss(theta) == pytest.approx(0.5 * d @ problem.H @ d)
        per_sample = [problem.batch_loss(theta, [i]) for i in all_idx]
        assert np.mean(per_sample) == pytest.approx(problem.loss(theta))
        assert problem.batch_grad(theta, all_idx) == pytest.approx(problem.H @ d)
        assert np.var(per_sample) > 1e-3  # samples really differ: SGD noise is real


def test_gd_with_optimal_lr_beats_half_of_it():
    # η* is greedy: from every iterate it beats 0.5·η* and 1.5·η* (checked by evaluating the
    # loss, not the formula). Over 15 steps greedy steps can zigzag, so η* wins typically (by
    # orders of magnitude), not always: ~2% of random problems with h_ii in [1, 4] go to 0.5·η*.
    rng = np.random.default_rng(4)
    ratios = []
    for _ in range(10):
        h = rng.uniform(1.0, 4.0, 8)
        problem = Quadratic(np.diag(h), rng.normal(size=8))
        theta0 = problem.theta_star + rng.normal(size=8)
        best = run_gd(problem, theta0, lambda g: optimal_lr(g, h), 15)
        half = run_gd(problem, theta0, lambda g: 0.5 * optimal_lr(g, h), 15)
        for theta, loss in zip(best.thetas[:-1], best.losses[1:]):
            g = problem.grad(theta)
            for scale in (0.5, 1.5):
                assert loss <= problem.loss(theta - scale * optimal_lr(g, h) * g)
        assert np.all(np.diff(best.losses) <= 0)
        ratios.append(best.losses[-1] / half.losses[-1])
    assert np.sum(np.array(ratios) < 1) >= 9 and np.median(ratios) < 0.05


def test_full_batch_sgd_is_gd_and_mini_batch_sgd_is_noisy():
    rng = np.random.default_rng(5)
    problem = StochasticQuadratic(np.diag([1.0, 2.0, 3.0]), rng.normal(size=(30, 3)))
    theta0 = np.array([3.0, -2.0, 1.0])
    gd = run_gd(problem, theta0, 0.1, 20)
    np.testing.assert_allclose(run_sgd(problem, theta0, 0.1, 20, batch_size=30).thetas, gd.thetas)
    sgd = run_sgd(problem, theta0, 0.1, 20, batch_size=3, seed=1)
    assert not np.allclose(sgd.thetas, gd.thetas)
    assert sgd.losses[-1] < 0.2 * sgd.losses[0]
    np.testing.assert_array_equal(sgd.thetas, run_sgd(problem, theta0, 0.1, 20, 3, seed=1).thetas)


def test_spsa_is_unbiased_and_its_variance_falls_as_one_over_q():
    rng = np.random.default_rng(6)
    problem = Quadratic(random_spd(rng, 5), rng.normal(size=5))
    theta = rng.normal(size=5)
    g = problem.grad(theta)
    draws = np.array([spsa_gradient(problem.loss, theta, rng=rng) for _ in range(20000)])
    # For z ~ N(0, I), Var[(z zᵀ g)_j] = |g|² + g_j²: the analytic standard error of the mean.
    stderr = np.sqrt((g @ g + g ** 2) / len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - g) < 5 * stderr)
    np.testing.assert_allclose(draws.var(axis=0), g @ g + g ** 2, rtol=0.1)
    draws_q10 = np.array([spsa_gradient(problem.loss, theta, q=10, rng=rng) for _ in range(2000)])
    np.testing.assert_allclose(draws_q10.var(axis=0), (g @ g + g ** 2) / 10, rtol=0.15)


def test_zo_sgd_converges_and_is_seeded():
    rng = np.random.default_rng(7)
    problem = StochasticQuadratic(np.diag([1.0, 2.0]), rng.normal(0, 0.1, size=(20, 2)))
    theta0 = np.array([2.0, -2.0])
    for batch_size in (None, 4):
        a = run_zo_sgd(problem, theta0, 0.05, 300, batch_size=batch_size, q=4, seed=3)
        b = run_zo_sgd(problem, theta0, 0.05, 300, batch_size=batch_size, q=4, seed=3)
        np.testing.assert_array_equal(a.thetas, b.thetas)
        assert a.thetas.shape == (301, 2) and a.losses.shape == (301,)
        assert a.losses[-1] < 0.01 * a.losses[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), r"batch_size must be in \[1, 20\], got 0"),
    (dict(batch_size=21), r"got 21"),
    (dict(q=0), "q=0"), (dict(eps=-1.0), "eps=-1.0"),
])
def test_zo_sgd_rejects_bad_arguments(kwargs, match):
    problem = StochasticQuadratic(np.eye(2), np.zeros((20, 2)))
    with pytest.raises(ValueError, match=match):
        run_zo_sgd(problem, np.ones(2), 0.1, 2, **kwargs)


def test_sgd_needs_a_stochastic_problem():
    with pytest.raises(TypeError, match="StochasticQuadratic, got Quadratic"):
        run_sgd(Quadratic(np.eye(2), np.zeros(2)), np.ones(2), 0.1, 2, batch_size=1)


# --- Figures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [figure2, figure3_left])
def test_figures_write_pngs(make, tmp_path):
    out = make(tmp_path / "fig.png")
    assert out == tmp_path / "fig.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
