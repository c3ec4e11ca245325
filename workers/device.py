"""Device settings in one place: precision, host-to-device copies, threads, memory."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

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


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training and of the evaluations during it (None: fp32).
    ``auto`` picks bf16 where the hardware runs it natively, fp32 elsewhere. The teacher's
    logits, its fine-tuning and every trial's final scoring stay in fp32 whatever the
    choice (docs/benchmarks.md measures how far bf16 training moves sigma)."""
    hardware = bf16_hardware(device)
    if precision == "fp32" or (precision == "auto" and hardware is None):
        choice = None
    else:
        choice = torch.bfloat16
    logger.info(
        "precision %s on %s: %s (bf16 hardware: %s)",
        precision, device, "bf16 autocast" if choice else "fp32", hardware or "none",
    )  # fmt: skip
    return choice


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
