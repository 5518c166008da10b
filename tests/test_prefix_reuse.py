"""Prefix reuse against the reference it must equal bitwise: the same probes with reuse off (`zo_trainer.zo.prefix`)."""

import copy
import logging

import pytest
import torch
from torch import nn

from zo_trainer.zo import ZOSGD, ZOEstimator

from conftest import params, random_token_dataset, tiny_llama


def tiny_gpt2(dropout):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=3, n_head=4,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        use_cache=False))


# architecture -> (model builder, pattern of the trained block, the first layer's MLP, the last layer's MLP)
ARCHITECTURES = {
    "llama": (lambda: tiny_llama(layers=3, use_cache=False), "model.layers.2.mlp.", "model.layers.0.mlp",
              "model.layers.2.mlp"),
    "gpt2-dropout": (lambda: tiny_gpt2(0.1), "transformer.h.2.mlp.", "transformer.h.0.mlp", "transformer.h.2.mlp"),
    "qwen2": (tiny_qwen2, "model.layers.2.mlp.", "model.layers.0.mlp", "model.layers.2.mlp"),
}


def train_only(model, prefix):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))


def count_runs(model, name):
    """How many times the forward of ``name`` really ran (a served call does not run its children)."""
    module = model.get_submodule(name)
    child = next(module.children())
    runs = []
    child.register_forward_hook(lambda *_: runs.append(1))
    return runs


def run_steps(model, reuse, batches, num_queries=3, **estimator_kwargs):
    """A few ZO-SGD steps from the same global RNG state (dropout); returns the probes."""
    torch.manual_seed(0)
    estimator = ZOEstimator(model, num_queries=num_queries, seed=3, reuse_prefix=reuse, **estimator_kwargs)
    optimizer = ZOSGD([p for p in model.parameters() if p.requires_grad], estimator, lr=1e-2)
    probes = []
    for step, batch in enumerate(batches):
        probes.append(estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, step))
        optimizer.accumulate(probes[-1])
        optimizer.step()
    return probes


def assert_same_probes(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.losses, y.losses)
        assert torch.equal(x.projected_grads, y.projected_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_probes_and_weights_equal_a_run_without_reuse(architecture, dtype):
    build, block, first_mlp, last_mlp = ARCHITECTURES[architecture]
    reference = build().to(dtype).train()  # dropout on where the config has it: the probes replay its masks
    train_only(reference, block)
    model = copy.deepcopy(reference)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    below, above = count_runs(model, first_mlp), count_runs(model, last_mlp)

    assert_same_probes(run_steps(model, True, batches), run_steps(reference, False, batches))
    assert params(model).keys() == params(reference).keys()
    for name, p in params(model).items():
        assert torch.equal(p, params(reference)[name]), name
    assert len(below) == 3  # once per batch, where the 6 probe forwards of each ran it without reuse
    assert len(above) == 3 * 6  # the trained block runs at every probe


def test_the_unperturbed_forward_of_the_curvature_step_records_the_prefix():
    reference = tiny_llama(layers=3, use_cache=False)
    train_only(reference, "model.layers.2.")
    model = copy.deepcopy(reference)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    below = count_runs(model, "model.layers.1.mlp")
    assert_same_probes(run_steps(model, True, batches, curvature=True),
                       run_steps(reference, False, batches, curvature=True))
    assert len(below) == 2


def test_the_prefix_moves_with_the_trained_block():
    model = tiny_llama(layers=3, use_cache=False)
    batch = torch.randint(0, 256, (2, 16))
    estimator = ZOEstimator(model, num_queries=2, seed=0)
    runs = {layer: count_runs(model, f"model.layers.{layer}.mlp") for layer in range(3)}
    for trained in (2, 0, 1):  # a layer-wise schedule, as the block callbacks set requires_grad
        train_only(model, f"model.layers.{trained}.")
        before = {layer: len(r) for layer, r in runs.items()}
        estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, trained)
        assert {layer: len(r) - before[layer] for layer, r in runs.items()} == {
            layer: 1 if layer < trained else 4 for layer in range(3)}


def test_the_log_names_what_is_computed_once(caplog):
    model = tiny_llama(layers=2, use_cache=False)
    train_only(model, "model.layers.1.mlp.")
    batch = torch.randint(0, 256, (2, 16))
    with caplog.at_level(logging.INFO, logger="zo_trainer.zo.prefix"):
        ZOEstimator(model, num_queries=1).probe(lambda: model(input_ids=batch, labels=batch).loss, 0)
    served = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1.input_layernorm",
              "model.layers.1.self_attn", "model.layers.1.post_attention_layernorm"]
    assert f"6 module calls computed once per batch ({', '.join(served)})" in caplog.text


def test_a_whole_model_that_trains_is_recorded_once_and_then_left_alone():
    model = tiny_llama(layers=2, use_cache=False)
    batch = torch.randint(0, 256, (2, 16))
    estimator = ZOEstimator(model, num_queries=1)
    estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, 0)
    hooks = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: hooks.append(len(module._forward_pre_hooks)))
    estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, 1)
    assert hooks == [1, 1]  # no recording hooks of its own beside this one: the embedding reads a trainable weight


def test_later_batches_watch_only_the_served_calls():
    model = tiny_llama(layers=2, use_cache=False)
    train_only(model, "model.layers.1.mlp.")
    batch = torch.randint(0, 256, (2, 16))
    estimator = ZOEstimator(model, num_queries=1)
    estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, 0)
    hooks = {name: [] for name in ("model.layers.0", "model.layers.0.mlp")}
    for name, seen in hooks.items():
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, seen=seen: seen.append(len(module._forward_pre_hooks)))
    estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, 1)
    # the served layer is watched in the batch's first forward, and the layer's MLP (inside it) is not
    assert hooks == {"model.layers.0": [2, 1], "model.layers.0.mlp": [1]}


def test_a_served_call_that_turns_unsafe_runs_again_and_the_next_batch_watches_every_call(caplog):
    def run(reuse):
        model = Stack(nn.Sequential(nn.BatchNorm1d(16), nn.ReLU())).eval()
        estimator = ZOEstimator(model, num_queries=2, seed=1, reuse_prefix=reuse)
        out = [estimator.probe(lambda: model(X), 0)]
        model.train()  # batch norm now updates its running statistics at each forward: a side effect
        out += [estimator.probe(lambda: model(X), step) for step in (1, 2)]
        return out, model.prefix[0].running_mean

    with caplog.at_level(logging.INFO, logger="zo_trainer.zo.prefix"):
        (reused, running_mean) = run(True)
    assert "prefix runs at every probe: it changed one of its buffers" in caplog.text
    reference, reference_mean = run(False)
    assert_same_probes(reused, reference)
    assert torch.equal(running_mean, reference_mean)


class Stack(nn.Module):
    """A hand-written model: ``prefix`` runs before the trained ``head``, ``between`` after it (but before the head)."""

    def __init__(self, prefix: nn.Module, between: nn.Module | None = None, **prefix_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.prefix, self.between, self.head = nn.Linear(8, 16), prefix, between, nn.Linear(16, 1)
        self.prefix_kwargs = prefix_kwargs
        for p in [*self.embed.parameters(), *self.prefix.parameters()]:
            p.requires_grad_(False)

    def forward(self, x):
        h = self.prefix(self.embed(x), **self.prefix_kwargs)
        if self.between is not None:
            h = self.between(h)
        return self.head(h).pow(2).mean()


class Noise(nn.Module):
    """Draws from the global RNG (as dropout does), in eval mode too."""

    def forward(self, h):
        return h + torch.randn_like(h)


class Doubles(nn.Module):
    def forward(self, h):
        return h.mul_(2)


class Scales(nn.Module):
    def forward(self, h, scale):
        return h * scale.value


class Scale:
    value = 3.0


class CountsItsRuns(nn.Module):
    def __init__(self):
        super().__init__()
        self.runs = 0

    def forward(self, h):
        self.runs += 1
        return torch.tanh(h)


def probes(model, batch_fn, reuse, num_queries=2, steps=2):
    estimator = ZOEstimator(model, num_queries=num_queries, seed=1, reuse_prefix=reuse)
    return [estimator.probe(lambda: model(batch_fn()), step) for step in range(steps)]


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda: Stack(nn.Sequential(nn.BatchNorm1d(16), nn.ReLU())), "it changed one of its buffers"),
        (lambda: Stack(Doubles()), "it modified one of its inputs in place"),
        (lambda: Stack(Scales(), scale=Scale()), "an input of type Scale cannot be compared"),
        (lambda: Stack(nn.Tanh(), between=Doubles()), "a tensor it read or returned was modified in place later"),
    ],
    ids=["buffer-side-effect", "in-place-input", "object-input", "output-modified-later"],
)
def test_what_cannot_be_proven_safe_runs_at_every_probe_and_says_why(build, why, caplog):
    with caplog.at_level(logging.INFO, logger="zo_trainer.zo.prefix"):
        reused = probes(build(), lambda: X, True)
    assert f"prefix runs at every probe: {why}" in caplog.text
    assert_same_probes(reused, probes(build(), lambda: X, False))


def test_a_prefix_that_draws_random_numbers_leaves_the_rng_as_without_reuse():
    torch.manual_seed(5)
    reused = probes(Stack(Noise(), between=Noise()), lambda: X, True)
    torch.manual_seed(5)
    assert_same_probes(reused, probes(Stack(Noise(), between=Noise()), lambda: X, False))


def test_inputs_that_change_between_probes_stop_the_reuse(caplog):
    def changing():  # a loss_fn that does not feed the same batch to every probe
        changing.calls += 1
        return torch.full((4, 8), float(changing.calls % 3))

    changing.calls = 0
    with caplog.at_level(logging.INFO, logger="zo_trainer.zo.prefix"):
        reused = probes(Stack(nn.Tanh()), changing, True)
    assert "embed got other inputs than in the batch's first forward" in caplog.text
    changing.calls = 0
    assert_same_probes(reused, probes(Stack(nn.Tanh()), changing, False))


def test_a_trainable_weight_read_outside_its_module_ends_the_prefix():
    class ReadsTheHead(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.head = nn.Linear(8, 16).requires_grad_(False), nn.Linear(16, 16)
            self.before, self.after = CountsItsRuns(), CountsItsRuns()

        def forward(self, x):
            h = self.before(self.embed(x)) * self.head.weight.sum()  # perturbed from here on
            return self.head(self.after(h)).pow(2).mean()

    model, reference = ReadsTheHead(), ReadsTheHead()
    assert_same_probes(probes(model, lambda: X, True, steps=1), probes(reference, lambda: X, False, steps=1))
    assert (model.before.runs, model.after.runs) == (1, 4)  # q = 2: 4 probe forwards


def test_zo_trainer_steps_are_bitwise_the_same_with_and_without_reuse(tmp_path):
    from zo_trainer import ZOConfig, ZOTrainer

    final = {}
    for reuse in (True, False):
        args = ZOConfig(output_dir=str(tmp_path / str(reuse)), max_steps=3, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, learning_rate=1e-2, zo_num_queries=2, zo_reuse_prefix=reuse,
                        trainable_parameters=["model.layers.1.mlp.*"], report_to="none", save_strategy="no",
                        use_cpu=True, disable_tqdm=True, seed=0)
        trainer = ZOTrainer(model=tiny_llama(use_cache=False), args=args, train_dataset=random_token_dataset(n=16))
        runs = count_runs(trainer.model, "model.layers.0.mlp")
        trainer.train()
        final[reuse] = (params(trainer.model), [e["loss"] for e in trainer.state.log_history if "loss" in e], len(runs))
    assert final[True][1] == final[False][1]
    for name, p in final[True][0].items():
        assert torch.equal(p, final[False][0][name]), name
    # once per micro-batch, against 2q per micro-batch; and the 2 forwards of the chunked-loss check at the first batch
    assert final[True][2] == 3 * 2 + 2 and final[False][2] == 3 * 2 * 4 + 2
