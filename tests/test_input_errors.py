"""`python recipes/pretrain_zo.py ...` as a user runs it, with bad input: refused at once, by name, no traceback.

Each case is a real subprocess (about 7 s, most of it importing torch and transformers), so only one of each
kind is here; every case is tested in process in test_recipes.py (settings) and test_data.py (data files).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes/pretrain_zo.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status 1 and a message saying why on stderr, without a traceback, before any tokenizer work."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "pretrain_zo.py: error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-4000:])
    assert "byte-level BPE" not in proc.stdout and "Tokenizing" not in proc.stderr


def test_duplicate_yaml_key(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("zo_num_queries: 4\nlearning_rate: 0.001\nlearning_rate: 0.1\n")
    out = tmp_path / "run"
    assert_refused(pretrain("--config", str(config), "--output_dir", str(out)),
                   str(config), "duplicate key 'learning_rate' (first set on line 2)", "line 3")
    assert not out.exists()


def test_block_size_above_the_models_positions(tmp_path):
    out = tmp_path / "run"
    assert_refused(pretrain("--scale", "cpu", "--block_size", "4096", "--output_dir", str(out)),
                   "block_size=4096 (set on the command line) exceeds the model's max_position_embeddings=2048",
                   "block_size must be <= 2048")
    assert not out.exists()


def test_a_utf16_data_file(tmp_path):
    data = tmp_path / "speeches.txt"
    data.write_text("Mr. Speaker, Mr. President.\n\nThe state of the Union is strong.\n", encoding="utf-16")
    out = tmp_path / "run"
    assert_refused(pretrain("--scale", "cpu", "--train_files", str(data), "--output_dir", str(out)),
                   f"{data}: UTF-16 text", "convert it, e.g. `iconv -f UTF-16 -t utf-8`", "Data files must be UTF-8")
    assert not (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
