"""ZOTrainer inside the real transformers training loop, against independent references."""

import math
import re
import types

import pytest
import torch
import transformers
import yaml
from transformers import Trainer, TrainingArguments

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.trainer import MODEL_CARD_TAGS
from zo_trainer.zo import ZOSGD, ZOEstimator

from conftest import assert_same, fp16_autocast_as_on_gpus, params, random_token_dataset, tiny_llama


# Two float32 computations of the same step differ by ~1e-8 in the weights; the next probes divide the loss
# difference by 2ε = 2e-3, so after a few steps equal runs agree to ~1e-5 while one update moves weights ~1e-2.
ROUNDING = 1e-4


def config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    kwargs.update(overrides)
    return ZOConfig(**kwargs)


def train(args, model=None, dataset=None, **trainer_kwargs):
    model = model if model is not None else tiny_llama()
    trainer = ZOTrainer(model=model, args=args, train_dataset=dataset or random_token_dataset(), **trainer_kwargs)
    trainer.train(resume_from_checkpoint=trainer_kwargs.pop("resume", None))
    return trainer


def test_zo_step_matches_a_hand_written_engine_loop(tmp_path):
    """One fixed batch, linear LR schedule: the Trainer's ZO run equals the engine driven by hand."""
    data = random_token_dataset(n=4)
    trainer = train(config(tmp_path, lr_scheduler_type="linear", zo_num_queries=2), dataset=data)
    model = tiny_llama()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    estimator = ZOEstimator(model, eps=1e-3, num_queries=2, seed=0)
    optimizer = ZOSGD(model.parameters(), estimator, lr=1e-2)
    for step in range(4):
        optimizer.param_groups[0]["lr"] = 1e-2 * (1 - step / 4)
        optimizer.accumulate(estimator.probe(lambda: model(**batch).loss, step))
        optimizer.step()
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, model.get_parameter(n), rtol=0, atol=ROUNDING)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), tiny_llama().parameters()))


def test_zo_mode_keeps_no_gradient_and_no_optimizer_state(tmp_path):
    trainer = train(config(tmp_path))
    assert isinstance(trainer.optimizer.optimizer, ZOSGD)
    assert trainer.optimizer.optimizer.state == {}
    assert all(p.grad is None for p in trainer.model.parameters())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["forward_passes"] for e in logs] == [4, 8]  # 2 forwards per step, logged every 2 steps
    assert all(math.isfinite(e["zo_projected_grad_abs"]) and e["zo_skipped_updates"] == 0 for e in logs)


def test_fo_mode_equals_the_plain_trainer(tmp_path):
    fo = train(config(tmp_path, training_order="fo", optim="sgd"))
    plain_model = tiny_llama()
    plain_args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=2, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, optim="sgd",
    )
    plain = Trainer(model=plain_model, args=plain_args, train_dataset=random_token_dataset())
    plain.train()
    assert_same(params(fo.model), params(plain_model))
    assert fo.state.log_history[-1]["train_loss"] == plain.state.log_history[-1]["train_loss"]


def test_a_plain_training_arguments_is_accepted(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=random_token_dataset())
    assert isinstance(trainer.args, ZOConfig) and trainer.args.training_order == "zo"
    assert trainer.args.max_steps == 1
    assert trainer.args.zo_step_rule == "normalized"  # the rule whose rates are AdamW's: the learning rate keeps its meaning
    assert ZOTrainer(model=tiny_llama(), args=config(tmp_path), train_dataset=random_token_dataset()).args.zo_step_rule \
        == "gradient"  # a ZOConfig keeps its own


def test_a_process_of_a_launch_outside_its_process_group_is_refused(tmp_path, monkeypatch):
    """Arguments whose devices were set up alone (world 1) in a process that a launcher started as 1 of 2."""
    args = config(tmp_path)
    assert args.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 .* not in a process group.*--use_cpu"):
        ZOTrainer(model=tiny_llama(), args=args, train_dataset=random_token_dataset())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_learning_rate_restores_weights_bitwise(tmp_path, dtype):
    model = tiny_llama(dtype=dtype)
    before = params(model)
    train(config(tmp_path, learning_rate=0.0, zo_num_queries=2, max_steps=3), model=model)
    assert_same(params(model), before)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_zo_steps_run_in_half_precision_and_restore(tmp_path, precision):
    """bf16 through accelerate; fp16 (the V100 case) as accelerate sets it up on GPUs, autocast and a GradScaler.
    The probes run in half precision (losses differ from float32's in the low bits, by < 1%), the float32
    weights come back bitwise, and the scaler is never used by a ZO step."""
    model = tiny_llama()
    before = params(model)
    if precision == "bf16":
        half = train(config(tmp_path / "half", learning_rate=0.0, bf16=True), model=model)
        assert half.accelerator.mixed_precision == "bf16"
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        half = train_with_grad_scaler(config(tmp_path / "half", learning_rate=0.0), scaler, fp16_autocast_as_on_gpus(model))
        assert scaler._scale is None  # never called: nothing to unscale without a backward
    assert_same(params(model), before)
    full = train(config(tmp_path / "full", learning_rate=0.0))
    losses = lambda trainer: [e["loss"] for e in trainer.state.log_history if "loss" in e]  # noqa: E731
    assert losses(half) != losses(full) and losses(half) == pytest.approx(losses(full), rel=1e-2)


def test_runs_are_deterministic(tmp_path):
    a = train(config(tmp_path / "a", zo_num_queries=2))
    b = train(config(tmp_path / "b", zo_num_queries=2))
    assert_same(params(a.model), params(b.model))
    c = train(config(tmp_path / "c", zo_num_queries=2, zo_seed=1))
    assert not torch.equal(c.model.model.norm.weight, a.model.model.norm.weight)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    big = train(config(tmp_path / "big", per_device_train_batch_size=8, zo_num_queries=2))
    accumulated = train(
        config(tmp_path / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2, zo_num_queries=2)
    )
    moved = 0.0
    for (n, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=ROUNDING)
        moved = max(moved, (p - tiny_llama().get_parameter(n)).abs().max().item())
    assert moved > 1e-4  # the comparison is not between two untrained models


def test_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    straight = train(config(tmp_path / "straight", max_steps=6, zo_num_queries=2))
    halfway = config(tmp_path / "resumed", max_steps=6, zo_num_queries=2, save_strategy="steps", save_steps=3)
    first = ZOTrainer(model=tiny_llama(), args=halfway, train_dataset=random_token_dataset())
    first.train()  # saves checkpoint-3 and checkpoint-6; resume from 3 in a fresh process-like setup
    resumed = ZOTrainer(model=tiny_llama(seed=123), args=halfway, train_dataset=random_token_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "run" / "checkpoint-3"))
    assert_same(params(resumed.model), params(straight.model))
    logged = [e["forward_passes"] for e in resumed.state.log_history if "forward_passes" in e]
    assert logged == [8, 16, 24]  # counters continue across the resume


def non_finite_every_other_step(outputs, labels, num_items_in_batch=None):
    """A loss that overflows on odd steps (detected from the labels' first token parity)."""
    loss = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    return loss * (math.inf if int(labels[0, 0]) % 2 else 1.0)


def test_non_finite_probes_skip_the_update_and_are_counted(tmp_path):
    data = random_token_dataset(n=8)
    odd = [i for i in range(8) if data[i]["labels"][0] % 2]
    model = tiny_llama()
    before = params(model)
    args = config(tmp_path, per_device_train_batch_size=1, max_steps=8, logging_steps=8)
    trainer = train(args, model=model, dataset=data, compute_loss_func=non_finite_every_other_step)
    assert trainer.state.log_history[0]["zo_skipped_updates"] == len(odd)
    assert 0 < len(odd) < 8 and not torch.equal(model.model.norm.weight, before["model.norm.weight"])


def test_a_window_with_only_skipped_updates_stops_training(tmp_path):
    data = random_token_dataset(n=4).map(lambda row: {"labels": [1] + row["labels"][1:]})  # always odd
    with pytest.raises(RuntimeError, match="all 2 ZO updates since the last log were skipped"):
        train(config(tmp_path, per_device_train_batch_size=2, max_steps=2), dataset=data,
              compute_loss_func=non_finite_every_other_step)


def test_skipped_updates_in_a_row_stop_training_whatever_the_logging(tmp_path):
    data = random_token_dataset(n=4).map(lambda row: {"labels": [1] + row["labels"][1:]})  # always odd
    with pytest.raises(RuntimeError, match=r"the last 10 ZO updates \(steps 0-9\) were skipped"):
        train(config(tmp_path, per_device_train_batch_size=2, max_steps=40, logging_steps=1000), dataset=data,
              compute_loss_func=non_finite_every_other_step)


def test_diverged_weights_stop_training_at_the_next_step(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan  # what an infinite learning rate leaves after one update
    with pytest.raises(RuntimeError, match=r"model.norm.weight holds non-finite values at step 0"):
        train(config(tmp_path, max_steps=20, logging_steps=1000), model=model)


def test_write_grad_mode_with_sgd_equals_zo_sgd(tmp_path):
    zo_sgd = train(config(tmp_path / "a", zo_num_queries=2))
    via_grad = train(config(tmp_path / "b", zo_num_queries=2, zo_write_grad=True, optim="sgd", max_grad_norm=0))
    for p, q in zip(zo_sgd.model.parameters(), via_grad.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=ROUNDING)
    adam = train(config(tmp_path / "c", zo_write_grad=True, optim="adamw_torch", learning_rate=1e-3))
    state = adam.optimizer.optimizer.state
    assert len(state) == sum(1 for p in adam.model.parameters() if p.requires_grad)  # AdamW moments exist


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(training_order="so"), "training_order='so'"),
        (dict(zo_eps=-1.0), "zo_eps=-1.0"),
        (dict(zo_num_queries=0), "zo_num_queries=0"),
        (dict(zo_query_reduction="max"), "zo_query_reduction='max'"),
        (dict(zo_estimator="spsa3"), "zo_estimator='spsa3'"),
        (dict(zo_distribution="cauchy"), "zo_distribution='cauchy'"),
        (dict(zo_correlation=-1.0, zo_num_queries=2), "zo_correlation=-1.0"),
        (dict(zo_correlation=-0.5), "needs zo_num_queries >= 2"),
    ],
)
def test_bad_config_values_are_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides, named, engine_argument",
    [
        (dict(zo_eps=0.0), "zo_eps=0.0", "eps"),
        (dict(zo_momentum=1.5), "zo_momentum=1.5", "momentum"),
        (dict(zo_momentum_history=4), "zo_momentum_history=4 rebuilds", "momentum_history"),
        (dict(zo_momentum_history=4), "got zo_momentum=0.0", "momentum"),
        (dict(zo_lowrank_rank=0), "zo_lowrank_rank=0 and zo_lowrank_refresh_steps=100", "rank"),
        (dict(zo_distribution="cauchy"), "zo_distribution='cauchy'", "distribution"),
        (dict(zo_newton_max_step=math.inf), "zo_newton_max_step=inf", "newton_max_step"),
        (dict(zo_optimizer="adam", adam_epsilon=0.0), "adam_epsilon=0.0", "eps"),
        (dict(zo_optimizer="adam", adam_beta2=1.0), "adam_beta2=1.0", "betas[1]"),
    ],
)
def test_config_errors_name_the_config_field_not_the_engine_argument(tmp_path, overrides, named, engine_argument):
    """The engine checks these settings and names its own arguments; the config says them in its fields."""
    with pytest.raises(ValueError) as error:
        config(tmp_path, **overrides)
    assert named in str(error.value)
    assert not re.search(rf"\b{re.escape(engine_argument)}=", str(error.value)), str(error.value)


def test_torch_compile_is_refused_for_zo_only(tmp_path):
    with pytest.raises(ValueError, match="torch_compile=True"):
        ZOTrainer(model=tiny_llama(), args=config(tmp_path, torch_compile=True), train_dataset=random_token_dataset())
    fo = ZOTrainer(model=tiny_llama(), args=config(tmp_path, torch_compile=True, training_order="fo"))
    assert fo.args.torch_compile and fo.training_order == "fo"


def test_probes_run_eagerly_under_a_graph_compiled_by_accelerate(tmp_path, monkeypatch):
    """accelerate's --dynamo_backend compiles the model in `prepare`, unasked by the config: the probes unwrap it
    and equal an eager run bit for bit (with the compiled graph the weights differ)."""
    from accelerate.utils import DynamoBackend

    eager = train(config(tmp_path / "eager"))
    trainer = ZOTrainer(model=tiny_llama(), args=config(tmp_path / "compiled"), train_dataset=random_token_dataset())
    monkeypatch.setattr(trainer.accelerator.state.dynamo_plugin, "backend", DynamoBackend.INDUCTOR)
    wrapped = []
    training_step = trainer.training_step
    monkeypatch.setattr(trainer, "training_step", lambda model, *a, **k: wrapped.append(model) or training_step(model, *a, **k))
    trainer.train()
    assert all(hasattr(model, "_orig_mod") for model in wrapped) and len(wrapped) == 4  # compiled by prepare
    assert_same(params(trainer.model), params(eager.model))


def train_with_grad_scaler(args, scaler, model=None):
    """On GPUs, fp16 makes accelerate create a GradScaler, which fails or rescales a step without backward. CPU
    autocast has none, so install a real one where accelerate keeps it."""
    trainer = ZOTrainer(model=model if model is not None else tiny_llama(), args=args, train_dataset=random_token_dataset())
    trainer.accelerator.scaler = scaler
    trainer.train()
    return trainer


def test_fp16_grad_scaler_is_bypassed_by_zo_steps(tmp_path):
    plain = train(config(tmp_path / "plain"))
    scaled = train_with_grad_scaler(config(tmp_path / "scaled"), torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert_same(params(scaled.model), params(plain.model))


def test_fp16_grad_scaler_serves_fo_blocks_and_not_zo_blocks(tmp_path):
    schedule = [{"parameters": ["model.layers.0.*"], "steps": 2, "training_order": "fo"},
                {"parameters": ["model.layers.1.*"], "steps": 2, "training_order": "zo"}]
    # max_grad_norm=0: with mixed_precision "no", accelerate would clip before unscaling the injected scaler
    plain = train(config(tmp_path / "plain", block_schedule=schedule, max_grad_norm=0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled = train_with_grad_scaler(config(tmp_path / "scaled", block_schedule=schedule, max_grad_norm=0), scaler)
    assert scaler._scale is not None  # the FO steps scaled their loss through it (a power of 2: exact)
    assert_same(params(scaled.model), params(plain.model))  # ZO estimates were not divided by the scale


def test_model_card_records_the_zo_settings_and_metrics(tmp_path, monkeypatch):
    args = config(tmp_path, zo_num_queries=3, zo_eps=1e-4, zo_query_reduction="sum", zo_correlation=-0.5)
    trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=random_token_dataset(),
                        eval_dataset=random_token_dataset(n=8, seed=1))
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    card_args = dict(dataset="sotu", tags=["pretraining", "zo", "zeroth-order"])  # as run.py passes them
    trainer.create_model_card(**card_args)
    card = (tmp_path / "run" / "README.md").read_text()
    for expected in ("zo_num_queries: 3", "zo_eps: 0.0001", "zo_optimizer: sgd",
                     "zo_query_reduction: sum", "zo_correlation: -0.5", "zo_momentum_history: 0", "dataset: sotu",
                     f"eval_loss: {eval_loss:.6g}", "forward_passes: 24"):
        assert expected in card, expected
    # push_to_hub writes the card again, over the first one, whose tags the base class merges in
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: types.SimpleNamespace(upload_folder=lambda **_: None))
    trainer.hub_model_id = "user/run"
    trainer.push_to_hub(**card_args)
    header = (tmp_path / "run" / "README.md").read_text().split("---")[1]
    tags = yaml.safe_load(header)["tags"]
    assert sorted(tags) == sorted({*MODEL_CARD_TAGS, "pretraining", "zo", "generated_from_trainer"}), tags


def test_gradient_probe_is_wired_from_the_config(tmp_path):
    trainer = train(config(tmp_path, gradient_probe_steps=2, gradient_probe_draws=3, zo_num_queries=2))
    probes = [e for e in trainer.state.log_history if "probe/cosine" in e]
    assert [e["step"] for e in probes] == [0, 2, 4]
    assert all(e["probe/num_draws"] == 3 and -1 <= e["probe/cosine"] <= 1 and e["probe/var_ratio"] > 1 for e in probes)
    quiet = train(config(tmp_path / "off", zo_num_queries=2))
    assert not any("probe/cosine" in e for e in quiet.state.log_history)
    assert_same(params(trainer.model), params(quiet.model))  # probing does not change the run


def test_zo_lowers_the_loss_of_a_tiny_llama_on_real_text(tmp_path):
    """Forward-only training on the embedded State of the Union corpus, judged on held-out speeches."""
    from transformers import default_data_collator

    from zo_trainer.data import DataArguments, build_lm_datasets, load_raw_dataset
    from zo_trainer.tokenizer import build_tokenizer

    data_args = DataArguments(block_size=32, max_train_samples=40, max_eval_samples=32)
    raw = load_raw_dataset(data_args)
    tokenizer = build_tokenizer(None, raw["train"]["text"], vocab_size=300, model_max_length=1024)
    train_set, eval_set = build_lm_datasets(data_args, tokenizer, raw)
    args = config(tmp_path, max_steps=120, per_device_train_batch_size=8, per_device_eval_batch_size=32,
                  learning_rate=1e-2, zo_num_queries=4, lr_scheduler_type="constant", logging_steps=40)
    trainer = ZOTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=1), args=args,
                        train_dataset=train_set, eval_dataset=eval_set, data_collator=default_data_collator)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert before > math.log(len(tokenizer)) - 0.2  # an untrained model is close to uniform
    assert after < before - 0.3, (before, after)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_lowrank_directions_train_through_the_trainer(tmp_path):
    trainer = train(config(tmp_path, zo_distribution="lowrank", zo_lowrank_rank=2, zo_num_queries=2))
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, tiny_llama().get_parameter(n))]
    assert len(moved) == len(list(trainer.model.parameters()))  # matrices (low rank) and norms (Gaussian)
    delta = trainer.model.model.layers[0].mlp.up_proj.weight - tiny_llama().model.layers[0].mlp.up_proj.weight
    assert torch.linalg.matrix_rank(delta) == 2  # every update lives in the same U·Vᵀ subspace until the refresh


def test_an_optimizer_passed_to_zo_sgd_is_refused_before_training(tmp_path):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="zo_write_grad=True"):
        ZOTrainer(model=model, args=config(tmp_path), optimizers=(optimizer, None))
    trainer = ZOTrainer(model=model, args=config(tmp_path, zo_write_grad=True), optimizers=(optimizer, None),
                        train_dataset=random_token_dataset())
    trainer.train()
    assert len(optimizer.state) == len(list(model.parameters()))  # the user's AdamW consumed the ZO estimates
