"""TinyBERT stage 2, prediction-layer distillation: the loss and its training objective."""

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


class LogitDistillation:
    """The stage-2 objective: the student's logits against the teacher's, which are fixed
    during distillation and so computed once per study (``teacher_logits``), never per step."""

    def __init__(self, teacher_logits: torch.Tensor, temperature: float) -> None:
        self.teacher_logits = teacher_logits  # (N, C), rows of the training split
        self.loss = SoftCrossEntropy(temperature)

    def modules(self) -> list[nn.Module]:
        return []

    def __call__(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], index: list[int]
    ) -> torch.Tensor:
        logits = model(**batch).logits  # (B, C)
        target = self.teacher_logits[index].to(logits.device, non_blocking=True)
        return self.loss(logits, target)
