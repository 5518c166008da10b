"""The recipe runner (zo_trainer.run, behind recipes/pretrain_zo.py): argument parsing, real (tiny, offline) runs of the recipes, reload, 2 processes."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zo_trainer import run as pretrain_zo

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# Recipes that parse and run today; the reduced-dimension/blockwise ones need `trainable_parameters`.
RUNNABLE_RECIPES = sorted(str(p.relative_to(RECIPES)) for p in (RECIPES / "paper").glob("*.yaml"))
# llama-tiny: whole model, its embedding (tied LM head), its last MLP
TRAINABLE = {None: 1_315_968, "model.embed_tokens.*": 4096 * 128, "model.layers.-1.mlp.*": 3 * 128 * 344}
# Tiny overrides on top of `--scale cpu` so a run takes seconds.
TINY = ["--max_steps", "2", "--max_train_samples", "20", "--max_eval_samples", "8", "--logging_steps", "1",
        "--block_size", "32", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8"]




@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one thread avoids OpenMP oversubscription (10x slower forwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ parsing
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_yaml_then_cli_precedence(tmp_path):
    config = _write(tmp_path / "r.yaml", "output_dir: from_yaml\nzo_num_queries: 4\nzo_eps: 1e-4\n"
                    "learning_rate: 0.5\nblock_size: 64\nmodel_preset: llama-small\nreport_to: none\n")
    model_args, data_args, args = pretrain_zo.parse_args(
        ["--config", config, "--zo_num_queries", "7", "--block_size", "32", "--output_dir", str(tmp_path / "cli")])
    assert args.zo_num_queries == 7 and data_args.block_size == 32 and args.output_dir == str(tmp_path / "cli")
    assert args.zo_eps == 1e-4 and args.learning_rate == 0.5 and model_args.model_preset == "llama-small"  # yaml
    assert args.zo_query_reduction == "mean" and data_args.dataset_name == "sotu"  # dataclass defaults


def test_split_seed_and_sampler_seed_are_separate_flags(tmp_path):
    _, data_args, args = pretrain_zo.parse_args(["--output_dir", str(tmp_path)])
    assert data_args.validation_split_seed == 0 and args.data_seed is None
    _, data_args, args = pretrain_zo.parse_args(
        ["--output_dir", str(tmp_path), "--validation_split_seed", "5", "--data_seed", "7"])
    assert data_args.validation_split_seed == 5 and args.data_seed == 7


def test_no_config_loads_default_recipe(tmp_path):
    recipe = yaml.safe_load((RECIPES / "default.yaml").read_text())
    model_args, data_args, args = pretrain_zo.parse_args([])
    assert args.output_dir == recipe["output_dir"] and args.max_steps == recipe["max_steps"]
    assert args.learning_rate == recipe["learning_rate"] and args.zo_num_queries == recipe["zo_num_queries"]
    assert model_args.model_preset == "llama-tiny" and data_args.dataset_name == "sotu"
    assert model_args.tokenizer_name is None  # offline: BPE trained on the corpus


def test_scale_cpu_overrides_recipe_but_not_cli():
    config = str(RECIPES / "paper/table2_zo_q20.yaml")
    model_args, data_args, args = pretrain_zo.parse_args(["--config", config, "--scale", "cpu", "--max_steps", "3"])
    assert model_args.model_preset == "llama-tiny" and model_args.tokenizer_name is None
    assert data_args.dataset_name == "sotu" and data_args.block_size == 128
    assert args.max_steps == 3 and not args.fp16  # CLI wins over CPU_SCALE's 100 steps
    assert args.output_dir == "runs/paper/table2_zo_q20-cpu"
    assert (args.zo_num_queries, args.zo_eps, args.zo_query_reduction) == (20, 1e-4, "sum")  # the method is kept


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    config = _write(tmp_path / "typo.yaml", "zo_num_querys: 4\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown key") as err:
        pretrain_zo.parse_args(["--config", config])
    assert "zo_num_querys" in str(err.value) and "typo.yaml" in str(err.value)


def test_duplicate_yaml_key_names_key_lines_and_file(tmp_path):
    config = _write(tmp_path / "twice.yaml", "learning_rate: 0.001\nzo_num_queries: 4\nlearning_rate: 0.1\n")
    with pytest.raises(pretrain_zo.RecipeError, match="duplicate key 'learning_rate' \\(first set on line 1\\)") as err:
        pretrain_zo.parse_args(["--config", config])
    assert f'in "{config}", line 3' in str(err.value)


def test_duplicate_key_inside_a_block_is_refused_too(tmp_path):
    config = _write(tmp_path / "blocks.yaml", "block_schedule:\n  - {parameters: ['model.norm.*'], steps: 2, "
                    "steps: 3}\n")
    with pytest.raises(pretrain_zo.RecipeError, match="duplicate key 'steps' \\(first set on line 2\\)") as err:
        pretrain_zo.parse_args(["--config", config])
    assert f'in "{config}", line 2' in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    config = _write(tmp_path / "broken.yaml", "learning_rate: 0.001\n  zo_num_queries: 4\n")
    with pytest.raises(pretrain_zo.RecipeError, match=re.escape(config)) as err:
        pretrain_zo.parse_args(["--config", config])
    assert "not a valid yaml recipe" in str(err.value) and "line 2" in str(err.value)


LLAMA_TINY_PATTERN = "names look like \\['model.embed_tokens.weight'"
REFUSED_SETTINGS = [  # yaml recipe, what the message must say (after "key=value (set in FILE)")
    ("per_device_train_batch_size: 0\n", "must be an integer >= 1"),
    ("per_device_eval_batch_size: 0\n", "must be an integer >= 1"),
    ("gradient_accumulation_steps: 0\n", "must be an integer >= 1"),
    ("block_size: 4096\n", "exceeds the model's max_position_embeddings=2048 \\(model_preset 'llama-tiny'\\); "
                           "block_size must be <= 2048"),
    ("trainable_parameters: ['model.layer.*']\n",
     f"pattern 'model.layer.\\*' matches no parameter.*{LLAMA_TINY_PATTERN}"),
    ("trainable_parameters: ['model.layers.-9.*']\n", "index -9 does not fit 'model.layers'"),
    ("block_schedule:\n  - {parameters: ['model.embed.*'], steps: 2}\n",
     f"pattern 'model.embed.\\*' matches no parameter.*{LLAMA_TINY_PATTERN}"),
    ("block_schedule:\n  - {parameters: ['model.layers.{i}.*'], repeat_over: model.blocks, epochs: 1}\n",
     "has no attribute `blocks`"),
    ("training_order: sgd\n", "choose one of \\['zo', 'fo'\\]"),  # a dataclass's refusal gets the file too
]


@pytest.mark.parametrize("recipe, message", REFUSED_SETTINGS, ids=[r.split(":")[0] for r, _ in REFUSED_SETTINGS])
def test_bad_setting_is_refused_naming_value_and_file(tmp_path, recipe, message):
    config = _write(tmp_path / "bad.yaml", "model_preset: llama-tiny\n" + recipe)
    key, value = recipe.split(":", 1)
    with pytest.raises(pretrain_zo.RecipeError) as err:
        pretrain_zo.parse_args(["--config", config, "--output_dir", str(tmp_path / "run")])
    text = str(err.value)
    assert re.search(message, text), text
    assert f"{key} set in {config}" in text or f"{key}={yaml.safe_load(value)!r} (set in {config})" in text, text
    assert not (tmp_path / "run").exists()


def test_a_setting_from_the_command_line_is_named_as_such(tmp_path):
    with pytest.raises(pretrain_zo.RecipeError, match=r"block_size=4096 \(set on the command line\) exceeds"):
        pretrain_zo.parse_args(["--scale", "cpu", "--block_size", "4096", "--output_dir", str(tmp_path)])
    with pytest.raises(pretrain_zo.RecipeError, match=r"per_device_train_batch_size=0 \(set on the command line\)"):
        pretrain_zo.parse_args(["--per_device_train_batch_size", "0", "--output_dir", str(tmp_path)])


def test_block_size_is_checked_against_a_config_dir(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64).save_pretrained(tmp_path / "small")
    base = ["--config_name", str(tmp_path / "small"), "--output_dir", str(tmp_path / "run")]
    pretrain_zo.parse_args([*base, "--block_size", "64"])
    with pytest.raises(pretrain_zo.RecipeError, match=f"max_position_embeddings=64 \\('{re.escape(str(tmp_path))}"):
        pretrain_zo.parse_args([*base, "--block_size", "65"])


@pytest.mark.parametrize("recipe", RUNNABLE_RECIPES)
def test_every_paper_recipe_passes_the_start_up_checks(recipe):
    pretrain_zo.parse_args(["--config", str(RECIPES / recipe), "--scale", "cpu"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        pretrain_zo.parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_unknown_cli_flag(tmp_path):
    with pytest.raises(ValueError, match="--zo_bogus"):
        pretrain_zo.parse_args(["--output_dir", str(tmp_path), "--zo_bogus", "1"])


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.parametrize("recipe", RUNNABLE_RECIPES)
def test_recipe_runs_at_cpu_scale(recipe, tmp_path):
    out = tmp_path / "run"
    source = yaml.safe_load((RECIPES / recipe).read_text())
    metrics = pretrain_zo.main(["--config", str(RECIPES / recipe), "--scale", "cpu", "--output_dir", str(out), *TINY])

    state = _json(out / "trainer_state.json")
    assert state["global_step"] == 2
    train_logs = [e for e in state["log_history"] if "loss" in e]
    assert len(train_logs) == 2 and all(math.isfinite(e["loss"]) for e in train_logs)
    first_block = (source.get("block_schedule") or [{}])[0]
    order = first_block.get("training_order") or source["training_order"]
    q = first_block.get("zo_num_queries") or source.get("zo_num_queries", 1)
    forwards_per_step = 2 * q if order == "zo" else 1
    assert [e["forward_passes"] for e in train_logs] == [forwards_per_step, 2 * forwards_per_step]
    assert train_logs[0]["trainable_parameters"] == TRAINABLE[first_block.get("parameters", [None])[0]]
    assert ("zo_projected_grad" in train_logs[0]) == (order == "zo")

    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    for key in ("training_order", "zo_num_queries", "zo_eps", "zo_query_reduction", "learning_rate", "optim"):
        if key in source:
            assert resolved[key] == source[key], key
    assert resolved["model_preset"] == "llama-tiny" and resolved["max_steps"] == 2

    results = _json(out / "all_results.json")
    for key in ("train_loss", "eval_loss", "init_eval_loss", "perplexity", "eval_accuracy", "train_peak_memory_mb"):
        assert math.isfinite(results[key]), key
    assert results["world_size"] == 1 and results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert metrics["eval_loss"] == results["eval_loss"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "README.md").is_file() and (out / "training_args.bin").is_file()


def test_the_untrained_loss_is_that_of_the_model_with_its_first_block_reinitialised(tmp_path):
    """At learning rate 0 a run ends where it starts: its eval loss equals its untrained eval loss only where the
    untrained loss is measured after the first block's re-initialisation; the block without reinit starts elsewhere."""
    def results(reinit: bool, out: Path) -> dict:
        block = {"name": "last_mlp", "parameters": ["model.layers.-1.mlp.*"], "steps": 2, "reinit": reinit}
        pretrain_zo.main(["--config", str(RECIPES / "paper" / "fig5_zo_q1.yaml"), "--scale", "cpu", "--output_dir",
                          str(out), "--learning_rate", "0", "--block_schedule", json.dumps([block]), *TINY])
        return _json(out / "all_results.json")

    reinitialised, kept = results(True, tmp_path / "reinit"), results(False, tmp_path / "kept")
    assert reinitialised["eval_loss"] == reinitialised["init_eval_loss"]
    assert kept["eval_loss"] == kept["init_eval_loss"]
    assert abs(reinitialised["init_eval_loss"] - kept["init_eval_loss"]) > 1e-4  # the block was redrawn


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The no-argument code path (recipes/default.yaml), with only output_dir and max_steps overridden."""
    out = tmp_path_factory.mktemp("default") / "run"
    trainer, metrics = pretrain_zo.run(["--output_dir", str(out), "--max_steps", "2"])
    return out, trainer, metrics


def test_default_recipe_no_arguments(default_run):
    out, trainer, metrics = default_run
    recipe = yaml.safe_load((RECIPES / "default.yaml").read_text())
    args = trainer.args
    assert (args.zo_num_queries, args.zo_eps, args.learning_rate) == (
        recipe["zo_num_queries"], recipe["zo_eps"], recipe["learning_rate"])
    eval_results = _json(out / "eval_results.json")
    assert eval_results["eval_samples"] == recipe["max_eval_samples"]
    assert math.isfinite(eval_results["init_eval_loss"]) and math.isfinite(eval_results["eval_loss"])
    # an untrained model with a 4096-token vocabulary starts near ln(4096)
    assert abs(eval_results["init_eval_loss"] - math.log(4096)) < 0.3
    state = _json(out / "trainer_state.json")
    assert state["global_step"] == 2 and state["max_steps"] == 2
    assert math.isfinite(metrics["train_loss"]) and metrics["world_size"] == 1
    assert metrics["trainable_parameters"] == metrics["num_parameters"] == 1_315_968


def test_saved_run_reloads_and_generates(default_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trainer, _ = default_run
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size == 4096

    inputs = tokenizer("The state of the Union is", return_tensors="pt")
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        got = model.eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(generated[0]), str)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)  # the script must set it itself
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/multi_cpu_2proc.yaml"), "--main_process_port", "29517",
           str(RECIPES / "pretrain_zo.py"), "--config", str(RECIPES / "paper/table2_zo_q1.yaml"), "--scale", "cpu",
           "--output_dir", str(out), *TINY, "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Process 0/2" in log, log[-4000:]  # replicas log at warning level only
    results = _json(out / "train_results.json")
    assert results["world_size"] == 2 and results["total_train_batch_size"] == 4
    assert _json(out / "trainer_state.json")["global_step"] == 2
