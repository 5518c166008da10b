"""The paper's §2 theory, runnable: optimal learning rate on a quadratic (Theorems 1-2) and the
toy GD / FO-SGD / ZO-SGD comparisons behind Figures 2 and 3 (left).

Pure numpy, so the theory can be checked without torch, a model or a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

LearningRate = float | Callable[[np.ndarray], float]


# --- Theorems 1 and 2 -------------------------------------------------------------------------

def optimal_lr(g, h_diag) -> float:
    """Theorem 1: the step size minimising a quadratic along -g, η* = Σg_i² / Σh_ii g_i².

    Only valid for a diagonal Hessian with h_ii > 0 (the theorem's assumption), so anything
    else is rejected rather than silently giving a meaningless (e.g. negative) step.
    """
    g, h = np.asarray(g, dtype=float), np.asarray(h_diag, dtype=float)
    if h.ndim != 1:
        raise ValueError(f"h_diag must be 1-D (the diagonal of a diagonal Hessian, as Theorem 1 "
                         f"assumes), got shape {h.shape}")
    if g.shape != h.shape:
        raise ValueError(f"g has shape {g.shape} but h_diag has shape {h.shape}; they must match")
    if not np.all(h > 0):
        raise ValueError(f"Theorem 1 needs every h_ii > 0; got min(h_diag) = {h.min():g}")
    gg = float(g @ g)
    if gg == 0.0:
        raise ValueError("g is zero: every step size is optimal, η* is undefined")
    return gg / float(h @ (g * g))


def lr_bounds(h) -> tuple[float, float]:
    """Theorem 2: 1/λmax ≤ η* ≤ 1/λmin for a positive definite Hessian.

    `h` is a Hessian diagonal (1-D) or a full symmetric matrix (2-D); the theorem does not need H
    diagonal, only positive definite, which is checked.
    """
    h = np.asarray(h, dtype=float)
    if h.ndim == 1:
        eig = h
    elif h.ndim == 2 and h.shape[0] == h.shape[1] and np.allclose(h, h.T):
        eig = np.linalg.eigvalsh(h)
    else:
        raise ValueError(f"h must be a 1-D diagonal or a square symmetric matrix, "
                         f"got shape {h.shape}")
    if eig.min() <= 0:
        raise ValueError(f"Theorem 2 needs a positive definite Hessian; smallest eigenvalue is "
                         f"{eig.min():g}")
    return 1.0 / float(eig.max()), 1.0 / float(eig.min())


def line_search_lr(g, H, tol: float = 1e-12, max_lr: float = 1e15) -> float:
    """Brute-force reference for Theorem 1: golden-section search of φ(η) = L(-ηg) for the
    quadratic L(θ) = ½θᵀHθ + gᵀθ (gradient g at θ = 0), H any symmetric matrix.

    Uses only loss evaluations, never the closed form. Raises if L is unbounded below along -g
    (gᵀHg ≤ 0), which is exactly what a non positive definite H allows.
    """
    g, H = np.asarray(g, dtype=float), np.asarray(H, dtype=float)
    if H.shape != (g.size, g.size):
        raise ValueError(f"H must have shape {(g.size, g.size)} to match g, got {H.shape}")
    if not np.any(g):
        raise ValueError("g is zero: every step size is optimal, η* is undefined")

    def phi(eta):
        theta = -eta * g
        return 0.5 * theta @ H @ theta + g @ theta

    hi = 1e-12  # grow until φ stops decreasing: then the minimiser lies in [0, 2·hi]
    while phi(2 * hi) <= phi(hi):
        hi *= 2
        if hi > max_lr:
            raise ValueError(f"the quadratic decreases without bound along -g (no minimiser below "
                             f"η = {max_lr:g}): H is not positive definite along g")
    a, b = 0.0, 2 * hi
    r = (np.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = phi(c), phi(d)
    while b - a > tol * hi:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = phi(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = phi(d)
    return (a + b) / 2


# --- Quadratic problems -----------------------------------------------------------------------

@dataclass
class Quadratic:
    """f(θ) = ½ (θ−θ*)ᵀ H (θ−θ*): the local model of a loss near a minimum (paper eq. 2)."""
    H: np.ndarray
    theta_star: np.ndarray

    def __post_init__(self):
        self.H = np.asarray(self.H, dtype=float)
        self.theta_star = np.asarray(self.theta_star, dtype=float)
        n = self.theta_star.size
        if self.theta_star.shape != (n,) or self.H.shape != (n, n):
            raise ValueError(f"H must be (n, n) and theta_star (n,); got {self.H.shape} and "
                             f"{self.theta_star.shape}")

    def loss(self, theta) -> float:
        d = np.asarray(theta, dtype=float) - self.theta_star
        return 0.5 * float(d @ self.H @ d)

    def grad(self, theta) -> np.ndarray:
        return self.H @ (np.asarray(theta, dtype=float) - self.theta_star)


class StochasticQuadratic(Quadratic):
    """The same f written as a mean of m per-sample quadratics sharing H (paper eq. 1):

        f_i(θ) = ½ (θ−c_i)ᵀ H (θ−c_i) − ½ (c_i−θ*)ᵀ H (c_i−θ*),   θ* = mean_i c_i,

    so mean_i f_i = f exactly, while a mini-batch gradient H(θ − mean_B c_i) carries real SGD
    noise that does not vanish at θ*.
    """

    def __init__(self, H, centers):
        centers = np.asarray(centers, dtype=float)
        if centers.ndim != 2 or len(centers) == 0:
            raise ValueError(f"centers must be a non-empty (m, n) array, got shape {centers.shape}")
        super().__init__(H, centers.mean(axis=0))
        self.centers = centers

    @property
    def n_samples(self) -> int:
        return len(self.centers)

    def batch_loss(self, theta, idx) -> float:
        c = self.centers[idx]
        d, e = np.asarray(theta, dtype=float) - c, c - self.theta_star
        return 0.5 * float(np.mean(np.einsum("bi,ij,bj->b", d, self.H, d)
                                   - np.einsum("bi,ij,bj->b", e, self.H, e)))

    def batch_grad(self, theta, idx) -> np.ndarray:
        return self.H @ (np.asarray(theta, dtype=float) - self.centers[idx].mean(axis=0))


# --- Solvers ----------------------------------------------------------------------------------

@dataclass
class Trajectory:
    thetas: np.ndarray  # (steps + 1, n), iterate 0 is the start
    losses: np.ndarray  # (steps + 1,), full loss f at each iterate


def spsa_gradient(loss_fn: Callable[[np.ndarray], float], theta, eps: float = 1e-4, q: int = 1,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Two-sided Gaussian SPSA (ZO-SGD, paper §2.3), averaged over q queries: 2q loss calls.

    Unbiased for the gradient of a quadratic for any ε (the central difference is exact there).
    """
    if q < 1 or eps <= 0:
        raise ValueError(f"need q >= 1 and eps > 0, got q={q}, eps={eps}")
    rng = rng or np.random.default_rng()
    theta = np.asarray(theta, dtype=float)
    g = np.zeros_like(theta)
    for _ in range(q):
        z = rng.standard_normal(theta.shape)
        g += (loss_fn(theta + eps * z) - loss_fn(theta - eps * z)) / (2 * eps) * z
    return g / q


def _descend(problem: Quadratic, theta0, lr: LearningRate, steps: int,
             grad_fn: Callable[[np.ndarray], np.ndarray]) -> Trajectory:
    """θ ← θ − η g for `steps` steps; η a constant or a function of the step's gradient
    (e.g. Theorem 1's η* per step)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    thetas = [np.asarray(theta0, dtype=float)]
    for _ in range(steps):
        g = grad_fn(thetas[-1])
        eta = lr(g) if callable(lr) else lr
        thetas.append(thetas[-1] - eta * g)
    thetas = np.array(thetas)
    return Trajectory(thetas, np.array([problem.loss(t) for t in thetas]))


def _batch_sampler(problem: StochasticQuadratic, batch_size: int, rng: np.random.Generator):
    if not isinstance(problem, StochasticQuadratic):
        raise TypeError(f"mini-batches need a StochasticQuadratic, got {type(problem).__name__}")
    if not 1 <= batch_size <= problem.n_samples:
        raise ValueError(f"batch_size must be in [1, {problem.n_samples}], got {batch_size}")
    return lambda: rng.choice(problem.n_samples, size=batch_size, replace=False)


def run_gd(problem: Quadratic, theta0, lr: LearningRate, steps: int) -> Trajectory:
    """Full-batch gradient descent."""
    return _descend(problem, theta0, lr, steps, problem.grad)


def run_sgd(problem: StochasticQuadratic, theta0, lr: LearningRate, steps: int,
            batch_size: int, seed: int = 0) -> Trajectory:
    """FO-SGD: each step uses the exact gradient of a random mini-batch (without replacement)."""
    batch = _batch_sampler(problem, batch_size, np.random.default_rng(seed))
    return _descend(problem, theta0, lr, steps, lambda t: problem.batch_grad(t, batch()))


def run_zo_sgd(problem: Quadratic, theta0, lr: LearningRate, steps: int,
               batch_size: int | None = None, eps: float = 1e-4, q: int = 1,
               seed: int = 0) -> Trajectory:
    """ZO-SGD: SPSA estimate of the mini-batch loss's gradient (full loss if batch_size is None);
    both probes of a step see the same batch, as in MeZO."""
    rng = np.random.default_rng(seed)
    if batch_size is None:
        grad_fn = lambda t: spsa_gradient(problem.loss, t, eps, q, rng)  # noqa: E731
    else:
        batch = _batch_sampler(problem, batch_size, rng)

        def grad_fn(t):
            idx = batch()
            return spsa_gradient(lambda x: problem.batch_loss(x, idx), t, eps, q, rng)
    return _descend(problem, theta0, lr, steps, grad_fn)


# --- Figures ----------------------------------------------------------------------------------

def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    return fig, fig.add_subplot()


def figure2(path, steps: int = 100, seed: int = 0) -> Path:
    """Paper Figure 2: SGD on a stochastic diagonal quadratic with several constant learning rates
    and, solid black, Theorem 1's optimal rate recomputed from each step's mini-batch gradient."""
    rng = np.random.default_rng(seed)
    n, m = 20, 200
    h = np.linspace(0.5, 5.0, n)
    problem = StochasticQuadratic(np.diag(h), rng.normal(0.0, 0.3, (m, n)))
    theta0 = problem.theta_star + rng.normal(0.0, 3.0, n)
    lo, hi = lr_bounds(h)
    fig, ax = _figure()
    for eta in (0.05 * lo, 0.25 * lo, lo, 1.9 * lo):
        traj = run_sgd(problem, theta0, eta, steps, batch_size=10, seed=seed)
        ax.plot(traj.losses, lw=1, label=f"η = {eta:.3g}")
    traj = run_sgd(problem, theta0, lambda g: optimal_lr(g, h), steps, batch_size=10, seed=seed)
    ax.plot(traj.losses, color="black", lw=2, label="η* (Theorem 1, per step)")
    ax.set(yscale="log", xlabel="iteration", ylabel="loss f(θ) − f(θ*)",
           title=f"SGD on a {n}-D quadratic (batch 10 of {m}); η* ∈ [{lo:.2g}, {hi:.2g}]")
    ax.legend()
    fig.savefig(path, dpi=120)
    return Path(path)


def figure3_left(path, steps: int = 40, seed: int = 0) -> Path:
    """Paper Figure 3 (left): GD (red), FO-SGD (green) and ZO-SGD (blue) on a 2-D quadratic,
    over its contour lines, towards the optimum (pink)."""
    rng = np.random.default_rng(seed)
    H = np.array([[3.0, 1.0], [1.0, 1.5]])
    problem = StochasticQuadratic(H, rng.normal(0.0, 0.5, (50, 2)))
    theta0, lr = problem.theta_star + np.array([-2.5, 2.5]), 0.15
    runs = {"GD": (run_gd(problem, theta0, lr, steps), "red"),
            "FO-SGD": (run_sgd(problem, theta0, lr, steps, 5, seed=seed), "green"),
            "ZO-SGD (q=1)": (run_zo_sgd(problem, theta0, lr, steps, 5, seed=seed), "blue")}
    fig, ax = _figure()
    span = np.abs(theta0 - problem.theta_star).max() * 1.3
    xs = problem.theta_star[0] + np.linspace(-span, span, 200)
    ys = problem.theta_star[1] + np.linspace(-span, span, 200)
    X, Y = np.meshgrid(xs, ys)
    D = np.stack([X, Y], axis=-1) - problem.theta_star
    Z = 0.5 * np.einsum("...i,ij,...j->...", D, H, D)
    ax.contour(X, Y, Z, levels=12, colors="0.7", linewidths=0.8)
    for name, (traj, color) in runs.items():
        ax.plot(*traj.thetas.T, "-o", color=color, ms=2.5, lw=1.2, label=name)
    ax.plot(*problem.theta_star, "o", color="hotpink", ms=12, label="optimum θ*")
    ax.set(xlabel="θ₁", ylabel="θ₂", aspect="equal",
           title=f"GD vs FO-SGD vs ZO-SGD, η = {lr}, {steps} steps")
    ax.legend()
    fig.savefig(path, dpi=120)
    return Path(path)
