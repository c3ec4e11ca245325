"""The one training loop, for every stage: teacher fine-tuning, stage 1 (intermediate
layers) and stage 2 (prediction layer) differ only in their ``Objective`` and their
``LoopSettings`` (``workers/stages.py`` builds both from each stage's spec section).

So every stage gets the same optimizer (fused AdamW or TinyBERT's BertAdam, decay on
weights only), learning-rate schedule, precision, batching, evaluation grid, progress
output, cancellation check and non-finite check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from kdsearch.workers.batching import Batching, Encoded, collate
from kdsearch.workers.device import autocast, to_device
from kdsearch.workers.progress import Progress

logger = logging.getLogger(__name__)


class Objective(Protocol):
    """What a stage minimises. ``modules`` are trained with the model (stage 1's
    ``fit_dense``); calling it gives the batch's loss, a float32 scalar."""

    def modules(self) -> list[nn.Module]: ...

    def __call__(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], index: list[int]
    ) -> torch.Tensor: ...


class LabelCrossEntropy:
    """Fine-tuning on the labels (the teacher, when the spec asks for it)."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels  # (N,) int64, the split's labels

    def modules(self) -> list[nn.Module]:
        return []

    def __call__(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], index: list[int]
    ) -> torch.Tensor:
        logits = model(**batch).logits  # (B, C)
        target = self.labels[index].to(logits.device, non_blocking=True)
        return nn.functional.cross_entropy(logits.float(), target)


Schedule = Literal["warmup_linear", "constant"]
OptimizerName = Literal["adamw", "bertadam"]


@dataclass(frozen=True)
class EvalGrid:
    """When a stage evaluates (the pruning probe and checkpoint selection read these).

    ``kdsearch`` (``tinybert=False``): after every ``every``-th optimizer step within an
    epoch and at every epoch end (the last is the final scoring itself). TinyBERT's
    (``task_distill.py``): after the optimizer step ``s`` for which ``(s + 1) % k == 0``
    (one step before each multiple of ``eval_step``), counted over the whole run, and never
    at epoch ends: the final model is a candidate only when it lands on that grid."""

    every: tuple[int, ...] = ()
    tinybert: bool = False

    def due(self, step: int) -> bool:
        """Whether to evaluate after global step ``step`` (1-based), epoch ends aside."""
        if self.tinybert:
            return any((step + 1) % k == 0 for k in self.every)
        return any(step % k == 0 for k in self.every)

    @property
    def at_epoch_ends(self) -> bool:
        return not self.tinybert


@dataclass(frozen=True)
class LoopSettings:
    """The optimisation settings of one stage."""

    learning_rate: float
    batch_size: int
    epochs: int
    weight_decay: float
    warmup_proportion: float = 0.0
    schedule: Schedule = "warmup_linear"
    """warmup_linear: linear warmup, then linear decay to 0 (TinyBERT's stage 2 and
    fine-tuning); constant: no warmup, no decay (TinyBERT's stage 1)."""
    grid: EvalGrid = field(default_factory=EvalGrid)
    optimizer: OptimizerName = "adamw"
    """``adamw``: torch's fused AdamW; ``bertadam``: TinyBERT's BertAdam (``BertAdam``)."""
    dtype: torch.dtype | None = None
    """Autocast dtype of the forward passes (None: fp32); losses are fp32 whatever it is."""
    seed: int = 0
    """The seed of the data order (its own generator: the order depends on it alone)."""
    batching: Batching = field(default_factory=Batching)


class Cancelled(Exception):
    """``FitHooks.cancelled`` said to stop: the run is no longer wanted."""


@dataclass(frozen=True)
class FitHooks:
    """What a stage tells its caller while it trains."""

    on_eval: Callable[[float], None] | None = None
    """``on_eval(epochs_done)`` at every evaluation of the grid (fractional epochs within
    an epoch, e.g. 1.25): an evaluation that may raise to stop training."""
    label: str = "train"
    """Names the stage in progress lines."""
    cancelled: Callable[[], bool] | None = None
    """Asked after every step; True stops the run with ``Cancelled``."""


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, object]]:
    """Decay every weight except biases and LayerNorm (BERT's convention), for the model
    and any module trained with it."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            skip = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
            (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(total_steps: int, settings: LoopSettings) -> Callable[[int], float]:
    """The learning-rate multiplier at each step."""
    if settings.schedule == "constant":
        return lambda step: 1.0
    return linear_warmup_decay(total_steps, settings.warmup_proportion)


def linear_warmup_decay(total_steps: int, warmup_proportion: float) -> Callable[[int], float]:
    """lr multiplier: linear warmup over the first ``warmup_proportion`` of steps, then
    linear decay to 0 (BertAdam's ``warmup_linear``)."""
    warmup = max(1, int(total_steps * warmup_proportion)) if warmup_proportion > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


class BertAdam(torch.optim.Optimizer):
    """TinyBERT's ``BertAdam`` (``transformer/optimization.py``), the optimizer the paper's
    students were trained with. Against AdamW it differs in three ways:

    - no bias correction: the first steps move ``lr * m / (sqrt(v) + eps)`` with m and v
      still near zero, so with few steps (3 epochs of unaugmented RTE) its effective step
      is 2.4-4x larger than AdamW's at the same nominal learning rate;
    - each parameter's gradient is clipped to norm ``max_grad_norm`` (1.0) on its own;
    - the schedule lives in the optimizer and reads the step count *before* the update:
      ``factor(0)`` scales the first step (0 for warmup_linear).

    Weight decay is added to the update (decoupled), as AdamW does. Implemented with
    foreach kernels over every tensor of a group at once, not a Python loop per tensor.
    """

    def __init__(
        self,
        params: list[dict[str, object]],
        lr: float,
        factor: Callable[[int], float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        max_grad_norm: float = 1.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "max_grad_norm": max_grad_norm}
        super().__init__(params, defaults)
        self.factor = factor
        self.steps = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        factor = self.factor(self.steps)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["max_grad_norm"] > 0:  # torch.nn.utils.clip_grad_norm_, per tensor
                norms = torch._foreach_norm(grads)
                coefs = [torch.clamp(group["max_grad_norm"] / (n + 1e-6), max=1.0) for n in norms]
                torch._foreach_mul_(grads, coefs)
            for p in params:
                if not self.state[p]:
                    self.state[p]["next_m"] = torch.zeros_like(p)
                    self.state[p]["next_v"] = torch.zeros_like(p)
            m = [self.state[p]["next_m"] for p in params]
            v = [self.state[p]["next_v"] for p in params]
            beta1, beta2 = group["betas"]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m, denom)
            if group["weight_decay"] > 0:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            torch._foreach_add_(params, update, alpha=-group["lr"] * factor)
        self.steps += 1


def tinybert_factor(total_steps: int, settings: LoopSettings) -> Callable[[int], float]:
    """BertAdam's schedules, of the step count before the update: ``warmup_linear``
    (``progress / warmup`` then ``(progress - 1) / (warmup - 1)``) or ``none``."""
    warmup = settings.warmup_proportion
    if settings.schedule == "constant":
        return lambda step: 1.0

    def factor(step: int) -> float:
        progress = step / total_steps
        if progress < warmup:
            return progress / warmup
        return max((progress - 1.0) / (warmup - 1.0), 0.0)

    return factor


def make_optimizer(
    modules: list[nn.Module], settings: LoopSettings, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The stage's optimizer, and the scheduler to step after it (None: BertAdam schedules
    itself)."""
    groups = param_groups(modules, settings.weight_decay)
    if settings.optimizer == "bertadam":
        factor = tinybert_factor(total_steps, settings)
        return BertAdam(groups, lr=settings.learning_rate, factor=factor), None
    # fused AdamW: one kernel over all parameters; on CPU it is ~10x faster than the
    # default for-loop step, which otherwise dominates a small student's step time
    # (the 30k x 384 embedding table alone is 11.7M parameters).
    optimizer = torch.optim.AdamW(
        groups, lr=settings.learning_rate, eps=1e-6, fused=device.type in ("cpu", "cuda")
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps, settings))
    return optimizer, schedule


def fit(
    model: PreTrainedModel,
    data: Encoded,
    objective: Objective,
    settings: LoopSettings,
    device: torch.device,
    hooks: FitHooks = FitHooks(),
) -> list[float]:
    """Train ``model`` (and the objective's modules) on ``data``. Returns the mean loss of
    each epoch. The model is back in train mode after each evaluation."""
    modules = [model, *objective.modules()]
    for module in modules:
        module.to(device).train()
    batching = settings.batching
    steps_per_epoch = batching.steps_per_epoch(len(data), settings.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{hooks.label}: {len(data)} rows make no full batch of {settings.batch_size}"
        )
    total_steps = steps_per_epoch * settings.epochs
    optimizer, schedule = make_optimizer(modules, settings, total_steps, device)
    # The shuffle has its own generator: the order depends on the seed only.
    generator = torch.Generator().manual_seed(settings.seed)
    grid = settings.grid
    progress = Progress(total_steps, hooks.label)
    try:
        epoch_losses = []
        for epoch in range(settings.epochs):
            loss_sum = torch.zeros((), device=device)
            batches = batching.batches(data, settings.batch_size, generator)
            for in_epoch, index in enumerate(batches, start=1):
                batch = to_device(collate(data, index, batching.pad_to), device)
                with autocast(device, settings.dtype):
                    loss = objective(model, batch, index)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                optimizer.zero_grad(set_to_none=True)
                # Accumulate on the device; reading .item() per step would sync every step.
                loss_sum += loss.detach()
                report = progress.due()
                progress.advance(
                    epoch + 1, settings.epochs, float(loss.detach()) if report else None
                )
                if hooks.cancelled is not None and hooks.cancelled():
                    raise Cancelled(f"{hooks.label}: cancelled at step {progress.step}")
                step = epoch * steps_per_epoch + in_epoch
                # The epoch-end evaluation (kdsearch's grid) comes below.
                at_end = in_epoch == steps_per_epoch and grid.at_epoch_ends
                if hooks.on_eval is not None and grid.due(step) and not at_end:
                    hooks.on_eval(epoch + in_epoch / steps_per_epoch)
                    model.train()
            mean_loss = float(loss_sum) / steps_per_epoch
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"{hooks.label}: loss is {mean_loss} in epoch {epoch + 1}")
            logger.info(
                "%s, epoch %d/%d: loss %.6f", hooks.label, epoch + 1, settings.epochs, mean_loss
            )
            epoch_losses.append(mean_loss)
            if hooks.on_eval is not None and grid.at_epoch_ends:
                hooks.on_eval(float(epoch + 1))
                model.train()
        return epoch_losses
    finally:
        progress.close()
