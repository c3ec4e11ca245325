"""TinyBERT stage 1: intermediate-layer distillation (embeddings, hidden states, attention).

Student layer i (1-based) learns from teacher layer ``i * k`` with ``k = L_t / L_s``
(hidden states; index 0 is the embedding output) and its attention from teacher layer
``i * k`` as well (TinyBERT's ``i*lpb + lpb - 1`` in 0-based layer numbers). Hidden states
go through a learned projection ``fit_dense`` (H_s -> H_t), trained with the student and
dropped afterwards. Loss = attention MSE + hidden-state MSE, constant learning rate, no
warmup (TinyBERT's stage-1 schedule ``none``).

Choice: ``transformers`` returns attention *probabilities*, not TinyBERT's pre-softmax
scores, so the attention term is the MSE between probabilities, over real (unpadded)
query/key pairs only. Probabilities are bounded and need no -100 masking trick; the
term is smaller in scale than TinyBERT's, which the sum with the hidden-state term
tolerates (both are MSEs of O(1e-2)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from kdsearch.service.spec import Stage1Spec
from kdsearch.workers.device import to_device
from kdsearch.workers.distill import Encoded, collate, length_grouped_batches, param_groups
from torch import nn
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerMap:
    """Which teacher layer each student layer learns from."""

    student_layers: int
    teacher_layers: int

    def __post_init__(self) -> None:
        if self.teacher_layers % self.student_layers:
            raise ValueError(
                f"the teacher's {self.teacher_layers} layers must be a multiple of the "
                f"student's {self.student_layers} for TinyBERT's uniform layer mapping"
            )

    @property
    def step(self) -> int:
        return self.teacher_layers // self.student_layers

    def hidden(self) -> list[tuple[int, int]]:
        """(student, teacher) hidden-state indices, 0 = embeddings: i -> i * k."""
        return [(i, i * self.step) for i in range(self.student_layers + 1)]

    def attention(self) -> list[tuple[int, int]]:
        """(student, teacher) attention indices, 0-based: i -> (i + 1) * k - 1."""
        return [(i, (i + 1) * self.step - 1) for i in range(self.student_layers)]


class IntermediateLoss(nn.Module):
    """Attention MSE + hidden-state MSE through the learned projection ``fit_dense``."""

    def __init__(self, layer_map: LayerMap, student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        self.layer_map = layer_map
        self.fit_dense = nn.Linear(student_hidden, teacher_hidden)

    def forward(
        self,
        student_hidden: tuple[torch.Tensor, ...],  # L_s + 1 of (B, T, H_s)
        teacher_hidden: tuple[torch.Tensor, ...],  # L_t + 1 of (B, T, H_t)
        student_attn: tuple[torch.Tensor, ...],  # L_s of (B, heads, T, T)
        teacher_attn: tuple[torch.Tensor, ...],  # L_t of (B, heads, T, T)
        attention_mask: torch.Tensor,  # (B, T), 1 = real token
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (attention loss, hidden-state loss); the caller sums them."""
        tokens = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        n_tokens = tokens.sum()
        rep = sum(
            (((self.fit_dense(student_hidden[s]) - teacher_hidden[t]) ** 2) * tokens).sum()
            / (n_tokens * teacher_hidden[t].shape[-1])
            for s, t in self.layer_map.hidden()
        )
        pairs = tokens * attention_mask.unsqueeze(1).float()  # (B, T, T): real query x key
        pairs = pairs.unsqueeze(1)  # (B, 1, T, T)
        att = torch.zeros((), device=attention_mask.device)
        for s, t in self.layer_map.attention():
            if student_attn[s].shape[1] != teacher_attn[t].shape[1]:
                continue  # different head counts: no head-to-head attention target
            diff = (student_attn[s] - teacher_attn[t]) ** 2 * pairs
            att = att + diff.sum() / (pairs.sum() * student_attn[s].shape[1])
        return att, rep  # type: ignore[return-value]


def distill_intermediate(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    data: Encoded,
    settings: Stage1Spec,
    device: torch.device,
    seed: int,
    pad_id: int,
) -> list[float]:
    """Train the student's embeddings and layers to imitate the teacher's (in place).
    Returns the mean loss of each epoch. Both models need eager attention (so that they
    return attention probabilities)."""
    layer_map = LayerMap(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    loss_fn = IntermediateLoss(layer_map, student.config.hidden_size, teacher.config.hidden_size)
    student.to(device).train()
    teacher.to(device).eval()
    loss_fn.to(device)
    torch.manual_seed(seed)  # fit_dense's initial weights
    optimizer = torch.optim.AdamW(
        [*param_groups(student, settings.weight_decay), {"params": loss_fn.parameters()}],
        lr=settings.learning_rate,
        eps=1e-6,
    )
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(ids) for ids in data.input_ids]
    losses = []
    for epoch in range(settings.epochs):
        total = torch.zeros((), device=device)
        batches = length_grouped_batches(lengths, settings.batch_size, generator)
        for index in batches:
            batch = to_device(collate(data, index, pad_id), device)
            with torch.no_grad():
                # The teacher's hidden states are needed every step (they are large,
                # so unlike stage 2's logits they are not cached).
                t_out = teacher(**batch, output_hidden_states=True, output_attentions=True)
            s_out = student(**batch, output_hidden_states=True, output_attentions=True)
            att, rep = loss_fn(
                s_out.hidden_states, t_out.hidden_states, s_out.attentions, t_out.attentions,
                batch["attention_mask"],
            )  # fmt: skip
            loss = att + rep
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        mean = float(total) / len(batches)
        if not math.isfinite(mean):
            raise FloatingPointError(f"stage-1 loss is {mean} in epoch {epoch + 1}")
        logger.info("stage 1, epoch %d/%d: loss %.6f", epoch + 1, settings.epochs, mean)
        losses.append(mean)
    return losses
