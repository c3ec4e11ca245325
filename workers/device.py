"""Device settings in one place: precision, host-to-device copies, threads, memory."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from kdsearch.service.trial_config import Precision

logger = logging.getLogger(__name__)


def configure(device: torch.device, threads: int | None = None) -> None:
    """Once per process. GPU: TF32 matmuls (fp32 parts of the model run on tensor cores).
    CPU: torch's threads (default: every core; pass fewer when several workers share a
    machine)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(threads or os.cpu_count() or 1)


def bf16_hardware(device: torch.device) -> str | None:
    """What runs bf16 matmuls natively here (a GPU, AMX, AVX512-BF16), or None: without
    it, bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """What training (and the evaluations during it) runs in on this worker: ``auto``
    picks bf16 where the hardware runs it natively, fp32 elsewhere. The teacher's logits,
    its fine-tuning and every trial's final scoring stay in fp32 whatever the choice
    (docs/benchmarks.md measures how far bf16 training moves sigma)."""
    hardware = bf16_hardware(device)
    resolved: Precision = (
        "fp32" if choice == "fp32" or (choice == "auto" and hardware is None) else "bf16"
    )
    logger.info(
        "precision %s on %s: %s (bf16 hardware: %s)",
        choice, device, "bf16 autocast" if resolved == "bf16" else "fp32", hardware or "none",
    )  # fmt: skip
    return resolved


def dtype_of(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a precision (None: fp32, no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    """Autocast to ``dtype`` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned host memory + non-blocking copies on GPU: the copy overlaps compute."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, float]) -> Iterator[None]:
    """Records the peak GPU memory of the block in ``into["peak_memory_mb"]``."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        into["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def pick_device(name: str) -> torch.device:
    """``auto`` (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    from kdsearch.service.errors import KdsearchError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdsearchError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise KdsearchError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KdsearchError(f"--device {name!r} asked for CUDA, but no GPU is visible; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KdsearchError(
                f"--device {name!r}: only {torch.cuda.device_count()} GPUs are visible; "
                "use cuda:0 .. cuda:N-1"
            )
    return device
