"""Which GPU a worker takes: one per worker, or ``slots`` workers sharing each GPU.

Runs before torch is imported: the claim sets ``CUDA_VISIBLE_DEVICES`` so the worker's
process only ever sees (and initialises CUDA on) its own GPU. Claims are ``flock`` locks
on files in a folder shared by the workers of one machine (a Docker volume for
containers), held for the life of the process: a dead worker's claim vanishes with it,
and a restarted container takes a free GPU again. This is what makes
``docker compose up --scale workers=N`` with ``count: all`` give each replica its own
GPU (plain ``count: 1`` would give every replica the same one, docker/compose#11863).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kdsearch.service.errors import InfrastructureError, KdsearchError, first_line

logger = logging.getLogger(__name__)


@dataclass
class GpuClaim:
    gpu: str  # device id as the driver names it (index or UUID)
    slot: int
    handle: IO[str]  # keep open: closing it releases the claim

    def release(self) -> None:
        self.handle.close()


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else nvidia-smi's."""
    env = dict(os.environ) if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def claim_gpu(gpus: list[str], lock_dir: Path, slots_per_gpu: int = 1) -> GpuClaim:
    """Take the first free (gpu, slot), filling every GPU's first slot before any second
    slot, so N workers on M GPUs spread out. Raises when all are taken."""
    if not gpus:
        raise KdsearchError(
            "--gpu auto found no GPU (CUDA_VISIBLE_DEVICES empty and no nvidia-smi); "
            "use --device cpu, or give the container GPUs"
        )
    if slots_per_gpu < 1:
        raise KdsearchError(f"--workers-per-gpu must be at least 1 but got {slots_per_gpu}")
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        handles = {
            (gpu, slot): open(lock_dir / f"gpu-{gpu}-slot-{slot}.lock", "a")
            for slot in range(slots_per_gpu)
            for gpu in gpus
        }
    except OSError as exc:
        raise InfrastructureError(
            f"cannot use the GPU claim folder {str(lock_dir)!r}: {first_line(exc)}; give a "
            "writable --gpu-lock-dir shared by this machine's workers"
        ) from None
    for slot in range(slots_per_gpu):
        for gpu in gpus:
            handle = handles.pop((gpu, slot))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            for other in handles.values():
                other.close()
            return GpuClaim(gpu, slot, handle)
    raise KdsearchError(
        f"all {len(gpus)} GPUs x {slots_per_gpu} workers per GPU are taken "
        f"(claims in {lock_dir}); run fewer workers or raise --workers-per-gpu"
    )


def pin_process_to(claim: GpuClaim) -> None:
    """Make the claimed GPU the only one this process sees (it becomes cuda:0)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = claim.gpu
    logger.info("claimed GPU %s (slot %d)", claim.gpu, claim.slot)


@contextlib.contextmanager
def worker_device(gpu: str, device: str, lock_dir: Path, slots_per_gpu: int) -> Iterator[str]:
    """The device a worker runs on. ``gpu`` ``auto`` claims a free GPU slot of this machine
    for the life of the block (call before torch initialises CUDA) and gives ``cuda``;
    ``none`` gives ``device`` as asked."""
    if gpu == "none":
        yield device
        return
    if gpu != "auto":
        raise KdsearchError(f"--gpu {gpu!r} is not allowed; use auto or none")
    claim = claim_gpu(visible_gpus(), lock_dir, slots_per_gpu)
    try:
        pin_process_to(claim)
        yield "cuda"
    finally:
        claim.release()
