"""Reduced-dimension and blockwise training: what moves, when, and how it resumes."""

import pytest
import torch
from transformers import TrainerCallback

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.callbacks import BlockSchedule, match_parameters, reinitialise

from conftest import random_token_dataset, tiny_llama

LAYER0 = "model.layers.0.*"
LAYER1_MLP = "model.layers.1.mlp.*"


def config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        optim="sgd", lr_scheduler_type="constant",
    )
    kwargs.update(overrides)
    return ZOConfig(**kwargs)


class MovedPerStep(TrainerCallback):
    """Records, for every optimizer step, the names of the parameters whose values changed."""

    def __init__(self, model):
        self.model, self.moved = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_step_end(self, args, state, control, **kwargs):
        self.moved.append({n for n, p in self.model.named_parameters() if not torch.equal(p, self.before[n])})


def names_matching(model, *patterns):
    return set(match_parameters(model, list(patterns)))


@pytest.mark.parametrize("order", ["zo", "fo"])
def test_reduced_dimension_moves_only_the_selected_parameters(tmp_path, order):
    model = tiny_llama()
    recorder = MovedPerStep(model)
    trainer = ZOTrainer(model=model, args=config(tmp_path, training_order=order, trainable_parameters=[LAYER1_MLP]),
                        train_dataset=random_token_dataset(), callbacks=[recorder])
    trainer.train()
    selected = names_matching(model, LAYER1_MLP)
    assert all(moved == selected for moved in recorder.moved)
    expected_count = sum(model.get_parameter(n).numel() for n in selected)
    assert trainer.state.log_history[0]["trainable_parameters"] == expected_count


def test_a_pattern_matching_nothing_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"'model.layers.9.mlp.\*' matches no parameter"):
        ZOTrainer(model=tiny_llama(), args=config(tmp_path, trainable_parameters=["model.layers.9.mlp.*"]))
    schedule = [{"parameters": ["nope.*"], "steps": 1}]
    with pytest.raises(ValueError, match=r"'nope.\*' matches no parameter"):
        ZOTrainer(model=tiny_llama(), args=config(tmp_path, block_schedule=schedule))


SCHEDULE = [
    {"name": "embedding", "parameters": ["model.embed_tokens.*"], "steps": 2, "training_order": "fo"},
    {"name": "layer{i}", "parameters": ["model.layers.{i}.*"], "repeat_over": "model.layers", "steps": 2,
     "training_order": "zo", "reinit": True, "zo_num_queries": 3, "learning_rate": 5e-3},
]


def test_schedule_advances_switches_fo_zo_and_freezes(tmp_path):
    model = tiny_llama()
    recorder = MovedPerStep(model)
    trainer = ZOTrainer(model=model, args=config(tmp_path, max_steps=100, block_schedule=SCHEDULE),
                        train_dataset=random_token_dataset(), callbacks=[recorder])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["block_name"] for e in logs] == ["embedding"] * 2 + ["layer0"] * 2 + ["layer1"] * 2
    assert trainer.state.global_step == 6  # the schedule ends the run before max_steps
    passes = [b["forward_passes"] - a["forward_passes"] for a, b in zip([{"forward_passes": 0}] + logs, logs)]
    assert passes == [1, 1, 6, 6, 6, 6]  # FO: one forward; ZO with q=3: six
    assert [e["learning_rate"] for e in logs] == [1e-2, 1e-2, 5e-3, 5e-3, 5e-3, 5e-3]
    blocks = [names_matching(model, "model.embed_tokens.*")] * 2 + [names_matching(model, LAYER0)] * 2
    blocks += [names_matching(model, "model.layers.1.*")] * 2
    assert recorder.moved == blocks
    assert all(p.grad is None for p in model.parameters())
    assert "zo_projected_grad" not in logs[0] and "zo_projected_grad" in logs[2]


def test_a_block_without_a_learning_rate_of_its_own_takes_the_runs(tmp_path):
    schedule = [{"name": "embedding", "parameters": ["model.embed_tokens.*"], "steps": 2, "training_order": "fo",
                 "learning_rate": 0.1},
                {"name": "layers", "parameters": ["model.layers.*"], "steps": 2, "training_order": "zo"}]
    trainer = ZOTrainer(model=tiny_llama(), args=config(tmp_path, max_steps=100, block_schedule=schedule),
                        train_dataset=random_token_dataset())
    trainer.train()
    assert [e["learning_rate"] for e in trainer.state.log_history if "loss" in e] == [0.1, 0.1, 1e-2, 1e-2]


def test_epoch_lengths_follow_the_dataloader(tmp_path):
    schedule = [{"parameters": [LAYER0], "epochs": 0.5}, {"parameters": [LAYER1_MLP], "epochs": 1}]
    trainer = ZOTrainer(model=tiny_llama(), args=config(tmp_path, max_steps=100, block_schedule=schedule),
                        train_dataset=random_token_dataset(n=32))  # 8 batches of 4 per epoch
    trainer.train()
    assert [(b.start, b.end) for b in trainer.block_schedule.blocks] == [(0, 4), (4, 12)]
    assert trainer.state.global_step == 12


def test_reinitialise_redraws_the_block_and_keeps_everything_else():
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # far from any initial distribution
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    block = match_parameters(model, ["model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"])
    reinitialise(model, block, seed=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in block), n
    up = model.get_parameter(block[0])
    assert abs(up.mean().item()) < 3e-3 and up.std().item() == pytest.approx(model.config.initializer_range, rel=0.1)
    assert torch.equal(model.get_parameter(block[1]), torch.ones_like(up[0, : model.config.hidden_size]))


def test_reinitialise_redraws_a_loaded_model_as_a_built_one(tmp_path):
    """transformers marks every loaded weight as initialised, and its init functions then leave it as it is: the
    block of a model loaded with from_pretrained (the paper's reduced-dimension runs start from one) is redrawn all
    the same, to the values a built model's block gets from the same seed."""
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=1).save_pretrained(tmp_path)
    loaded, built = AutoModelForCausalLM.from_pretrained(tmp_path), tiny_llama(seed=2)
    block = match_parameters(loaded, ["model.layers.-1.mlp.*"])
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    reinitialise(loaded, block, seed=3)
    reinitialise(built, block, seed=3)
    for n in block:
        assert not torch.equal(loaded.get_parameter(n), before[n]) and torch.equal(loaded.get_parameter(n), built.get_parameter(n)), n
    assert all(torch.equal(p, before[n]) for n, p in loaded.named_parameters() if n not in block)


def test_reinit_at_block_start_only(tmp_path):
    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    schedule = [{"parameters": [LAYER1_MLP], "steps": 3, "reinit": True}]
    ZOTrainer(model=model, args=config(tmp_path, learning_rate=0.0, block_schedule=schedule),
              train_dataset=random_token_dataset()).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, initial[n])}
    assert changed == names_matching(model, LAYER1_MLP)


@pytest.mark.parametrize("step, block", [(1, "embedding"), (3, "layer0")])
def test_resume_in_mid_block_matches_a_straight_run(tmp_path, step, block):
    """SGD with momentum: a block resumed in its middle keeps the optimizer state the checkpoint restored."""
    momentum = dict(max_steps=100, block_schedule=SCHEDULE, optim_args="momentum=0.9")
    straight = tiny_llama()
    ZOTrainer(model=straight, args=config(tmp_path / "a", **momentum), train_dataset=random_token_dataset()).train()
    args = config(tmp_path / "b", **momentum, save_strategy="steps", save_steps=1)
    ZOTrainer(model=tiny_llama(), args=args, train_dataset=random_token_dataset()).train()
    resumed = tiny_llama(seed=9)
    trainer = ZOTrainer(model=resumed, args=args, train_dataset=random_token_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / f"checkpoint-{step}"))  # inside the block
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert next(e["block_name"] for e in trainer.state.log_history if "loss" in e and e["step"] > step) == block


def test_repeat_over_expands_one_block_per_layer():
    model = tiny_llama(layers=3)
    schedule = BlockSchedule([{"name": "L{i}", "parameters": "model.layers.{i}.mlp.*", "repeat_over": "model.layers",
                               "epochs": 1}], model)
    assert [b.name for b in schedule.blocks] == ["L0", "L1", "L2"]
    assert schedule.names["L2"] == sorted(names_matching(model, "model.layers.2.mlp.*"), key=list(
        n for n, _ in model.named_parameters()).index)


@pytest.mark.parametrize(
    "block, match",
    [
        ({"parameters": [LAYER0], "steps": 1, "lr": 1.0}, r"unknown block key\(s\) \['lr'\]"),
        ({"parameters": [LAYER0], "steps": 1, "epochs": 1}, "exactly one of `steps` or `epochs`"),
        ({"parameters": [LAYER0], "steps": 0}, "length 0"),
        ({"parameters": [LAYER0], "steps": 1, "training_order": "so"}, "training_order='so'"),
        ({"steps": 1}, "needs `parameters`"),
    ],
)
def test_bad_blocks_are_named(block, match):
    with pytest.raises(ValueError, match=match):
        BlockSchedule([block], tiny_llama())


def test_schedule_as_json_string_from_the_command_line(tmp_path):
    import json

    args = config(tmp_path, block_schedule=json.dumps(SCHEDULE))
    assert args.block_schedule == SCHEDULE
    with pytest.raises(ValueError, match="not valid JSON"):
        config(tmp_path, block_schedule="[{oops")


def test_negative_layer_index_names_the_last_layer_at_any_depth():
    for layers in (2, 3):
        model = tiny_llama(layers=layers)
        assert match_parameters(model, ["model.layers.-1.mlp.*"]) == match_parameters(
            model, [f"model.layers.{layers - 1}.mlp.*"])
    with pytest.raises(ValueError, match="index -5 does not fit 'model.layers'"):
        match_parameters(tiny_llama(), ["model.layers.-5.mlp.*"])


def test_logs_carry_the_exact_block_start_and_plots_mark_it(tmp_path):
    from zo_trainer.plotting import loss_curves_figure

    schedule = [{"name": "first", "parameters": [LAYER0], "steps": 3},
                {"name": "second", "parameters": [LAYER1_MLP], "steps": 3}]
    trainer = ZOTrainer(model=tiny_llama(), args=config(tmp_path, logging_steps=2, block_schedule=schedule),
                        train_dataset=random_token_dataset())
    trainer.train()
    trainer.save_state()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [(e["step"], e["block_name"], e["block_start"]) for e in logs] == [(2, "first", 0), (4, "second", 3),
                                                                             (6, "second", 3)]
    ax = loss_curves_figure([tmp_path / "run"]).axes[0]
    assert [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"] == [3.0]  # not the log at 4
