"""The causal-LM loss a chunk of tokens at a time, so that a ZO probe forward never holds the full logits.

Without a backward nothing needs the logits once the loss is known, yet they (tokens x vocabulary floats) and the
loss's log-softmax of the same size set the peak of a small model's forward: 8 x 256 tokens at a 32k vocabulary
are 262 MB each. `ChunkedLoss` replaces, for one forward, the LM head's forward by one that computes the summed
cross-entropy of a chunk of tokens at a time from the final hidden states (calling the head's own forward on each
chunk, so the perturbed weight the ZO engine swaps in is the one used) and returns an empty ``(..., 0)`` logits
tensor; the model's ``loss_function`` then divides that sum as transformers' ``ForCausalLMLoss`` does (by
``num_items_in_batch`` or by the count of labels that are not -100).

It holds for a model whose head is a plain `nn.Linear` and whose loss is ``loss_function(logits, labels, ...)`` of
the head's very output: a model that scales or caps the logits first (Gemma 2, Cohere) or computes its loss inline
makes the chunked forward raise. `check` runs it against the model's own loss on a batch, and `ZOTrainer` uses it
only where it ran and they agree to float tolerance.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100
CHUNK_LOGITS_BYTES = 4 * 2**20  # float32 logits of one chunk: fastest on CPU (8192-word vocabulary, 2 cores)
WRAPPED_HEAD_CALLS = 4  # a head whose forward is replaced on the instance (the engine's blocks draw it whole per call)


def plain_linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head where it is a plain `nn.Linear` (not a subclass with its own forward), else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward else None


class ChunkedLoss:
    """Context of one forward of ``model`` on a batch with ``labels``: the head computes the loss in chunks."""

    def __init__(self, model: nn.Module, labels: torch.Tensor):
        get_base = getattr(model, "get_base_model", None)  # a PEFT model: the transformers model calls the loss
        self.model, self.labels = get_base() if callable(get_base) else model, labels
        self.head = plain_linear_head(model)
        if self.head is None:
            raise ValueError(f"{type(model).__name__} has no plain nn.Linear output embedding to chunk the loss of")
        self.summed: torch.Tensor | None = None  # the cross-entropy summed over the labelled tokens, once computed
        self.counted: torch.Tensor | None = None
        self.placeholder: torch.Tensor | None = None  # the empty logits the head returned in their place
        self.used = False  # the model's loss_function divided the sum

    def __enter__(self):
        self.own_forward = vars(self.head).get("forward")
        self.head_forward = self.head.forward  # the engine's blocks of a large head, or the class's
        self.head.forward = self._head_forward
        self.own_loss = vars(self.model).get("_loss_function")
        self.loss_function = self.model.loss_function
        self.model.loss_function = self._loss_function
        return self

    def __exit__(self, *exc):
        if self.own_forward is None:
            del self.head.forward
        else:
            self.head.forward = self.own_forward
        if self.own_loss is None:
            del self.model._loss_function
        else:
            self.model._loss_function = self.own_loss
        if exc[0] is None and self.summed is not None and not self.used:
            raise RuntimeError("the model did not pass its head's logits to its loss_function: its loss cannot be "
                               "computed in chunks (zo_chunked_loss=False)")

    def _head_forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.summed is not None or hidden.shape[:-1] != self.labels.shape:
            return self.head_forward(hidden, *args, **kwargs)  # not the call the loss is of: the logits, as usual
        labels = F.pad(self.labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        calls = WRAPPED_HEAD_CALLS if self.own_forward is not None else len(hidden)
        rows = max(CHUNK_LOGITS_BYTES // (4 * self.head.out_features), -(-len(hidden) // calls), 1)
        summed = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(hidden), rows):
            logits = self.head_forward(hidden[start : start + rows]).float()
            summed += F.cross_entropy(logits, labels[start : start + rows], ignore_index=IGNORE_INDEX, reduction="sum")
        self.summed, self.counted = summed, (labels != IGNORE_INDEX).sum()
        self.placeholder = hidden.new_empty((*self.labels.shape, 0))
        return self.placeholder

    def _loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                       shift_labels=None, **kwargs):
        if self.summed is None:  # the head ran as usual
            return self.loss_function(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                      ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if logits is not self.placeholder:
            raise RuntimeError("the model transforms its head's logits before its loss (scales or caps them): its "
                               "loss cannot be computed in chunks (zo_chunked_loss=False)")
        if labels is not self.labels or ignore_index != IGNORE_INDEX or shift_labels is not None:
            raise RuntimeError(
                "the chunked loss was computed from the batch's labels, but the model's loss was asked for other "
                "labels (or shift_labels, or another ignore_index): set zo_chunked_loss=False for this model")
        self.used = True
        if num_items_in_batch is None:
            return self.summed / self.counted
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(self.summed.device)
        return self.summed / num_items_in_batch


def check(loss_fn, model: nn.Module) -> str | None:
    """Why `ChunkedLoss` cannot stand in for ``model``'s own loss (None where it can): ``loss_fn(chunked)`` is
    computed once each way on one batch and compared to float tolerance, or the chunked forward raised."""
    if plain_linear_head(model) is None:
        return "its output embedding is not a plain nn.Linear"
    with torch.no_grad():
        own = loss_fn(False)
        try:
            chunked = loss_fn(True)
        except Exception as e:  # noqa: BLE001 - any failure means the model computes its loss otherwise
            return f"the chunked forward raised {type(e).__name__}: {e}"
    own, chunked = own.detach().double().item(), chunked.detach().double().item()
    relative = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-3  # half precision: its rounding
    if not abs(chunked - own) <= relative * max(1.0, abs(own)):
        return f"its loss is not the cross-entropy of the head's logits (chunked {chunked:.6g}, its own {own:.6g})"
    return None
