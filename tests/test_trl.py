"""ZO inside TRL's real SFTTrainer and RewardTrainer (zo_trainer.trl), against the plain backprop trainers on the same
batches."""

import dataclasses
import importlib
import pickle
import sys

import pytest
import yaml
from datasets import Dataset
from transformers import HfArgumentParser, Seq2SeqTrainingArguments
from trl import SFTConfig, SFTTrainer, TrlParser

from zo_trainer import ZOConfig, find_learning_rate, zo_config_class
from zo_trainer.trl import ZOSFTConfig, ZOSFTTrainer
from zo_trainer.tokenizer import train_bpe_tokenizer

from conftest import assert_same, params, tiny_llama

TEXTS = [f"the cat number {i} sat on the mat and ate {i % 7} fish" for i in range(48)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300, model_max_length=64)


def sft_args(tmp_path, cls=SFTConfig, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                    logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                    bf16=False, max_length=32)
    return cls(**{**settings, **overrides})


def sft(trainer_cls, args, tokenizer, seed=0):
    trainer = trainer_cls(model=tiny_llama(vocab_size=len(tokenizer), hidden=32, seed=seed), args=args,
                          train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer)
    trainer.train()
    return trainer


def train_logs(trainer, key):
    return [e[key] for e in trainer.state.log_history if "loss" in e]


def test_an_sft_config_is_upgraded_with_every_value_kept(tmp_path, tokenizer):
    args = sft_args(tmp_path, max_length=24, completion_only_loss=False, learning_rate=3e-3)
    trainer = ZOSFTTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32), args=args,
                           train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer)
    assert type(trainer.args) is ZOSFTConfig and trainer.args.zo_num_queries == 1
    upgraded = trainer.args.to_dict()
    assert {k: upgraded[k] for k in args.to_dict()} == args.to_dict()


def test_zo_sft_counts_tokens_once_per_batch_as_backprop_does(tmp_path, tokenizer):
    """q = 2 and 2 accumulated micro-batches: 8 probe forwards a step; num_tokens equals the FO run's. With the
    forward estimator the first probe forward is the unperturbed model: at step 1 its accuracy and entropy are the
    FO run's, whose first forward sees the same weights."""
    batches = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    zo = sft(ZOSFTTrainer, sft_args(tmp_path / "zo", ZOSFTConfig, zo_num_queries=2, **batches), tokenizer)
    fo = sft(SFTTrainer, sft_args(tmp_path / "fo", **batches), tokenizer)
    assert train_logs(zo, "num_tokens") == train_logs(fo, "num_tokens")
    assert train_logs(zo, "forward_passes") == [8, 16, 24, 32]
    first = sft(ZOSFTTrainer, sft_args(tmp_path / "l0", ZOSFTConfig, zo_estimator="forward", **batches), tokenizer)
    for key in ("mean_token_accuracy", "entropy"):
        assert train_logs(first, key)[0] == pytest.approx(train_logs(fo, key)[0], rel=1e-6)


def test_gradient_probe_forwards_record_nothing(tmp_path, tokenizer):
    """The gradient probe (a backprop and 2q forwards per draw on a fixed batch) is no training step."""
    probed = sft(ZOSFTTrainer, sft_args(tmp_path / "zo", ZOSFTConfig, gradient_probe_steps=2, gradient_probe_draws=2),
                 tokenizer)
    assert any("probe/cosine" in k for e in probed.state.log_history for k in e)
    fo = sft(SFTTrainer, sft_args(tmp_path / "fo"), tokenizer)
    assert train_logs(probed, "num_tokens") == train_logs(fo, "num_tokens")


def test_lr_find_forwards_record_nothing(tmp_path, tokenizer):
    trainer = ZOSFTTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32), args=sft_args(tmp_path, ZOSFTConfig),
                           train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer)
    find_learning_rate(trainer, learning_rates=[1e-3, 1e-2], steps=2, num_batches=2)
    assert trainer._total_train_tokens == 0 and not trainer._metrics["train"]


@pytest.mark.slow
def test_zo_sft_lowers_the_loss_and_resumes_exactly(tmp_path, tokenizer):
    args = sft_args(tmp_path, ZOSFTConfig, max_steps=24, learning_rate=5e-3, logging_steps=8, zo_num_queries=2,
                    save_strategy="steps", save_steps=12)
    straight = sft(ZOSFTTrainer, args, tokenizer)
    losses = train_logs(straight, "loss")
    assert losses[-1] < losses[0] - 0.1, losses
    resumed = ZOSFTTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32, seed=1), args=args,
                           train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-12"))
    assert_same(params(resumed.model), params(straight.model))


def test_the_merged_config_parses_from_the_command_line_and_from_yaml(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--zo_num_queries", "3", "--max_length", "64", "--use_cpu",
             "--bf16", "false"]
    (cli,) = HfArgumentParser(ZOSFTConfig).parse_args_into_dataclasses(flags)
    assert (cli.zo_num_queries, cli.max_length, cli.learning_rate) == (3, 64, SFTConfig.learning_rate)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "zo_eps": 1e-4, "packing": True, "use_cpu": True,
                                    "bf16": False}))
    (from_yaml,) = TrlParser(ZOSFTConfig).parse_args_and_config(["--config", str(path)])
    assert (from_yaml.zo_eps, from_yaml.packing, from_yaml.logging_steps) == (1e-4, True, SFTConfig.logging_steps)


def test_the_merged_config_keeps_every_sft_default_and_pickles():
    sft_fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    merged = {f.name: f for f in dataclasses.fields(ZOSFTConfig)}
    assert sft_fields.keys() <= merged.keys() and {"zo_eps", "training_order"} <= merged.keys()
    for name, f in sft_fields.items():
        assert (merged[name].default, merged[name].default_factory, merged[name].metadata) == (
            f.default, f.default_factory, f.metadata), name
    assert zo_config_class(SFTConfig) is ZOSFTConfig and zo_config_class(ZOSFTConfig) is ZOSFTConfig
    args = ZOSFTConfig(output_dir="unused", use_cpu=True, bf16=False, zo_num_queries=3, max_length=7)
    copy = pickle.loads(pickle.dumps(args))  # as Trainer writes training_args.bin
    assert type(copy) is ZOSFTConfig and copy.to_dict() == args.to_dict()


def test_a_zo_config_given_to_zo_sft_trainer_becomes_its_merged_config(tmp_path, tokenizer):
    args = ZOConfig(output_dir=str(tmp_path), zo_num_queries=3, zo_eps=1e-4, max_steps=1, use_cpu=True,
                    report_to="none")
    trainer = ZOSFTTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32), args=args,
                           train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer)
    assert type(trainer.args) is ZOSFTConfig
    upgraded = trainer.args
    assert (upgraded.zo_num_queries, upgraded.zo_eps, upgraded.max_length) == (3, 1e-4, SFTConfig.max_length)


def test_arguments_of_another_family_and_non_configs_are_refused(tmp_path, tokenizer):
    with pytest.raises(TypeError, match=r"ZOSFTTrainer takes a SFTConfig .* Seq2SeqTrainingArguments given has fields "
                                        r"it does not know: .*sortish_sampler"):
        ZOSFTTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32), processing_class=tokenizer,
                     args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                     train_dataset=Dataset.from_dict({"text": TEXTS}))
    with pytest.raises(TypeError, match=r"zo_config_class\(<class 'dict'>\): expected a subclass of "
                                        r"transformers.TrainingArguments"):
        zo_config_class(dict)


def reward_run(trainer_cls, args, tokenizer):
    from transformers import LlamaForSequenceClassification

    model = tiny_llama(vocab_size=len(tokenizer), hidden=32)  # the same initial weights as a causal LM's backbone
    config = model.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    scorer = LlamaForSequenceClassification(config)
    scorer.model.load_state_dict(model.model.state_dict())
    pairs = Dataset.from_dict({"chosen": [t + " happily" for t in TEXTS], "rejected": [t + " sadly" for t in TEXTS]})
    trainer = trainer_cls(model=scorer, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    return trainer


def test_zo_reward_trainer_counts_once_and_its_metrics_are_of_the_unperturbed_model(tmp_path, tokenizer):
    from trl import RewardConfig, RewardTrainer

    from zo_trainer.trl import ZORewardConfig, ZORewardTrainer

    settings = dict(max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no",
                    disable_tqdm=True, use_cpu=True, seed=0, bf16=False, max_length=32)
    zo = reward_run(ZORewardTrainer, ZORewardConfig(output_dir=str(tmp_path / "zo"), zo_num_queries=2,
                                                    zo_estimator="forward", **settings), tokenizer)
    fo = reward_run(RewardTrainer, RewardConfig(output_dir=str(tmp_path / "fo"), **settings), tokenizer)
    assert train_logs(zo, "num_tokens") == train_logs(fo, "num_tokens")
    assert train_logs(zo, "forward_passes") == [3, 6, 9]
    for key in ("mean_reward", "accuracy", "margin"):
        assert train_logs(zo, key)[0] == pytest.approx(train_logs(fo, key)[0], rel=1e-5, abs=1e-7), key


def test_without_trl_the_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # what `import trl` finds where TRL is not installed
    monkeypatch.delitem(sys.modules, "zo_trainer.trl")
    with pytest.raises(ImportError, match=r"zo_trainer.trl needs TRL .*pip install 'zo-trainer\[trl\]'"):
        importlib.import_module("zo_trainer.trl")


@pytest.mark.slow
def test_zo_sft_on_two_processes_counts_tokens_as_one_process_on_the_global_batch(tmp_path):
    """Data- and query-parallel (every process evaluates its queries on the gathered global batch) log the tokens
    of the global batch once, as one process does on it; the gradient probe, on the main process only, runs TRL's
    compute_loss without its gather (which would wait forever for the other process) and records nothing."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    two = ["--config_file", str(root / "accelerate_configs" / "multi_cpu_2proc.yaml")]
    logs = {}
    for name, processes, flags in [("one", ["--num_processes", "1", "--cpu"], ["--batch", "4"]),
                                   ("data", two, ["--parallel", "data", "--probe"]),
                                   ("query", two, ["--parallel", "query"])]:
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *processes,
                               str(root / "tests" / "distributed_sft.py"), "--out", str(out), *flags],
                              capture_output=True, text=True, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[name] = json.loads((out / "log.json").read_text())
    assert logs["data"]["num_tokens"] == logs["one"]["num_tokens"]
    assert logs["query"]["num_tokens"] == logs["one"]["num_tokens"]
    assert logs["query"]["loss"] == pytest.approx(logs["one"]["loss"], abs=1e-5)
