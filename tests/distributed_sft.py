"""A short ZO SFT run (TRL's SFTTrainer) under `accelerate launch`, for tests/test_trl.py: rank 0 writes the
logged num_tokens and losses to <out>/log.json."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from datasets import Dataset  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from zo_trainer.tokenizer import train_bpe_tokenizer  # noqa: E402
from zo_trainer.trl import ZOSFTConfig, ZOSFTTrainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--parallel", default="data")
parser.add_argument("--batch", type=int, default=2, help="per-device batch size")
parser.add_argument("--probe", action="store_true", help="a gradient probe at steps 0 and 2 (on the main process)")
cli = parser.parse_args()

texts = [f"the cat number {i} sat on the mat and ate {i % 7} fish" for i in range(48)]
tokenizer = train_bpe_tokenizer(texts, vocab_size=300, model_max_length=64)
args = ZOSFTConfig(output_dir=cli.out, max_steps=3, per_device_train_batch_size=cli.batch, learning_rate=1e-3,
                   logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                   bf16=False, max_length=32, zo_num_queries=2, zo_parallel=cli.parallel,
                   gradient_probe_steps=2 if cli.probe else 0, gradient_probe_draws=2)
trainer = ZOSFTTrainer(model=tiny_llama(vocab_size=len(tokenizer), hidden=32), args=args,
                       train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer)
trainer.train()
if trainer.accelerator.is_main_process:
    logs = [e for e in trainer.state.log_history if "loss" in e]
    with open(os.path.join(cli.out, "log.json"), "w") as f:
        json.dump({key: [e[key] for e in logs] for key in ("num_tokens", "loss", "mean_token_accuracy")}, f)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
