"""TinyBERT stage 2, prediction-layer distillation: the loss, the teacher's targets and the
training objective.

The targets are the teacher's logits on each batch: its eval-mode logits, computed once
per study (``CachedTargets``), or, as TinyBERT ran it (``teacher_model.eval()`` is never
called), a train-mode forward at every step (``DropoutTargets``): the student then fits
the dropout-averaged teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel


class SoftCrossEntropy(nn.Module):
    """TinyBERT's ``soft_cross_entropy(z_S / T, z_T / T)``.

    ``mean(-softmax(z_T / T) * log_softmax(z_S / T))``: the mean runs over the batch *and*
    the classes (so it is the usual soft CE divided by C), with no T^2 factor and no
    hard-label term, exactly as the paper's authors trained their students.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 but got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        # (B, C) each; float32 upcast keeps log_softmax stable under bf16 autocast.
        t = self.temperature
        target = F.softmax(teacher_logits.float() / t, dim=-1)
        log_probs = F.log_softmax(student_logits.float() / t, dim=-1)
        return (-target * log_probs).mean()


class CachedTargets:
    """The teacher's eval-mode logits on the training rows, computed once per study."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits  # (N, C), rows of the training split

    def __call__(self, batch: dict[str, torch.Tensor], index: list[int]) -> torch.Tensor:
        return self.logits[index]


class DropoutTargets:
    """The teacher's logits on the batch, in train mode (dropout on): a forward pass at
    every step, under ``no_grad`` and the step's autocast (nothing of it is trained)."""

    def __init__(self, teacher: PreTrainedModel) -> None:
        self.teacher = teacher

    def __call__(self, batch: dict[str, torch.Tensor], index: list[int]) -> torch.Tensor:
        self.teacher.train()
        with torch.no_grad():
            return self.teacher(**batch).logits  # (B, C)


class LogitDistillation:
    """The stage-2 objective: the student's logits against the teacher's targets."""

    def __init__(self, targets: CachedTargets | DropoutTargets, temperature: float) -> None:
        self.targets = targets
        self.loss = SoftCrossEntropy(temperature)

    def modules(self) -> list[nn.Module]:
        return []

    def __call__(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], index: list[int]
    ) -> torch.Tensor:
        # The student first, then the teacher: TinyBERT's order (their dropout masks come
        # from one generator, so the order decides which mask each gets).
        logits = model(**batch).logits  # (B, C)
        target = self.targets(batch, index).to(logits.device, non_blocking=True)
        return self.loss(logits, target)
