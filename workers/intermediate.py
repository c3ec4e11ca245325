"""TinyBERT stage 1: intermediate-layer distillation (embeddings, hidden states, attention).

Student layer i (1-based) learns from teacher layer ``i * k`` with ``k = L_t / L_s``
(hidden states; index 0 is the embedding output) and its attention from teacher layer
``i * k`` as well (TinyBERT's ``i*lpb + lpb - 1`` in 0-based layer numbers). Hidden states
go through a projection ``fit_dense`` (H_s -> H_t), trained with the student (and started
from the checkpoint's trained ``fit_dense`` when it has one, as TinyBERT's general
checkpoints do). Loss = attention MSE + hidden-state MSE, each summed over the mapped
layers; constant learning rate, no warmup (TinyBERT's stage-1 schedule ``none``).

As TinyBERT, the attention term compares **raw attention scores** (``QK^T / sqrt(d)`` plus
the mask), with masked positions (<= -100) set to 0, and the compared maps are taken
before softmax and dropout: ``SCORES_ATTENTION`` is an attention implementation that
returns the scores instead of the (dropped-out) probabilities transformers returns.

Two ways to match (``stage1.matching``): over the real tokens of length-grouped,
dynamically padded batches (``tokens``), or as TinyBERT (``padded``): batches padded to
max_seq_length, each MSE the mean over every position, padded ones included (a pad
position's hidden state and its attention row are part of the target; masked keys score
0 in both models). The teacher runs in eval mode, or in train mode as TinyBERT left it
(``training.teacher_targets: dropout``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

logger = logging.getLogger(__name__)

SCORES_ATTENTION = "kdsearch_scores"
# TinyBERT: student_att = torch.where(student_att <= -1e2, 0, student_att)
_MASKED = -1e2


def _scores_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, heads, T, d)
    key: torch.Tensor,  # (B, heads, T, d)
    value: torch.Tensor,  # (B, heads, T, d)
    attention_mask: torch.Tensor | None,  # (B, 1, T, T) additive, dtype min where masked
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that returns the raw (pre-softmax, masked) scores as its weights."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, heads, T, T)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, heads, d)
    return output, scores


AttentionInterface.register(SCORES_ATTENTION, _scores_attention)
AttentionMaskInterface.register(SCORES_ATTENTION, eager_mask)


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


Matching = Literal["tokens", "padded"]


class IntermediateLoss(nn.Module):
    """Attention-score MSE + hidden-state MSE through the projection ``fit_dense``."""

    def __init__(
        self,
        layer_map: LayerMap,
        student_hidden: int,
        teacher_hidden: int,
        matching: Matching = "tokens",
    ) -> None:
        super().__init__()
        self.layer_map = layer_map
        self.fit_dense = nn.Linear(student_hidden, teacher_hidden)
        self.matching = matching

    def forward(
        self,
        student_hidden: tuple[torch.Tensor, ...],  # L_s + 1 of (B, T, H_s)
        teacher_hidden: tuple[torch.Tensor, ...],  # L_t + 1 of (B, T, H_t)
        student_scores: tuple[torch.Tensor, ...],  # L_s of (B, heads, T, T), raw scores
        teacher_scores: tuple[torch.Tensor, ...],  # L_t of (B, heads, T, T), raw scores
        attention_mask: torch.Tensor,  # (B, T), 1 = real token
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (attention loss, hidden-state loss); the caller sums them."""
        if self.matching == "padded":
            return self._padded(student_hidden, teacher_hidden, student_scores, teacher_scores)
        tokens = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        n_tokens = tokens.sum()
        rep = torch.zeros((), device=attention_mask.device)
        for s, t in self.layer_map.hidden():
            diff = (self.fit_dense(student_hidden[s].float()) - teacher_hidden[t].float()) ** 2
            rep = rep + (diff * tokens).sum() / (n_tokens * teacher_hidden[t].shape[-1])
        queries = tokens.unsqueeze(1)  # (B, 1, T, 1): real query rows, every key column
        att = torch.zeros((), device=attention_mask.device)
        for s, t in self.layer_map.attention():
            student, teacher = student_scores[s].float(), teacher_scores[t].float()
            if student.shape[1] != teacher.shape[1]:
                continue  # different head counts: no head-to-head attention target
            student = torch.where(student <= _MASKED, torch.zeros_like(student), student)
            teacher = torch.where(teacher <= _MASKED, torch.zeros_like(teacher), teacher)
            n = n_tokens * student.shape[1] * student.shape[-1]
            att = att + ((student - teacher) ** 2 * queries).sum() / n
        return att, rep

    def _padded(
        self,
        student_hidden: tuple[torch.Tensor, ...],
        teacher_hidden: tuple[torch.Tensor, ...],
        student_scores: tuple[torch.Tensor, ...],
        teacher_scores: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TinyBERT's ``MSELoss()`` over whole tensors: every position of the padded batch."""
        mse = nn.functional.mse_loss
        att = torch.zeros((), device=student_hidden[0].device)
        for s, t in self.layer_map.attention():
            student, teacher = student_scores[s].float(), teacher_scores[t].float()
            if student.shape[1] != teacher.shape[1]:
                continue
            student = torch.where(student <= _MASKED, torch.zeros_like(student), student)
            teacher = torch.where(teacher <= _MASKED, torch.zeros_like(teacher), teacher)
            att = att + mse(student, teacher)
        rep = torch.zeros((), device=student_hidden[0].device)
        for s, t in self.layer_map.hidden():
            rep = rep + mse(self.fit_dense(student_hidden[s].float()), teacher_hidden[t].float())
        return att, rep


class IntermediateDistillation:
    """The stage-1 objective: the teacher runs forward every step (its hidden states are
    large, so unlike stage 2's logits they are not cached)."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        matching: Matching = "tokens",
        teacher_dropout: bool = False,
    ) -> None:
        for model, who in ((student, "student"), (teacher, "teacher")):
            if model.config._attn_implementation != SCORES_ATTENTION:
                raise ValueError(f"the {who} must use attn_implementation={SCORES_ATTENTION!r}")
        layer_map = LayerMap(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        self.teacher = teacher
        self.teacher_dropout = teacher_dropout
        self.loss = IntermediateLoss(
            layer_map, student.config.hidden_size, teacher.config.hidden_size, matching
        )

    def modules(self) -> list[nn.Module]:
        return [self.loss]

    def __call__(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], index: list[int]
    ) -> torch.Tensor:
        self.teacher.to(model.device).train(self.teacher_dropout)
        # The student first, then the teacher: TinyBERT's order (see LogitDistillation).
        s_out = model(**batch, output_hidden_states=True, output_attentions=True)
        with torch.no_grad():
            t_out = self.teacher(**batch, output_hidden_states=True, output_attentions=True)
        att, rep = self.loss(
            s_out.hidden_states, t_out.hidden_states, s_out.attentions, t_out.attentions,
            batch["attention_mask"],
        )  # fmt: skip
        return att + rep


def trained_fit_dense(location: str) -> dict[str, torch.Tensor] | None:
    """The ``fit_dense`` projection saved in a TinyBERT-style checkpoint (a folder or hub
    id): its ``weight`` and ``bias``, or None when it has none. Read as plain tensors
    (safetensors, or ``torch.load(weights_only=True)``), never as pickled code."""
    from transformers.utils import cached_file

    def checkpoint(name: str) -> Path | None:
        try:
            found = cached_file(location, name, _raise_exceptions_for_missing_entries=False)
        except Exception:
            return None
        return Path(found) if found else None

    state: dict[str, torch.Tensor] = {}
    if (path := checkpoint("model.safetensors")) is not None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if ".fit_dense." in f".{k}"}
    elif (path := checkpoint("pytorch_model.bin")) is not None:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in loaded.items() if ".fit_dense." in f".{k}"}
    found = {k.rsplit(".", 1)[-1]: v for k, v in state.items()}
    return found if {"weight", "bias"} <= found.keys() else None
