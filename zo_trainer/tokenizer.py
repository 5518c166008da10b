"""A tokenizer from the Hub or a local dir, or a byte-level BPE trained on the corpus (offline, seconds)."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
N_BYTES = 256  # a byte-level BPE starts from one token per byte


def build_tokenizer(
    name_or_path: str | None, texts: Iterable[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Load `name_or_path` (then `texts` and `vocab_size` are unused), or train a BPE of `vocab_size` on `texts`."""
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1; got {model_max_length}.")
    if name_or_path is not None:
        return load_pretrained_tokenizer(name_or_path, model_max_length)
    return train_bpe_tokenizer(texts, vocab_size, model_max_length)


def load_pretrained_tokenizer(name_or_path: str, model_max_length: int) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, model_max_length=model_max_length)
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load tokenizer {name_or_path!r} from a local dir, the Hugging Face Hub or its cache "
            f"({err}). Offline, pass a local tokenizer dir, or set tokenizer_name: null to train a BPE on the corpus."
        ) from err
    if tokenizer.eos_token is None:
        raise ValueError(f"Tokenizer {name_or_path!r} has no eos_token; it is needed to separate documents.")
    if tokenizer.pad_token is None:  # e.g. Llama-2; blocks are never padded, but collators ask for one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE: no unknown characters, no normaliser, EOS is appended by the data pipeline."""
    if vocab_size < N_BYTES + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {N_BYTES + len(SPECIAL_TOKENS)} for a byte-level BPE "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts) if hasattr(texts, "__len__") else None)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)
