"""Evaluation metrics for `transformers.Trainer`, as in run_clm.py: next-token accuracy and perplexity.

Logits are reduced to argmax ids on the fly (`preprocess_logits_for_metrics`), so evaluation never
holds a `N x T x V` array.
"""

import functools
import math
from pathlib import Path

import evaluate
import numpy as np
import torch

NEXT_TOKEN_ACCURACY = Path(__file__).parent / "metric_modules" / "next_token_accuracy"


@functools.cache
def next_token_accuracy_metric() -> evaluate.Metric:
    """The local module (`metric_modules/next_token_accuracy`), loaded once; needs no network."""
    return evaluate.load(str(NEXT_TOKEN_ACCURACY))


def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(logits, tuple):  # models that return extra outputs
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_preds) -> dict[str, float]:
    """`{"accuracy": ...}` from argmax ids and labels; labels of -100 (padding) are skipped."""
    predictions, labels = eval_preds
    return next_token_accuracy_metric().compute(predictions=np.asarray(predictions), references=np.asarray(labels))


def perplexity(eval_loss: float) -> float:
    """exp of the mean eval cross-entropy; inf when that overflows (early, diverged or ZO-stalled runs)."""
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return math.inf
