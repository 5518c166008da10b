import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from zo_trainer.metrics import (
    NEXT_TOKEN_ACCURACY,
    compute_metrics,
    next_token_accuracy_metric,
    perplexity,
    preprocess_logits_for_metrics,
)


def naive_next_token_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    correct = scored = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                scored += 1
                correct += int(np.argmax(logits[b, t]) == labels[b, t + 1])
    return correct / scored


def test_accuracy_equals_naive_loop_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 20, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (6, 20))
    labels[0, 5:] = -100  # padding of a short final batch
    labels[3, :8] = -100
    predictions = preprocess_logits_for_metrics((torch.from_numpy(logits),), torch.from_numpy(labels))
    accuracy = compute_metrics((predictions.numpy(), labels))["accuracy"]
    assert accuracy == pytest.approx(naive_next_token_accuracy(logits, labels))
    assert 0.05 < accuracy < 0.35  # chance is 1/7: the shift is there, nothing is leaked


def test_metric_module_edge_cases():
    metric = next_token_accuracy_metric()
    assert metric.compute(predictions=[[5, 6, 0]], references=[[4, 5, 7]])["accuracy"] == 0.5
    assert math.isnan(metric.compute(predictions=[[1, 2]], references=[[-100, -100]])["accuracy"])
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        metric.compute(predictions=[[1, 2, 3]], references=[[1, 2]])


def test_metric_module_loads_offline_in_a_fresh_process(tmp_path):
    code = (f"import evaluate; m = evaluate.load({str(NEXT_TOKEN_ACCURACY)!r}); "
            "print(m.compute(predictions=[[1, 2, 3]], references=[[0, 1, 0]]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "{'accuracy': 0.5}" in result.stdout


def test_trainer_evaluate_reports_the_models_accuracy_and_loss(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    blocks = torch.randint(0, 50, (5, 12))
    eval_dataset = [{"input_ids": ids, "labels": ids} for ids in blocks]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=eval_dataset, compute_metrics=compute_metrics,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    metrics = trainer.evaluate()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    assert metrics["eval_accuracy"] == pytest.approx(naive_next_token_accuracy(logits.numpy(), blocks.numpy()))
    mean_loss = np.mean([model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks])
    assert perplexity(metrics["eval_loss"]) == pytest.approx(math.exp(mean_loss), rel=1e-4)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e4) == math.inf
