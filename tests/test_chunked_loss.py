"""The chunked causal-LM loss against the model's own loss from its full logits (`zo_trainer.chunked_loss`)."""

import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from zo_trainer import chunked_loss
from zo_trainer.chunked_loss import ChunkedLoss, check
from zo_trainer.zo import ZOEstimator, perturbation as swaps

from conftest import random_token_dataset, tiny_llama

HERE = os.path.dirname(__file__)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          final_logit_softcapping=30.0))


BUILDERS = {"llama": lambda: tiny_llama(use_cache=False), "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def batch(seed=0, padded=True):
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    if padded:
        labels[0, 12:] = -100  # a shorter sequence
    return ids, labels


def losses(model, ids, labels, **kwargs):
    """The model's own loss and the chunked one, on the same forward inputs."""
    own = model(input_ids=ids, labels=labels, **kwargs).loss
    with ChunkedLoss(model, labels):
        out = model(input_ids=ids, labels=labels, **kwargs)
    assert out.logits.numel() == 0  # never built
    return own, out.loss


@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("architecture", list(BUILDERS))
def test_the_chunked_loss_is_the_models_own(architecture, num_items, monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_LOGITS_BYTES", 7 * 256 * 4)  # chunks of 7 tokens: the last one shorter
    model = BUILDERS[architecture]().eval()
    ids, labels = batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    with torch.no_grad():
        own, chunked = losses(model, ids, labels, **kwargs)
    assert chunked.item() == pytest.approx(own.item(), rel=1e-6)


@pytest.mark.parametrize("path", ["whole", "hooks", "blocks"])
def test_the_chunked_loss_sees_the_perturbed_head(path, monkeypatch):
    """Under a probe's perturbation the chunks use ``head + δz``: on each of the engine's swap paths (all copies at
    once; module by module; a large head multiplied by its perturbed weight in blocks, called once per chunk)."""
    monkeypatch.setattr(chunked_loss, "CHUNK_LOGITS_BYTES", 16 * 256 * 4)
    if path != "whole":
        monkeypatch.setattr(swaps, "GROUP_BYTES", 0)
    if path == "blocks":
        monkeypatch.setattr(swaps, "LARGE_WEIGHT_BYTES", 1024)
        monkeypatch.setattr(swaps, "BLOCK_BYTES", 16 * 1024)
    model = tiny_llama(use_cache=False, tie_word_embeddings=False)
    ids, labels = batch()
    estimator = ZOEstimator(model, eps=1e-2, seed=3, reuse_prefix=False)
    trainable = estimator.trainable()
    with torch.no_grad():
        unperturbed = model(input_ids=ids, labels=labels).loss
        with estimator.perturbed(trainable, 0, 0, 1.0):
            own = model(input_ids=ids, labels=labels).loss
        with estimator.perturbed(trainable, 0, 0, 1.0) as perturbation:
            with ChunkedLoss(model, labels):
                chunked = model(input_ids=ids, labels=labels).loss
    assert (path == "blocks") == (perturbation.layout.pieces.get(model.lm_head) == "blocks")
    assert chunked.item() == pytest.approx(own.item(), rel=1e-6)
    assert abs(own.item() - unperturbed.item()) > 1e-4  # the perturbation shows in the loss
    assert "forward" not in vars(model.lm_head)


def loss_fn(model, ids, labels):
    """What `check` takes: the loss of one forward, chunked or not."""
    def loss(chunked):
        with ChunkedLoss(model, labels) if chunked else contextlib.nullcontext():
            return model(input_ids=ids, labels=labels).loss
    return loss


def test_a_model_that_transforms_its_logits_is_refused():
    model = tiny_gemma2().eval()
    why = check(loss_fn(model, *batch()), model)
    assert why is not None and "transforms its head's logits before its loss" in why
    llama = tiny_llama(use_cache=False)
    assert check(loss_fn(llama, *batch()), llama) is None  # the check can pass


def test_a_head_that_is_not_a_plain_linear_is_refused():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_llama(use_cache=False, tie_word_embeddings=False)
    model.lm_head = Scaled(64, 256, bias=False)
    assert check(loss_fn(model, *batch()), model) == "its output embedding is not a plain nn.Linear"


def zo_run(tmp_path, chunked, trainer_class=None, **overrides):
    from zo_trainer import ZOConfig, ZOTrainer

    args = ZOConfig(output_dir=str(tmp_path / str(chunked)), max_steps=3, per_device_train_batch_size=4,
                    learning_rate=1e-2, zo_num_queries=2, zo_chunked_loss=chunked, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **overrides)
    trainer = (trainer_class or ZOTrainer)(model=tiny_llama(use_cache=False), args=args,
                                           train_dataset=random_token_dataset(n=16))
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_zo_trainer_steps_with_the_chunked_loss_follow_the_full_logits(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(chunked_loss, "CHUNK_LOGITS_BYTES", 16 * 256 * 4)  # several chunks per batch
    with caplog.at_level(logging.INFO, logger="zo_trainer.trainer"):
        chunked = zo_run(tmp_path, True)
    assert "ZO probes compute the loss a chunk of tokens at a time" in caplog.text
    assert chunked == pytest.approx(zo_run(tmp_path, False), rel=1e-5)


def test_a_trainer_whose_compute_loss_may_read_the_logits_keeps_them(tmp_path, caplog):
    from zo_trainer import ZOTrainer

    class ReadsLogits(ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            assert outputs.logits.shape[-1] == 256  # the full logits, as without ZO
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    with caplog.at_level(logging.INFO, logger="zo_trainer.trainer"):
        zo_run(tmp_path, True, ReadsLogits)
    assert "compute the loss from the full logits: ReadsLogits.compute_loss may read the logits" in caplog.text


def test_the_chunked_loss_never_holds_the_logits():
    """Peak memory of one forward with labels, in a fresh process each (fixed mmap threshold: the peak is the live
    tensors'): a 32k vocabulary on a tiny body, where the logits and their log-softmax are nearly all of it."""
    peaks = {}
    for kind in ("own", "chunked"):
        out = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True, check=True, cwd=HERE,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])["increment_kib"]
    logits_kib = 4 * 256 * 32000 * 4 // 1024
    assert peaks["own"] > 1.5 * logits_kib  # the logits and their log-softmax
    assert peaks["chunked"] < 0.25 * peaks["own"]


def _peak_of_one_forward(kind: str) -> None:
    def rss_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    model = tiny_llama(vocab_size=32000, hidden=32, layers=1, use_cache=False)
    ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kib("VmRSS")
    with torch.no_grad(), ChunkedLoss(model, ids) if kind == "chunked" else contextlib.nullcontext():
        model(input_ids=ids, labels=ids)
    print(json.dumps({"increment_kib": rss_kib("VmHWM") - base}))


if __name__ == "__main__":
    _peak_of_one_forward(sys.argv[1])


def test_a_peft_adapter_model_gets_the_chunked_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(use_cache=False), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, labels = batch()
    with torch.no_grad():
        own, chunked = losses(model, ids, labels)
    assert chunked.item() == pytest.approx(own.item(), rel=1e-6)
    assert check(loss_fn(model, ids, labels), model) is None
