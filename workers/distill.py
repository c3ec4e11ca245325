"""TinyBERT prediction-layer distillation: the loss, the optimizer, the loop, inference.

The same ``fit`` loop also fine-tunes the teacher (with a hard-label loss), so the
optimizer and schedule are identical for both and tested once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from kdsearch.workers.data import Split
from kdsearch.workers.device import autocast, to_device
from kdsearch.workers.progress import Progress
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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


class TrainSettings(Protocol):
    """What ``fit`` needs; both ``Hyperparameters`` and ``FinetuneSpec`` provide it."""

    learning_rate: float
    batch_size: int
    epochs: int
    weight_decay: float
    warmup_proportion: float


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: unpadded token ids (padding happens per batch)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index: list[int]) -> Encoded:
        return Encoded(
            [self.input_ids[i] for i in index],
            None if self.token_type_ids is None else [self.token_type_ids[i] for i in index],
            self.labels[index],
        )


def encode(tokenizer: PreTrainedTokenizerBase, split: Split, max_seq_length: int) -> Encoded:
    enc = tokenizer(
        split.text_a,
        split.text_b,
        truncation=True,
        max_length=max_seq_length,
        padding=False,
    )
    return Encoded(
        input_ids=enc["input_ids"],
        token_type_ids=enc.get("token_type_ids"),
        labels=torch.tensor(split.labels, dtype=torch.long),
    )


def collate(data: Encoded, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the rows in ``index`` to their longest (dynamic padding): (B, L) tensors."""
    length = max(len(data.input_ids[i]) for i in index)
    ids = torch.full((len(index), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), length), dtype=torch.long)
    types = torch.zeros((len(index), length), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
        if data.token_type_ids is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if data.token_type_ids is not None:
        batch["token_type_ids"] = types
    return batch


def length_grouped_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar-length rows: less padding, still random.

    Shuffle, cut into chunks of ``group`` batches, sort each chunk by length, split it
    into batches, then shuffle the batch order. Depends on the generator only.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        rows = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay every weight except biases and LayerNorm (BERT's convention)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def linear_warmup_decay(total_steps: int, warmup_proportion: float) -> Callable[[int], float]:
    """lr multiplier: linear warmup over the first ``warmup_proportion`` of steps, then
    linear decay to 0 (BertAdam's ``warmup_linear``)."""
    warmup = max(1, int(total_steps * warmup_proportion)) if warmup_proportion > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def fit(
    model: PreTrainedModel,
    data: Encoded,
    targets: torch.Tensor,
    loss_fn: nn.Module,
    settings: TrainSettings,
    device: torch.device,
    seed: int,
    pad_id: int,
    on_probe: Callable[[float], None] | None = None,
    probe_every_steps: int | None = None,
    label: str = "train",
) -> list[float]:
    """Train ``model`` on ``data`` against ``targets`` (teacher logits (N, C) for
    distillation, labels (N,) for fine-tuning). Returns the mean loss of each epoch.

    ``on_probe(epochs_done)`` runs after each epoch (1.0, 2.0, ...) and, with
    ``probe_every_steps`` N, also after every N-th optimizer step within an epoch
    (epochs_done fractional, e.g. 1.25), e.g. a probe evaluation that may raise to stop
    training; the model is back in train mode afterwards."""
    model.to(device).train()
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    # fused AdamW: one kernel over all parameters; on CPU it is ~10x faster than the
    # default for-loop step, which otherwise dominates a small student's step time
    # (the 30k x 384 embedding table alone is 11.7M parameters).
    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay),
        lr=settings.learning_rate,
        eps=1e-6,
        fused=device.type in ("cpu", "cuda"),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(total_steps, settings.warmup_proportion)
    )
    # The shuffle has its own generator: the order depends on the seed only.
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(ids) for ids in data.input_ids]
    progress = Progress(total_steps, label)
    try:
        epoch_losses = []
        for epoch in range(settings.epochs):
            loss_sum = torch.zeros((), device=device)
            batches = length_grouped_batches(lengths, settings.batch_size, generator)
            for in_epoch, index in enumerate(batches, start=1):
                batch = to_device(collate(data, index, pad_id), device)
                with autocast(device):
                    logits = model(**batch).logits  # (B, C)
                # The loss upcasts to fp32 itself (SoftCrossEntropy) or is fp32 already.
                loss = loss_fn(logits.float(), targets[index].to(device, non_blocking=True))
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                # Accumulate on the device; reading .item() per step would sync every step.
                loss_sum += loss.detach()
                report = progress.due()
                progress.advance(
                    epoch + 1, settings.epochs, float(loss.detach()) if report else None
                )
                step = epoch * steps_per_epoch + in_epoch
                if (
                    on_probe is not None
                    and probe_every_steps
                    and step % probe_every_steps == 0
                    and in_epoch < steps_per_epoch  # the epoch-end probe comes below
                ):
                    on_probe(epoch + in_epoch / steps_per_epoch)
                    model.train()
            mean_loss = float(loss_sum) / steps_per_epoch
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} in epoch {epoch + 1}")
            logger.info("epoch %d/%d: loss %.6f", epoch + 1, settings.epochs, mean_loss)
            epoch_losses.append(mean_loss)
            if on_probe is not None:
                on_probe(float(epoch + 1))
                model.train()
        return epoch_losses
    finally:
        progress.close()


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel, data: Encoded, batch_size: int, device: torch.device, pad_id: int
) -> torch.Tensor:
    """Logits (N, C) in the split's order. Rows are batched by length (less padding)
    and put back in place."""
    model.to(device).eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    out = torch.empty((len(data), model.config.num_labels), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = to_device(collate(data, index, pad_id), device)
        with autocast(device):
            out[index] = model(**batch).logits.float().cpu()
    return out
