"""The CUDA path against the same independent references as the CPU tests.

CI has no GPU, so this module is skipped there (and says so in the summary); run it on a GPU machine with
`python -m pytest tests/test_cuda.py`. On CUDA the directions are drawn by `philox_triton`'s kernel (or, without
Triton, by the torch code of `philox`) and must equal the CPU's C kernel bit for bit; the Trainer places the model
on the GPU, and fp16 is accelerate's real autocast + GradScaler.
"""

import itertools
import math

import pytest
import torch

from zo_trainer import ZOTrainer
from zo_trainer.zo import ZOSGD, Addition, DirectionSampler, ZOEstimator, kernels

from conftest import random_token_dataset, tiny_llama
from test_zo_engine import Quadratic, assert_probe_and_update_match_naive_spsa, zo_estimate
from test_zo_trainer import assert_same, config, params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def cuda_direction(sampler, name, numel, step, query):
    z = torch.zeros(numel, device=CUDA)
    sampler.add_to(step, [Addition(name, torch.Size([numel]), {query: 1.0}, z, z)])
    return z


def test_cuda_directions_have_unit_variance_and_the_requested_correlation():
    n, alpha = 3_000_000, -0.6
    sampler = DirectionSampler("gaussian", correlation=alpha, seed=4)
    z0, z1 = (cuda_direction(sampler, "w", n, step=2, query=k) for k in (0, 1))
    for z in (z0, z1):
        assert abs(z.mean().item()) < 5 / math.sqrt(n) and z.var().item() == pytest.approx(1.0, abs=5e-3)
    assert torch.corrcoef(torch.stack([z0, z1]))[0, 1].item() == pytest.approx(alpha, abs=5e-3)
    again = cuda_direction(DirectionSampler("gaussian", correlation=alpha, seed=4), "w", n, step=2, query=1)
    assert torch.equal(again, z1)  # a pure function of (seed, step, query, name)


@pytest.mark.parametrize("kernel", ["triton", "torch code"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_draws_the_numbers_of_the_cpu_kernel_bit_for_bit(kernel, distribution, dtype, monkeypatch):
    """One call over tensors of many sizes (tile edges, 1, millions), a correlated chain with a link drawn and not
    added, in place and out of place: the GPU's targets equal the CPU's C kernel's, bit for bit."""
    if kernel == "torch code":
        monkeypatch.setattr(kernels, "_gpu_kernel_serves", lambda source, target: False)
    sampler = DirectionSampler(distribution, correlation=-0.4, seed=9)
    g = torch.Generator().manual_seed(3)
    sizes = [1, 1023, 1024, 1025, 4096 * 320 + 7, 3_000_001]
    sources = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    scales = {1: 1e-3, 2: -0.5}  # link 0 drawn, not added
    results = {}
    for device in ("cpu", "cuda"):
        on_device = [s.to(device) for s in sources]
        targets = [torch.empty_like(s) for s in on_device]
        sampler.add_to(5, [Addition(f"p{i}", s.shape, scales, s, t) for i, (s, t) in enumerate(zip(on_device, targets))])
        in_place = on_device[4].clone()
        sampler.add_to(5, [Addition("p4", in_place.shape, scales, in_place, in_place)])
        results[device] = [t.cpu() for t in (*targets, in_place)]
    for i, (cpu, cuda) in enumerate(zip(results["cpu"], results["cuda"])):
        assert torch.equal(cpu.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           cuda.view(torch.int16 if dtype != torch.float32 else torch.int32)), f"tensor {i}"


def test_cuda_prepared_calls_draw_what_add_to_draws():
    """The estimator's prepared launches (a probe's groups, an update) against `add_to` over the same tensors."""
    sampler = DirectionSampler("gaussian", seed=2)
    names, sizes = ["a", "b", "c"], [5, 70_000, 2048]
    sources = [torch.randn(n, device=CUDA) for n in sizes]
    targets = [torch.empty_like(s) for s in sources]
    add = sampler.prepare(names, sources, targets)
    assert add is not None
    for step, scales in ((0, {0: 1e-3}), (0, {0: -1e-3}), (7, {1: 0.25})):
        add(step, scales)
        expected = [torch.empty_like(s) for s in sources]
        sampler.add_to(step, [Addition(n, s.shape, scales, s, e) for n, s, e in zip(names, sources, expected)])
        assert all(torch.equal(t, e) for t, e in zip(targets, expected)), (step, scales)


def test_cuda_estimate_is_unbiased():
    model = Quadratic().to(CUDA)
    estimator = ZOEstimator(model, eps=1e-3, num_queries=1, seed=1)
    draws = torch.stack([zo_estimate(model, estimator, step) for step in range(3000)])
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert (draws.mean(0) - model.grad()).abs().max() < 5 * standard_error.max()


def test_cuda_probe_and_update_match_naive_spsa_on_tied_llama():
    """The naive reference of the CPU test, with the z the CUDA sampler draws (same seeds)."""
    model = tiny_llama(vocab_size=5000, hidden=256, layers=1).to(CUDA)
    ids = torch.randint(0, 5000, (2, 16), generator=torch.Generator().manual_seed(0)).to(CUDA)
    sampler = DirectionSampler("gaussian", seed=11)
    assert_probe_and_update_match_naive_spsa(
        model, ids, lambda seed, step, k, name, numel: cuda_direction(sampler, name, numel, step, k), seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_zero_learning_rate_restores_weights_bitwise(tmp_path, dtype):
    model = tiny_llama(dtype=dtype)
    before = params(model)
    trainer = ZOTrainer(model=model, args=config(tmp_path, learning_rate=0.0, zo_num_queries=2, max_steps=3, use_cpu=False),
                        train_dataset=random_token_dataset())
    trainer.train()
    assert model.device.type == "cuda"
    assert_same({n: p.cpu() for n, p in params(model).items()}, before)


def test_cuda_fp16_zo_steps_bypass_the_grad_scaler_and_fo_steps_use_it(tmp_path):
    """accelerate's fp16 on a GPU: autocast to float16 and a GradScaler. ZO probes never call the scaler and
    leave the float32 weights bitwise; an FO run through the same trainer does scale its loss."""
    model = tiny_llama()
    before = params(model)
    zo = ZOTrainer(model=model, args=config(tmp_path / "zo", learning_rate=0.0, fp16=True, use_cpu=False),
                   train_dataset=random_token_dataset())
    zo.train()
    assert zo.accelerator.mixed_precision == "fp16" and zo._grad_scaler is not None
    assert zo._grad_scaler._scale is None  # never used
    assert_same({n: p.cpu() for n, p in params(model).items()}, before)
    fo = ZOTrainer(model=tiny_llama(), args=config(tmp_path / "fo", training_order="fo", optim="sgd", fp16=True, use_cpu=False),
                   train_dataset=random_token_dataset())
    fo.train()
    assert fo.accelerator.scaler._scale is not None
    assert any(not torch.equal(p.cpu(), before[n]) for n, p in fo.model.named_parameters())


def test_cuda_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    straight = ZOTrainer(model=tiny_llama(), args=config(tmp_path / "straight", max_steps=6, zo_num_queries=2, use_cpu=False),
                         train_dataset=random_token_dataset())
    straight.train()
    halfway = config(tmp_path / "resumed", max_steps=6, zo_num_queries=2, save_strategy="steps", save_steps=3, use_cpu=False)
    ZOTrainer(model=tiny_llama(), args=halfway, train_dataset=random_token_dataset()).train()
    resumed = ZOTrainer(model=tiny_llama(seed=123), args=halfway, train_dataset=random_token_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "run" / "checkpoint-3"))
    assert_same(params(resumed.model), params(straight.model))
    assert not torch.equal(straight.model.model.norm.weight.cpu(), tiny_llama().model.norm.weight)


def test_cuda_zo_step_peaks_at_the_memory_of_inference():
    """max_memory_allocated is exact on CUDA: a ZO step (q=1) against two forwards of the paper's 20M model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zo_trainer.modeling import PRESETS

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**PRESETS["llama2-20m"])).to(CUDA).train()
    ids = torch.randint(32000, (8, 256), device=CUDA)
    loss_fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    estimator = ZOEstimator(model, eps=1e-3, num_queries=1, seed=0)
    optimizer = ZOSGD(model.parameters(), estimator, lr=1e-4)

    def peak(step):
        step()  # warm: lazy buffers (the copy arena) are allocated once, then count in every later step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    steps = itertools.count()

    def zo_step():
        optimizer.accumulate(estimator.probe(loss_fn, next(steps)))
        optimizer.step()

    with torch.no_grad():
        inference = peak(lambda: (loss_fn(), loss_fn()))
    assert peak(zo_step) <= 1.02 * inference
