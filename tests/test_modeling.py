import math

import huggingface_hub.constants
import pytest
import torch

from zo_trainer.modeling import PRESETS, ModelArguments, build_model, tokenizer_vocab_size
from zo_trainer.tokenizer import build_tokenizer


def llama_param_count(vocab_size, hidden_size, intermediate_size, num_hidden_layers, **_):
    """Tied-embedding Llama with full multi-head attention, no biases, counted by hand."""
    attention, mlp, norms = 4 * hidden_size**2, 3 * hidden_size * intermediate_size, 2 * hidden_size
    return vocab_size * hidden_size + num_hidden_layers * (attention + mlp + norms) + hidden_size


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_count_matches_hand_count(preset):
    model = build_model(ModelArguments(model_preset=preset), PRESETS[preset]["vocab_size"])
    assert model.num_parameters() == llama_param_count(**PRESETS[preset])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.use_cache is False


def test_llama2_20m_matches_the_paper():
    model = build_model(ModelArguments(model_preset="llama2-20m"), 32000)
    total = model.num_parameters()
    last_mlp = sum(p.numel() for p in model.model.layers[-1].mlp.parameters())
    assert 19e6 <= total <= 21e6
    assert model.model.embed_tokens.weight.numel() == 32000 * 320
    assert 0.015 <= last_mlp / total <= 0.025 and 350_000 <= last_mlp <= 450_000  # paper §3.2: ~400k, ~2%


def test_preset_model_takes_the_tokenizer_vocab_and_starts_near_uniform():
    tokenizer = build_tokenizer(None, ["a small corpus of words, words and more words"] * 50, 300, 64)
    args = ModelArguments(model_preset="llama-tiny")
    model = build_model(args, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode("more words and a corpus")])
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - math.log(len(tokenizer))) < 0.5  # random init: close to a uniform guess
    assert tokenizer_vocab_size(args) == 4096 and tokenizer_vocab_size(ModelArguments(vocab_size=512)) == 512


def test_pretrained_dir_and_config_name_load_locally(tmp_path):
    saved = build_model(ModelArguments(model_preset="llama-tiny"), 4096)
    saved.save_pretrained(tmp_path)
    loaded = build_model(ModelArguments(model_name_or_path=str(tmp_path), torch_dtype="bfloat16"), 4100)
    assert loaded.dtype == torch.bfloat16 and loaded.get_input_embeddings().num_embeddings == 4100  # resized
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight.bfloat16())
    fresh = build_model(ModelArguments(config_name=str(tmp_path)), 1000)
    assert fresh.num_parameters() == llama_param_count(**{**PRESETS["llama-tiny"], "vocab_size": 1000})
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_preset": "gpt-huge"}, r"gpt-huge.*llama2-20m.*llama-tiny"),
        ({"torch_dtype": "float64"}, "float64"),
        ({"model_name_or_path": "x", "config_name": "y"}, "not both"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArguments(**kwargs)


def test_unreachable_hub_model_suggests_presets(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="model_preset"):
        build_model(ModelArguments(model_name_or_path="meta-llama/Llama-2-7b-hf"), 32000)
