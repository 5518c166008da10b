"""How good is the ZO gradient? Compare SPSA estimates with the backprop gradient (paper §3.2, Fig. 4).

Three layers, each usable alone:

- :class:`GradientStats`: running statistics of K gradient estimates (flat vectors) against a
  reference gradient. Welford updates, so memory is two vectors of the gradient's size whatever K is.
- :func:`compare_to_backprop`: the backprop gradient of the trainable parameters on one batch, then
  K ZO estimates with an estimator's settings, fed to :class:`GradientStats`; returns a
  :class:`GradientReport`. Plain PyTorch, no Trainer needed.
- :class:`GradientProbeCallback`: runs :func:`compare_to_backprop` inside a ``ZOTrainer`` run every
  N optimizer steps on a fixed batch and logs ``probe/*`` metrics; off by default::

      trainer.add_callback(GradientProbeCallback(trainer, every_steps=100, num_draws=8))

The statistics:

- ``fo_mean``/``fo_var``: mean and variance of the entries of the backprop gradient g;
- ``zo_mean``/``zo_var``: the same over all entries of all K estimates ĝ_k (the paper's Fig. 4 and
  the "Variance" columns of Tables 3–4 are this kind of number: the spread of gradient entries);
- ``var_ratio`` = zo_var / fo_var (the paper reports ~1000 for q = 1, ~100 for q = 20);
- ``cosine``: mean over draws of cos(ĝ_k, g); ``rel_error``: mean over draws of ‖ĝ_k − g‖ / ‖g‖;
- ``estimate_var``: the estimator's variance proper, the per-entry variance across the K draws
  (unbiased, ddof = 1) averaged over entries. For SPSA with Gaussian z it is (‖g‖² + g_i²)/q on
  average, so it falls as 1/q with the mean reduction;
- ``mean_rel_error``: ‖mean_k ĝ_k − g‖ / ‖g‖, which shrinks as 1/√K for an unbiased estimator.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .zo.rng import RngState

try:  # the pure layer works without transformers; the callback needs it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object

__all__ = ["GradientReport", "GradientStats", "compare_to_backprop", "GradientProbeCallback", "PROBE_STEP_BASE"]

PROBE_STEP_BASE = 1 << 40
"""Probe directions use direction steps from here on, far beyond any training step: a probe never
redraws a direction that training uses (directions are a function of (seed, step, query, name))."""


@dataclass
class GradientReport:
    """Statistics of K gradient estimates against the backprop gradient (see the module docstring)."""

    num_entries: int
    num_draws: int
    fo_mean: float
    fo_var: float
    zo_mean: float
    zo_var: float
    cosine: float
    rel_error: float
    estimate_var: float
    mean_rel_error: float
    fo_sample: np.ndarray | None = None  # subsampled entries of g, for histograms
    zo_sample: np.ndarray | None = None  # the same indices in every draw, draws concatenated

    @property
    def var_ratio(self) -> float:
        return self.zo_var / self.fo_var if self.fo_var > 0 else math.inf

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Scalar metrics (no samples), keys prefixed, e.g. ``metrics("probe/")`` for ``trainer.log``."""
        values = {k: v for k, v in asdict(self).items() if k not in ("fo_sample", "zo_sample")}
        values["var_ratio"] = self.var_ratio
        return {prefix + k: (float(v) if not isinstance(v, int) else v) for k, v in values.items()}


class GradientStats:
    """Running statistics of flat gradient estimates, optionally against a reference gradient.

    ``update(estimate)`` takes one flat vector (any float dtype; kept as float32). Memory: the
    reference plus two running vectors (Welford mean and sum of squared deviations), whatever the
    number of draws. ``sample_indices`` (a LongTensor) selects entries kept from each draw for
    histograms. Without a reference, ``cosine``/``rel_error``/``fo_*`` are NaN.
    """

    def __init__(self, reference: torch.Tensor | None = None, sample_indices: torch.Tensor | None = None):
        self.reference = None if reference is None else reference.detach().reshape(-1).float()
        self.sample_indices = sample_indices
        self.count = 0
        self.mean: torch.Tensor | None = None  # per-entry running mean
        self.m2: torch.Tensor | None = None  # per-entry running sum of squared deviations
        # pooled over all entries of all draws (Chan's parallel combination, float64 scalars)
        self._entries = 0
        self._entry_mean = 0.0
        self._entry_m2 = 0.0
        self._cosines: list[float] = []
        self._rel_errors: list[float] = []
        self._samples: list[np.ndarray] = []
        if self.reference is not None:
            self._ref_norm = torch.linalg.vector_norm(self.reference).item()

    @property
    def num_entries(self) -> int:
        if self.reference is not None:
            return self.reference.numel()
        return 0 if self.mean is None else self.mean.numel()

    @torch.no_grad()
    def update(self, estimate: torch.Tensor) -> None:
        x = estimate.detach().reshape(-1).float()
        if self.num_entries and x.numel() != self.num_entries:
            raise ValueError(f"estimate has {x.numel()} entries, expected {self.num_entries}")
        self.count += 1
        if self.mean is None:
            self.mean = x.clone()
            self.m2 = torch.zeros_like(x)
        else:
            delta = x - self.mean
            self.mean.add_(delta, alpha=1.0 / self.count)
            self.m2.addcmul_(delta, x - self.mean)
            del delta
        var, mean = torch.var_mean(x, correction=0)
        n, mean, m2 = x.numel(), mean.item(), var.item() * x.numel()
        total = self._entries + n
        d = mean - self._entry_mean
        self._entry_mean += d * n / total
        self._entry_m2 += m2 + d * d * self._entries * n / total
        self._entries = total
        if self.reference is not None:
            norm = torch.linalg.vector_norm(x).item()
            dot = torch.dot(x, self.reference).item()
            denom = norm * self._ref_norm
            self._cosines.append(dot / denom if denom > 0 else math.nan)
            # ‖x − g‖² = ‖x‖² − 2 x·g + ‖g‖², without a temporary (clamped against rounding)
            err = math.sqrt(max(norm * norm - 2 * dot + self._ref_norm**2, 0.0))
            self._rel_errors.append(err / self._ref_norm if self._ref_norm > 0 else math.nan)
        if self.sample_indices is not None:
            self._samples.append(x[self.sample_indices].cpu().numpy())

    # --------------------------------------------------------------------------------- results
    @property
    def variance(self) -> torch.Tensor:
        """Per-entry variance across draws (ddof = 1; zeros with a single draw)."""
        if self.m2 is None:
            raise ValueError("no estimate was given to update()")
        return self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)

    @property
    def estimate_var(self) -> float:
        return self.variance.double().mean().item()

    @property
    def zo_mean(self) -> float:
        return self._entry_mean

    @property
    def zo_var(self) -> float:
        """Variance (ddof = 0) of all entries of all draws pooled."""
        return self._entry_m2 / self._entries if self._entries else math.nan

    @property
    def cosine(self) -> float:
        return float(np.mean(self._cosines)) if self._cosines else math.nan

    @property
    def rel_error(self) -> float:
        return float(np.mean(self._rel_errors)) if self._rel_errors else math.nan

    @property
    def mean_rel_error(self) -> float:
        if self.reference is None or self.mean is None or self._ref_norm == 0:
            return math.nan
        return (torch.linalg.vector_norm(self.mean - self.reference) / self._ref_norm).item()

    def report(self) -> GradientReport:
        if self.count == 0:
            raise ValueError("no estimate was given to update()")
        if self.reference is not None:
            fo_var, fo_mean = (t.item() for t in torch.var_mean(self.reference.double(), correction=0))
        else:
            fo_var = fo_mean = math.nan
        fo_sample = None
        if self.sample_indices is not None and self.reference is not None:
            fo_sample = self.reference[self.sample_indices].cpu().numpy()
        return GradientReport(
            num_entries=self.num_entries,
            num_draws=self.count,
            fo_mean=fo_mean,
            fo_var=fo_var,
            zo_mean=self.zo_mean,
            zo_var=self.zo_var,
            cosine=self.cosine,
            rel_error=self.rel_error,
            estimate_var=self.estimate_var,
            mean_rel_error=self.mean_rel_error,
            fo_sample=fo_sample,
            zo_sample=np.concatenate(self._samples) if self._samples else None,
        )


def sample_indices(num_entries: int, sample_entries: int, seed: int = 0, device="cpu") -> torch.Tensor | None:
    """A fixed random subset of ``min(sample_entries, num_entries)`` sorted indices (None for 0)."""
    if sample_entries <= 0:
        return None
    if sample_entries >= num_entries:
        return torch.arange(num_entries, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_entries, generator=g)[:sample_entries].sort().values.to(device)


def compare_to_backprop(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    estimator,
    num_draws: int,
    step_offset: int = PROBE_STEP_BASE,
    sample_entries: int = 0,
    sample_seed: int = 0,
) -> GradientReport:
    """Backprop gradient vs ``num_draws`` ZO estimates of the trainable parameters on one batch.

    ``loss_fn()`` runs the forward on the batch and returns a scalar loss (as for
    ``ZOEstimator.probe``); ``estimator`` is a ``ZOEstimator`` on ``model`` whose settings (q, ε,
    reduction, distribution, α, seed) are used as is. Draw k uses direction step ``step_offset + k``.

    Every forward (backprop and probes) starts from the same global RNG state, so dropout masks are
    shared; the RNG state, the weights and each parameter's ``.grad`` are left exactly as found.
    Cost: one forward+backward, then per draw 2q forwards (central) and one regeneration of the q
    directions to materialise ĝ. Memory: a flat copy of g, the running statistics (two vectors of
    g's size) and one estimate at a time.
    """
    if not (isinstance(num_draws, int) and num_draws >= 1):
        raise ValueError(f"num_draws={num_draws!r} must be an integer >= 1")
    params = [p for _, p in estimator.trainable()]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: there is nothing to compare")
    device = params[0].device
    rng = RngState(device)

    saved_grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            loss.backward()
        del loss
        fo = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        for p in params:
            p.grad = None
        stats = GradientStats(fo, sample_indices(fo.numel(), sample_entries, sample_seed, fo.device))
        for k in range(num_draws):
            rng.restore()
            probe = estimator.probe(loss_fn, step_offset + k)
            stats.update(_materialise(estimator, step_offset + k, estimator.coefficients(probe.projected_grads), params))
        return stats.report()
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        rng.restore()


@torch.no_grad()
def _materialise(estimator, step: int, coefficients: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """ĝ = Σ c_k z_k as one flat vector: ``write_grad`` into ``.grad`` views of a single buffer."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) == 1 and all(p.is_contiguous() for p in params):
        flat = torch.zeros(sum(p.numel() for p in params), dtype=dtypes.pop(), device=params[0].device)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    else:
        flat = None
        for p in params:
            p.grad = None
    estimator.write_grad(step, coefficients, params)
    if flat is None:
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    for p in params:
        p.grad = None
    return flat.float()


class MetricsOfThisProcess:
    """Forwards whose metrics must not be gathered across processes: the gradient probe (it runs on the main
    process only, so a gather inside compute_loss, as TRL's token counts, would wait forever) and query-parallel
    probes (each process already holds the global batch, which a gather would count once per process).
    `gather_for_metrics` gives back this process's value, as on one process, and runs no collective."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __enter__(self):
        self.accelerator.gather_for_metrics = self._as_on_one_process
        return self

    def __exit__(self, *exc):
        del self.accelerator.gather_for_metrics

    @staticmethod
    def _as_on_one_process(data, use_gather_object=False):
        if torch.is_tensor(data):
            return data[None] if data.dim() == 0 else data
        return [data] if use_gather_object else data


class GradientProbeCallback(TrainerCallback):
    """Log how the run's ZO estimate compares with backprop, every ``every_steps`` optimizer steps.

    Off by default: add it to a trainer (``trainer.add_callback(GradientProbeCallback(trainer, 100))``).
    At train begin (step 0) and every ``every_steps`` steps it runs :func:`compare_to_backprop`
    with the run's estimator (``trainer.zo_estimator``: its q, ε, reduction, distribution, α and
    seed; the parameters trainable at that moment) on a FIXED batch: the first ``batch_size``
    (default ``per_device_train_batch_size``) rows of the eval dataset, else the train dataset,
    collated once with ``trainer.data_collator`` (the train dataloader is never touched, so data
    order and exact resume are unchanged). Probe draws use direction steps from
    :data:`PROBE_STEP_BASE`, never a training step's directions. The model is put in train mode
    (dropout as in training, masks shared by backprop and probes) and every module's mode restored.

    It does not change the training trajectory: the global RNG state, the weights and ``.grad`` are
    restored exactly. It logs ``probe/<metric>`` (fo_mean, fo_var, zo_mean, zo_var, var_ratio,
    cosine, rel_error, estimate_var, mean_rel_error, num_entries, num_draws) with ``trainer.log``.
    With ``save_histograms`` it writes ``<output_dir>/gradient_probe/step-<N>.npz`` holding arrays
    ``FO`` and ``ZO q=<q>`` (at most ``sample_entries`` entries of each draw, the same indices), for
    ``plot_gradient_density`` or ``zo-trainer plot density``.

    Cost per probe: one forward+backward plus ``num_draws``·2q forwards (central estimator) and
    ``num_draws`` regenerations of the q directions; memory: one gradient-sized vector (g) plus two
    running-statistic vectors and one estimate at a time (and the backward's activations, which a ZO
    run otherwise never needs: the probe can run out of memory where training does not). Only the
    main process probes.
    """

    def __init__(
        self,
        trainer,
        every_steps: int,
        num_draws: int = 8,
        save_histograms: bool = False,
        batch_size: int | None = None,
        sample_entries: int = 200_000,
    ):
        if not (isinstance(every_steps, int) and every_steps >= 1):
            raise ValueError(f"every_steps={every_steps!r} must be an integer >= 1")
        if not (isinstance(num_draws, int) and num_draws >= 1):
            raise ValueError(f"num_draws={num_draws!r} must be an integer >= 1")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        self.trainer = trainer
        self.every_steps = every_steps
        self.num_draws = num_draws
        self.save_histograms = save_histograms
        self.batch_size = batch_size
        self.sample_entries = sample_entries
        self._batch = None
        self.reports: dict[int, GradientReport] = {}  # the last reports, by step (samples dropped)

    # ---------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.probe(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps == 0:
            self.probe(state.global_step)

    # ----------------------------------------------------------------------------------- probe
    def probe_batch(self) -> dict:
        """The fixed probe batch (built on first use), on the trainer's device."""
        if self._batch is None:
            trainer = self.trainer
            dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
            if isinstance(dataset, dict):  # several eval datasets: the first
                dataset = next(iter(dataset.values()))
            if dataset is None:
                raise ValueError("GradientProbeCallback needs a train_dataset or eval_dataset to build its probe batch")
            size = self.batch_size or trainer.args.per_device_train_batch_size
            try:
                import datasets

                if isinstance(dataset, datasets.Dataset):
                    dataset = trainer._remove_unused_columns(dataset, description="gradient probe")
            except ImportError:  # pragma: no cover
                pass
            if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
                rows = [dataset[i] for i in range(min(size, len(dataset)))]
            else:  # an iterable dataset: a fresh iterator, independent of the train dataloader's
                import itertools

                rows = list(itertools.islice(iter(dataset), size))
            if not rows:
                raise ValueError("the probe dataset is empty")
            self._batch = trainer._prepare_inputs(trainer.data_collator(rows))
        return self._batch

    def probe(self, step: int) -> GradientReport | None:
        trainer = self.trainer
        if not trainer.is_world_process_zero():
            return None
        model, estimator = trainer.model, trainer.zo_estimator
        batch = self.probe_batch()
        modes = {m: m.training for m in model.modules()}
        device = next(model.parameters()).device
        rng = RngState(device)

        def loss_fn() -> torch.Tensor:
            with trainer.recording_nothing(), trainer.compute_loss_context_manager(), \
                    MetricsOfThisProcess(trainer.accelerator):
                return trainer.compute_loss(model, dict(batch))

        try:
            model.train()
            report = compare_to_backprop(
                model,
                loss_fn,
                estimator,
                self.num_draws,
                step_offset=PROBE_STEP_BASE + step * self.num_draws,
                sample_entries=self.sample_entries if self.save_histograms else 0,
            )
        finally:
            for m, mode in modes.items():
                m.training = mode
            rng.restore()
        if self.save_histograms:
            folder = os.path.join(trainer.args.output_dir, "gradient_probe")
            os.makedirs(folder, exist_ok=True)
            np.savez(
                os.path.join(folder, f"step-{step}.npz"),
                **{"FO": report.fo_sample, f"ZO q={estimator.num_queries}": report.zo_sample},
            )
        report.fo_sample = report.zo_sample = None
        self.reports[step] = report
        logs = report.metrics("probe/")
        logs["probe/num_queries"] = estimator.num_queries
        # Trainer.log resets control.should_log: keep the loop's own decision to log the training loss
        control = getattr(trainer, "control", None)
        should_log = getattr(control, "should_log", None)
        from transformers import Trainer

        Trainer.log(trainer, logs)  # not a subclass's log: TRL's adds (and clears) the metrics of the training steps
        if control is not None and should_log is not None:
            control.should_log = should_log
            trainer.control.should_log = should_log
        return report
