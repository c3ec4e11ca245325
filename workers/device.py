"""Device settings in one place: precision, host-to-device copies, threads, memory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def configure(device: torch.device, threads: int | None = None) -> None:
    """Once per process. GPU: TF32 matmuls (fp32 parts of the model run on tensor cores).
    CPU: torch's threads (default: every core; pass fewer when several workers share a
    machine)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(threads or os.cpu_count() or 1)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on GPUs that support it; full precision elsewhere (CPU bf16 is slower
    than fp32 on most CPUs, and the results must match the CPU tests)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
