"""Causal-LM construction: pretrained weights, a config name, or a named Llama preset (random init).

Presets are data: `LlamaConfig` kwargs. `llama2-20m` reproduces the paper's model (§3, "Llama2, 20M
parameters"); the paper gives only the size and that the last MLP is ~400k parameters, ~2% of the
model (§3.2), so the shape is chosen to hit both:
  embedding (tied with the LM head)  32000 * 320           = 10,240,000
  one decoder layer  attention 4 * 320 * 320 = 409,600; MLP 3 * 320 * 416 = 399,360; 2 norms 640
  12 layers                          12 * 809,600          =  9,715,200
  final norm                                                        320
  total                                                     19,955,520  (last MLP 399,360 = 2.0%)
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel

PRESETS: dict[str, dict] = {
    "llama2-20m": dict(hidden_size=320, intermediate_size=416, num_hidden_layers=12, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5),  # 19,955,520 params, see above
    # CPU-sized: a ZO step's forwards take tens of milliseconds on 2 cores.
    "llama-tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5),  # 1,315,968 params
    "llama-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048,
                        tie_word_embeddings=True, rms_norm_eps=1e-5),  # 6,843,648 params
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local dir of a causal LM whose pretrained weights are loaded."}
    )
    model_preset: str = field(
        default="llama-tiny",
        metadata={"help": f"Random-init architecture used when model_name_or_path and config_name are unset: "
                          f"{list(PRESETS)}."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Hub id or local path of any model config to build with random init."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or local dir of a tokenizer; None trains a byte-level BPE on the corpus."},
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "Vocabulary of the trained tokenizer (default: the preset's)."}
    )
    torch_dtype: str = field(default="float32", metadata={"help": f"Parameter dtype: {list(DTYPES)}."})

    def __post_init__(self):
        if self.model_name_or_path and self.config_name:
            raise ValueError("Set model_name_or_path (pretrained weights) or config_name (random init), not both.")
        preset_kwargs(self.model_preset)
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not one of {list(DTYPES)}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1; got {self.vocab_size}.")


def preset_kwargs(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"Unknown model_preset {name!r}; presets: {list(PRESETS)}.")
    return dict(PRESETS[name])


def tokenizer_vocab_size(args: ModelArguments) -> int:
    """Vocabulary to train a BPE with: the explicit `vocab_size`, else the preset's."""
    return args.vocab_size or PRESETS[args.model_preset]["vocab_size"]


def build_model(
    args: ModelArguments,
    vocab_size: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """A causal LM whose embedding covers `vocab_size` (pass `len(tokenizer)`), with `use_cache=False` for training."""
    dtype = DTYPES[args.torch_dtype]
    token_ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if args.model_name_or_path:
        model = _from_hub(AutoModelForCausalLM.from_pretrained, args.model_name_or_path, dtype=dtype)
        if vocab_size > model.get_input_embeddings().num_embeddings:  # tokenizer with added tokens
            model.resize_token_embeddings(vocab_size)
    else:
        if args.config_name:
            config = _from_hub(AutoConfig.from_pretrained, args.config_name)
        else:
            config = LlamaConfig(**preset_kwargs(args.model_preset))
        config.update(dict(vocab_size=vocab_size, **token_ids))  # the tokenizer decides the vocabulary
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.config.use_cache = False  # no generation during training; the KV cache only costs memory
    return model


def _from_hub(load, name: str, **kwargs):
    try:
        return load(name, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load {name!r} from a local dir, the Hugging Face Hub or its cache ({err}). Offline, pass a "
            f"local dir, or leave model_name_or_path/config_name unset to use model_preset (one of {list(PRESETS)})."
        ) from err
