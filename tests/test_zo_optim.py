"""The ZO optimizers against independent references: torch's own optimizers fed a naive SPSA estimate that
materialises z, hand-written sign, truncated-momentum and HiZOO updates, and the exact line search on a quadratic."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.zo import ZOAdam, ZOEstimator, ZOHiZOO, ZOSGD, ZOSign, perturbation

from conftest import random_token_dataset, tiny_llama

EPS, STEPS, QUERIES = 1e-3, 5, 2


def float64_llama():
    return tiny_llama(vocab_size=64, hidden=16, layers=1, dtype=torch.float64, tie_word_embeddings=False)


def batch():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def float64_loss(logits, ids):
    """Next-token cross-entropy in float64: transformers' own loss rounds to float32, whose ~2e-7 / 2ε would swamp
    the comparisons with the naive reference."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def naive_coefficients(model, params, sampler, step, rule, moments):
    """c_k of g = Σ c_k z_k from losses at θ, θ ± εz_k, with every z_k materialised (mean over queries)."""
    def loss(values):
        return float64_loss(functional_call(model, values, args=(batch(),)).logits, batch()).item()

    zs = [{n: sampler.direction(n, p.shape, step, k).double() for n, p in params.items()} for k in range(QUERIES)]
    base, coefficients, perturbed = loss(params), [], []
    for z in zs:
        plus = loss({n: p + EPS * z[n] for n, p in params.items()})
        minus = loss({n: p - EPS * z[n] for n, p in params.items()})
        perturbed += [plus, minus]
        slope, curvature = (plus - minus) / (2 * EPS), (plus + minus - 2 * base) / EPS**2
        coefficients.append(slope if rule != "newton" else (max(-1e-2, min(1e-2, slope / curvature)) if curvature > 0 else 0.0))
    if rule == "spread":  # FZOO: (L+ − L−)/2 over σ, the sample standard deviation of the 2q perturbed losses
        mean = sum(perturbed) / len(perturbed)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / (len(perturbed) - 1))
        coefficients = [c * EPS / sigma for c in coefficients]
    if rule == "normalized":
        moments.append(sum(c * c for c in coefficients) / QUERIES)
        mean_square = sum(0.99 ** (len(moments) - 1 - i) * 0.01 * m for i, m in enumerate(moments))
        coefficients = [c / math.sqrt(mean_square / (1 - 0.99 ** len(moments))) for c in coefficients]
    return [c / QUERIES for c in coefficients], zs


def engine_run(make_optimizer, rule="gradient"):
    """The weights before each step and after the last, and the optimizer."""
    model = float64_llama()
    estimator = ZOEstimator(model, eps=EPS, num_queries=QUERIES, seed=0, curvature=rule == "newton")
    optimizer = make_optimizer(list(model.parameters()), estimator, step_rule=rule)
    trajectory = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for step in range(STEPS):
        optimizer.accumulate(estimator.probe(lambda: float64_loss(model(batch()).logits, batch()), step))
        optimizer.step()
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return trajectory, optimizer


def assert_follows_naive(trajectory, update, rule="gradient"):
    """Each step of the engine's trajectory against the naive step taken from the same weights: ``update(params,
    estimates)`` applies it given the naive estimates so far, newest last. Starting every naive step from the engine's
    weights keeps the comparison tight: ZO amplifies any difference in the weights into the next estimates (a
    projected gradient is a loss difference over 2ε), so two free-running trajectories drift apart within steps."""
    model = float64_llama()
    sampler = ZOEstimator(model, seed=0).sampler
    history, moments = [], []
    for step, (before, after) in enumerate(zip(trajectory, trajectory[1:])):
        params = {n: p.clone() for n, p in before.items()}
        coefficients, zs = naive_coefficients(model, params, sampler, step, rule, moments)
        history.append({n: sum(c * z[n] for c, z in zip(coefficients, zs)) for n in params})
        update(params, history)
        assert_close(after, params)
    assert not torch.equal(trajectory[-1]["model.norm.weight"], trajectory[0]["model.norm.weight"])  # it moved


def torch_optimizer_update(make):
    """Drive a torch optimizer with the naive estimate written into .grad."""
    state = {}

    def update(params, history):
        if not state:
            state["leaves"] = {n: nn.Parameter(p.clone()) for n, p in params.items()}
            state["optimizer"] = make(list(state["leaves"].values()))
        for n, leaf in state["leaves"].items():
            leaf.data.copy_(params[n])
            leaf.grad = history[-1][n].clone()
        state["optimizer"].step()
        params.update({n: leaf.detach().clone() for n, leaf in state["leaves"].items()})

    return update


def assert_close(engine, naive):
    """Equal to the rounding of the directions' arithmetic: the kernels form scale·z in float32, so a perturbation
    p ± εz is off by a relative ~6e-8 per entry and the engine's projected gradients by ~1e-7 of the naive ones. An
    update of ~1e-2 then differs by ~1e-8, momentum sums a few (tolerance 1e-6); a wrong formula moves by 1e-3 or more.
    (Adam's eps=1e-2 keeps its step smooth where g nearly cancels.)"""
    for name in naive:
        torch.testing.assert_close(engine[name], naive[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.1), (0.9, 0.0)])
def test_zo_sgd_equals_torch_sgd_on_the_naive_estimate(momentum, weight_decay):
    trajectory, _ = engine_run(lambda params, est, **rule: ZOSGD(params, est, lr=0.05, momentum=momentum,
                                                                  weight_decay=weight_decay, **rule))
    assert_follows_naive(trajectory, torch_optimizer_update(
        lambda leaves: torch.optim.SGD(leaves, lr=0.05, momentum=momentum, weight_decay=weight_decay)))


def test_zo_adam_equals_torch_adamw_on_the_naive_estimate():
    trajectory, optimizer = engine_run(lambda params, est, **rule: ZOAdam(params, est, lr=1e-2, betas=(0.8, 0.95),
                                                                           eps=1e-2, weight_decay=0.1, **rule))
    assert_follows_naive(trajectory, torch_optimizer_update(
        lambda leaves: torch.optim.AdamW(leaves, lr=1e-2, betas=(0.8, 0.95), eps=1e-2, weight_decay=0.1)))
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in optimizer.state.values())


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_zo_sign_moves_every_entry_by_lr_along_the_sign(momentum):
    def update(params, history):
        for n in params:
            m = sum((1 - momentum) * momentum ** (len(history) - 1 - i) * g[n] for i, g in enumerate(history)) \
                if momentum else history[-1][n]
            params[n] = params[n] - 1e-3 * torch.sign(m)

    trajectory, _ = engine_run(lambda params, est, **rule: ZOSign(params, est, lr=1e-3, momentum=momentum, **rule))
    assert_follows_naive(trajectory, update)


@pytest.mark.parametrize("history", [2, 8])
def test_momentum_rebuilt_from_seeds_is_the_truncated_momentum(history):
    """m = Σ_{j<K} β^j g_{t−j}: with K ≥ the steps taken, the momentum of a buffer (torch's SGD, above)."""
    def update(params, estimates):
        recent = estimates[-history:]
        for n in params:
            params[n] = params[n] - 0.05 * sum(0.9 ** (len(recent) - 1 - i) * g[n] for i, g in enumerate(recent))

    trajectory, optimizer = engine_run(lambda params, est, **rule: ZOSGD(params, est, lr=0.05, momentum=0.9,
                                                                          momentum_history=history, **rule))
    assert_follows_naive(trajectory, update)
    assert not optimizer.state  # no parameter-sized buffer


@pytest.mark.parametrize("rule, lr", [("newton", 0.5), ("normalized", 1e-3), ("spread", 1e-3)])
def test_step_rules_match_their_naive_formulas(rule, lr):
    def update(params, history):
        for n in params:
            params[n] = params[n] - lr * history[-1][n]

    trajectory, _ = engine_run(lambda params, est, **kwargs: ZOSGD(params, est, lr=lr, **kwargs), rule=rule)
    assert_follows_naive(trajectory, update, rule=rule)


class Quadratic(nn.Module):
    def __init__(self, sign=1.0, n=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("A", sign * (m @ m.T / n + torch.eye(n, dtype=torch.float64)))
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


def newton_step(model, max_step=1e6):
    estimator = ZOEstimator(model, eps=1e-3, num_queries=1, seed=5, curvature=True)
    optimizer = ZOSGD([model.theta], estimator, lr=1.0, step_rule="newton", newton_max_step=max_step)
    before = model.theta.detach().clone()
    optimizer.accumulate(estimator.probe(model, step=0))
    optimizer.step()
    return before, estimator.sampler.direction("theta", before.shape, 0, 0).double()


def test_newton_rule_takes_the_exact_line_search_step_on_a_quadratic():
    model = Quadratic()
    before, z = newton_step(model)
    gradient = model.A @ before + model.b
    exact = before - (z @ gradient) / (z @ model.A @ z) * z  # argmin over t of L(θ − t z)
    # the curvature (L+ + L− − 2·L0)/ε² of float64 losses carries a relative rounding of ~1e-8
    torch.testing.assert_close(model.theta.detach(), exact, rtol=1e-6, atol=1e-8)
    assert abs(z @ (model.A @ model.theta.detach() + model.b)) < 1e-6  # the directional derivative vanishes there


def test_newton_rule_is_safeguarded():
    concave = Quadratic(sign=-1.0)
    before, _ = newton_step(concave)
    assert torch.equal(concave.theta.detach(), before)  # no minimum along z: no move
    bounded = Quadratic()
    before, z = newton_step(bounded, max_step=1e-3)
    moved = (before - bounded.theta.detach()) / z
    torch.testing.assert_close(moved.abs(), torch.full_like(moved, 1e-3))  # the trust region caps |t|


def test_newton_rule_accumulates_micro_batches_like_one_batch():
    def run(micro_batches):
        model = float64_llama()
        estimator = ZOEstimator(model, eps=EPS, num_queries=QUERIES, seed=0, curvature=True)
        optimizer = ZOSGD(list(model.parameters()), estimator, lr=0.5, step_rule="newton")
        for part in batch().chunk(micro_batches):
            # step 2: both directions have a positive curvature at this initialisation (often not so)
            optimizer.accumulate(estimator.probe(lambda: float64_loss(model(part).logits, part), 2), 1 / micro_batches)
        optimizer.step()
        return {n: p.detach() for n, p in model.named_parameters()}

    whole, halves = run(1), run(2)
    assert not torch.equal(whole["model.norm.weight"], float64_llama().model.norm.weight)
    for name in whole:  # both sequences have the same length: the batch loss is the mean of the halves'
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-9, atol=1e-11)


HESSIAN_SMOOTH = 0.5  # large, so that a wrong refresh of the scale moves the next steps visibly


def test_hizoo_follows_its_naive_reference():
    """HiZOO's Algorithm 1 with every z materialised: the probes at p ± ε s⊙z and at p, the scale refreshed by the
    curvatures, s' = s / sqrt((1 − α) + α·mean_k D_k z_k²), then p − lr·Σ_k (slope_k / q)·s'⊙z_k."""
    lr, model = 1e-2, float64_llama()
    estimator = ZOEstimator(model, eps=EPS, num_queries=QUERIES, seed=0, curvature=True)
    optimizer = ZOHiZOO(list(model.parameters()), estimator, lr=lr, hessian_smooth=HESSIAN_SMOOTH)
    naive_model = float64_llama()
    sampler = ZOEstimator(naive_model, seed=0).sampler
    scale = {n: torch.ones_like(p, dtype=torch.float32) for n, p in model.named_parameters()}

    def loss(values):
        return float64_loss(functional_call(naive_model, values, args=(batch(),)).logits, batch()).item()

    for step in range(STEPS):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        zs = [{n: sampler.direction(n, p.shape, step, k).double() for n, p in params.items()} for k in range(QUERIES)]
        base, slopes, square_terms = loss(params), [], {n: torch.zeros_like(p) for n, p in params.items()}
        for z in zs:
            plus = loss({n: p + EPS * scale[n].double() * z[n] for n, p in params.items()})
            minus = loss({n: p - EPS * scale[n].double() * z[n] for n, p in params.items()})
            slopes.append((plus - minus) / (2 * EPS))
            for n in params:
                square_terms[n] += abs(plus + minus - 2 * base) / (2 * EPS**2) / QUERIES * z[n] ** 2
        scale = {n: (s / torch.sqrt((1 - HESSIAN_SMOOTH) + HESSIAN_SMOOTH * square_terms[n])).float()
                 for n, s in scale.items()}
        expected = {n: p - lr * sum(c / QUERIES * scale[n] * z[n] for c, z in zip(slopes, zs)) for n, p in params.items()}
        optimizer.accumulate(estimator.probe(lambda: float64_loss(model(batch()).logits, batch()), step))
        optimizer.step()
        assert_close({n: p.detach() for n, p in model.named_parameters()}, expected)
        for n, p in model.named_parameters():  # the engine's buffer is the naive scale; the curvatures of float64
            # losses carry ~1e-9 of absolute noise (transformers' RMSNorm computes in float32), ~1e-4 of theirs
            torch.testing.assert_close(optimizer.state[p]["scale"], scale[n], rtol=2e-3, atol=1e-5)
    assert min(s.min().item() for s in scale.values()) < 0.5  # the preconditioner did scale the directions


@pytest.mark.parametrize("layout", ["whole", "grouped", "pieces"])
def test_preconditioned_probes_perturb_along_the_scaled_direction(layout, monkeypatch):
    """The probes of an estimator with a direction scale m see p ± ε·m⊙z in every layout of the perturbed copies,
    the one that would look up an embedding's rows and multiply an LM head in blocks included (drawn whole instead)."""
    if layout != "whole":
        monkeypatch.setattr(perturbation, "GROUP_BYTES", 0)
    if layout == "pieces":
        monkeypatch.setattr(perturbation, "LARGE_WEIGHT_BYTES", 0)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    scale = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) + 0.5
             for i, (n, p) in enumerate(model.named_parameters())}
    by_id = {id(p): scale[n] for n, p in model.named_parameters()}
    estimator = ZOEstimator(model, eps=1e-2, num_queries=2, seed=5)
    estimator.direction_scale = lambda p: by_id[id(p)]
    losses = estimator.probe(lambda: model(input_ids=ids, labels=ids).loss, 3).losses
    sampler = estimator.sampler
    naive = []
    with torch.no_grad():
        for k in range(2):
            for sign in (1, -1):
                params = {n: p + sign * 1e-2 * scale[n] * sampler.direction(n, p.shape, 3, k)
                          for n, p in model.named_parameters()}
                naive.append(functional_call(model, params, (), {"input_ids": ids, "labels": ids}).loss.double())
    torch.testing.assert_close(losses, torch.stack(naive), rtol=0, atol=2e-6)
    estimator.direction_scale = None
    unscaled = estimator.probe(lambda: model(input_ids=ids, labels=ids).loss, 3).losses
    assert (unscaled - losses).abs().min() > 1e-4  # the scale changed every probe


def test_bfloat16_momentum_buffer():
    model = float64_llama().float()
    estimator = ZOEstimator(model, num_queries=1, seed=0)
    optimizer = ZOSGD(list(model.parameters()), estimator, lr=1e-2, momentum=0.9, state_dtype=torch.bfloat16)
    optimizer.accumulate(estimator.probe(lambda: model(batch(), labels=batch()).loss, 0))
    optimizer.step()
    buffers = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert len(buffers) == len(list(model.parameters())) and {b.dtype for b in buffers} == {torch.bfloat16}


OPTIMIZER_SETTINGS = {
    "momentum": dict(zo_momentum=0.9),
    "history": dict(zo_momentum=0.9, zo_momentum_history=3),
    "adam": dict(zo_optimizer="adam", learning_rate=1e-3),
    "signum": dict(zo_optimizer="sign", zo_momentum=0.5, learning_rate=1e-4),
    "newton": dict(zo_step_rule="newton", learning_rate=0.5),
    "normalized": dict(zo_step_rule="normalized", learning_rate=1e-3),
    "spread": dict(zo_step_rule="spread", learning_rate=1e-3),
    "hizoo": dict(zo_optimizer="hizoo", learning_rate=1e-2),
    "bfloat16-momentum": dict(zo_momentum=0.9, zo_state_dtype="bfloat16"),  # torch's loading casts buffers to float32
}


@pytest.mark.parametrize("name", list(OPTIMIZER_SETTINGS))
def test_every_zo_optimizer_resumes_bitwise_through_the_trainer(tmp_path, name):
    def args(out, **extra):
        return ZOConfig(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, report_to="none",
                        disable_tqdm=True, use_cpu=True, seed=0, logging_steps=3, zo_num_queries=2,
                        **{"learning_rate": 1e-2, **OPTIMIZER_SETTINGS[name], **extra})

    straight = ZOTrainer(model=tiny_llama(), args=args(tmp_path / "straight", save_strategy="no"),
                         train_dataset=random_token_dataset())
    straight.train()
    halfway = args(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    ZOTrainer(model=tiny_llama(), args=halfway, train_dataset=random_token_dataset()).train()
    resumed = ZOTrainer(model=tiny_llama(seed=123), args=halfway, train_dataset=random_token_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    initial = dict(tiny_llama().named_parameters())
    for n, p in straight.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[n]), n
    assert not torch.equal(straight.model.model.norm.weight, initial["model.norm.weight"])  # it trained


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(zo_optimizer="lion"), "zo_optimizer='lion'"),
        (dict(zo_step_rule="line"), "zo_step_rule='line'"),
        (dict(zo_momentum=1.0), "zo_momentum=1.0"),
        (dict(zo_momentum_history=4), "zo_momentum_history=4"),
        (dict(zo_optimizer="adam", zo_momentum=0.9), "adam_beta1"),
        (dict(zo_step_rule="newton", zo_estimator="forward"), "zo_estimator='central'"),
        (dict(zo_step_rule="spread"), "zo_step_rule='spread' needs zo_num_queries >= 2"),
        (dict(zo_optimizer="hizoo", zo_estimator="forward"), "zo_optimizer='hizoo' needs zo_estimator='central'"),
        (dict(zo_optimizer="hizoo", zo_hessian_smooth=1.0), r"zo_hessian_smooth=1.0 must lie in \[0, 1\)"),
        (dict(zo_optimizer="hizoo", zo_momentum=0.9), "zo_momentum=0.9 is for zo_optimizer 'sgd' and 'sign'"),
        (dict(zo_write_grad=True, zo_optimizer="adam"), "zo_write_grad=True"),
        (dict(zo_state_dtype="int8"), "zo_state_dtype='int8'"),
        (dict(learning_rate=math.inf), "learning_rate=inf"),
        (dict(learning_rate=math.nan), "learning_rate=nan"),
        (dict(learning_rate=-1e-3), "learning_rate=-0.001"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    ],
)
def test_bad_optimizer_settings_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        ZOConfig(output_dir=str(tmp_path), report_to="none", **overrides)


@pytest.mark.parametrize(
    "cls, settings, match",
    [
        (ZOSGD, dict(lr=-1.0), "lr=-1.0 must be a finite number >= 0"),
        (ZOSGD, dict(step_rule="line"), "step_rule='line' is not supported"),
        (ZOSGD, dict(newton_max_step=0.0), "newton_max_step=0.0 must be a finite number > 0"),
        (ZOSGD, dict(momentum=1.5), r"momentum=1.5 must lie in \[0, 1\)"),
        (ZOSGD, dict(momentum_history=-1), "momentum_history=-1 must be an integer >= 0"),
        (ZOSGD, dict(momentum_history=3), r"momentum_history=3 .* needs a momentum in \(0, 1\), got momentum=0.0"),
        (ZOSign, dict(momentum=-0.1), r"momentum=-0.1 must lie in \[0, 1\)"),
        (ZOAdam, dict(betas=(0.9, 1.0)), r"betas\[1\]=1.0 must lie in \[0, 1\)"),
        (ZOAdam, dict(eps=0.0), "eps=0.0 must be a finite number > 0"),
        (ZOHiZOO, dict(hessian_smooth=-0.1), r"hessian_smooth=-0.1 must lie in \[0, 1\)"),
    ],
)
def test_optimizer_settings_are_checked_without_a_model_and_by_the_constructor(cls, settings, match):
    with pytest.raises(ValueError, match=match):
        cls.check_settings(**settings)
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        cls(model.parameters(), ZOEstimator(model, curvature=True), **settings)


def test_hizoo_needs_the_unperturbed_loss():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"ZOEstimator\(curvature=True\)"):
        ZOHiZOO(model.parameters(), ZOEstimator(model))
