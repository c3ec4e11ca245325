"""Inference: a model's logits on a split, and the probabilities every metric reads."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from kdsearch.workers.batching import Encoded, collate
from kdsearch.workers.device import autocast, to_device
from kdsearch.workers.progress import Progress


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """Softmax at T = 1 (the paper's confidence), as a float NumPy array: (N, C)."""
    return torch.softmax(logits.float(), dim=-1).numpy()


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel,
    data: Encoded,
    device: torch.device,
    batch_size: int,
    label: str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits (N, C), float32, in the split's order. Rows are batched by length (less
    padding) and put back in place. ``dtype``: autocast (None: fp32). With ``label``,
    progress is reported (long passes: the teacher over a full GLUE train split)."""
    model.to(device).eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    out = torch.empty((len(data), model.config.num_labels), dtype=torch.float32)
    starts = range(0, len(order), batch_size)
    progress = Progress(len(starts), label) if label else None
    try:
        for start in starts:
            index = order[start : start + batch_size]
            batch = to_device(collate(data, index), device)
            with autocast(device, dtype):
                out[index] = model(**batch).logits.float().cpu()
            if progress is not None:
                progress.advance()
    finally:
        if progress is not None:
            progress.close()
    return out
