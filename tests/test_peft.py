"""ZO on real PEFT adapters (examples/zo_peft.py): only the adapter trains, the base weights stay bitwise, the saved
adapter reloads with PeftModel.from_pretrained and computes what the trained model computes."""

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from zo_trainer.tokenizer import train_bpe_tokenizer

from conftest import assert_same, params, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import zo_peft  # noqa: E402

TEXTS = [f"the cat number {i} sat on the mat and ate {i % 7} fish" for i in range(48)]
ADAPTER_NAMES = {"lora": "lora_", "ia3": "ia3_"}


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_zo_trains_the_adapter_only_and_it_reloads(tmp_path, adapter):
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300, model_max_length=64)
    base = params(tiny_llama(vocab_size=len(tokenizer), hidden=32))
    trainer = zo_peft.fine_tune(tiny_llama(vocab_size=len(tokenizer), hidden=32), tokenizer, TEXTS, adapter,
                                str(tmp_path), block_size=16, max_steps=4, per_device_train_batch_size=4,
                                zo_num_queries=2, use_cpu=True, disable_tqdm=True)
    trained = trainer.model
    tag = ADAPTER_NAMES[adapter]
    named = dict(trained.get_base_model().named_parameters())
    assert_same({n.replace(".base_layer", ""): p.detach() for n, p in named.items() if tag not in n}, base)
    init = zo_peft.get_peft_model(tiny_llama(vocab_size=len(tokenizer), hidden=32), zo_peft.ADAPTERS[adapter]())
    adapter_params = {n: p for n, p in init.get_base_model().named_parameters() if tag in n}
    assert adapter_params and all(not torch.equal(named[n], p) for n, p in adapter_params.items())  # all trained
    fresh = PeftModel.from_pretrained(tiny_llama(vocab_size=len(tokenizer), hidden=32), str(tmp_path))
    reloaded = dict(fresh.get_base_model().named_parameters())
    assert all(torch.equal(named[n], reloaded[n]) for n in adapter_params)
    batch = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    trained.eval()
    with torch.no_grad():
        assert torch.equal(trained(batch).logits, fresh(batch).logits)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("adapter_")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "model.safetensors").exists()


def test_an_unknown_adapter_is_refused():
    with pytest.raises(ValueError, match=r"adapter='loha' is not supported; choose one of \['lora', 'ia3'\]"):
        zo_peft.fine_tune(None, None, [], "loha", "unused")
