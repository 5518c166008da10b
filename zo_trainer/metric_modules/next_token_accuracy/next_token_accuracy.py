"""Next-token accuracy of a causal LM: the share of targets that the argmax of the previous position predicts.

A local `evaluate` module, so `evaluate.load(<this dir>)` works offline.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Position t of `predictions` (argmax token ids) is scored against position t+1 of `references`
(the input ids / labels of the same sequence), skipping references equal to `ignore_index` (default -100)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): argmax token id at every position of each sequence.
    references (list of list of int): labels of each sequence, same lengths as `predictions`.
    ignore_index (int): label value that is not scored. Default -100.
Returns:
    accuracy (float): correct / scored targets; nan when no target is scored.
Example:
    >>> metric = evaluate.load("zo_trainer/metric_modules/next_token_accuracy")
    >>> metric.compute(predictions=[[5, 6, 0]], references=[[4, 5, 7]])
    {'accuracy': 0.5}
"""


class NextTokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, ignore_index=-100):
        predicted, targets = [], []
        for row, (pred, ref) in enumerate(zip(predictions, references)):
            if len(pred) != len(ref):
                raise ValueError(f"Sequence {row}: {len(pred)} predictions but {len(ref)} references.")
            predicted.append(np.asarray(pred[:-1], dtype=np.int64))
            targets.append(np.asarray(ref[1:], dtype=np.int64))
        predicted, targets = np.concatenate(predicted), np.concatenate(targets)
        scored = targets != ignore_index
        n_scored = int(scored.sum())
        accuracy = float((predicted[scored] == targets[scored]).sum() / n_scored) if n_scored else float("nan")
        return {"accuracy": accuracy}
