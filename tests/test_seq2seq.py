"""ZOSeq2SeqTrainer: transformers' Seq2SeqTrainer with ZO steps, on a tiny T5 built from a config."""

import logging

import torch
from transformers import Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.config import zo_config_class
from zo_trainer.trainer import ZOSeq2SeqTrainer

from conftest import assert_same, params, random_token_dataset

COMMON = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", save_strategy="no",
              disable_tqdm=True, use_cpu=True, seed=0, zo_num_queries=2)


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config)


def test_seq2seq_arguments_are_upgraded_with_every_value_kept(tmp_path):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, generation_max_length=5,
                                    use_cpu=True, report_to="none")
    trainer = ZOSeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=random_token_dataset(n=4, vocab_size=64))
    assert type(trainer.args) is zo_config_class(Seq2SeqTrainingArguments) and trainer.args.zo_num_queries == 1
    upgraded = trainer.args.to_dict()
    assert {k: upgraded[k] for k in args.to_dict()} == args.to_dict()


def test_seq2seq_trainer_trains_as_zo_trainer_does_and_generates(tmp_path):
    data = random_token_dataset(n=16, length=8, vocab_size=64)
    args = zo_config_class(Seq2SeqTrainingArguments)(output_dir=str(tmp_path / "s2s"), predict_with_generate=True,
                                                     **COMMON)
    seq2seq = ZOSeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=data)
    seq2seq.train()
    plain = ZOTrainer(model=tiny_t5(), args=ZOConfig(output_dir=str(tmp_path / "zo"), **COMMON), train_dataset=data)
    plain.train()
    assert_same(params(seq2seq.model), params(plain.model))  # the same ZO steps through Seq2SeqTrainer
    assert not torch.equal(params(seq2seq.model)["shared.weight"], params(tiny_t5())["shared.weight"])
    generated = seq2seq.predict(data.select(range(4))).predictions  # Seq2SeqTrainer's evaluation: generate
    assert generated.shape[0] == 4 and generated.shape[1] > 1 and 0 <= generated.min() and generated.max() < 64


def test_fp16_on_cpu_says_what_runs(tmp_path, caplog):
    from conftest import tiny_llama

    with caplog.at_level(logging.WARNING, logger="zo_trainer.trainer"):
        ZOTrainer(model=tiny_llama(), args=ZOConfig(output_dir=str(tmp_path), fp16=True, **COMMON),
                  train_dataset=random_token_dataset(n=8))
    assert "fp16=True does nothing on CPU" in caplog.text and "computes in float32" in caplog.text
