"""Shared builders: real (tiny) transformers models and datasets, no mocks."""

import os

# Before torch loads OpenMP: on a busy 2-core machine, spin-waiting OpenMP workers slow forwards down many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(vocab_size=256, hidden=64, layers=2, seed=0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        **overrides,
    })
    return LlamaForCausalLM(config).to(dtype)


def params(model):
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    """Two `params` snapshots are bitwise equal."""
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def fp16_autocast_as_on_gpus(model):
    """What accelerate does to the model with fp16 on a GPU (autocast to float16); on CPU it ignores fp16."""
    model.forward = torch.autocast("cpu", dtype=torch.float16)(model.forward)
    return model


def fsdp_plugin_as_on_gpus():
    """What accelerate does on GPUs with an FSDP plugin (distributed type FSDP, the plugin on its state); on CPU
    processes it ignores the plugin. Everything after, accelerate's FSDP2 preparation and Trainer's FSDP paths, runs
    unchanged (gloo)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_as_on_gpus(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init_as_on_gpus


def random_token_dataset(n=64, length=32, vocab_size=256, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.fixture
def llama():
    return tiny_llama()
