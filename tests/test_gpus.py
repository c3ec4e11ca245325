"""GPU claiming with simulated devices (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdsearch.service.errors import KdsearchError
from kdsearch.workers.gpus import claim_gpu, visible_gpus


def test_visible_gpus_from_the_environment() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1, 3"}) == ["0", "1", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_one_worker_per_gpu(tmp_path: Path) -> None:
    claims = [claim_gpu(["0", "1", "2"], tmp_path) for _ in range(3)]
    assert [c.gpu for c in claims] == ["0", "1", "2"]
    with pytest.raises(KdsearchError, match="all 3 GPUs x 1 workers per GPU are taken"):
        claim_gpu(["0", "1", "2"], tmp_path)
    claims[1].release()  # a worker exits (or dies): its GPU is free again
    assert claim_gpu(["0", "1", "2"], tmp_path).gpu == "1"


def test_several_workers_per_gpu_spread_first(tmp_path: Path) -> None:
    claims = [claim_gpu(["0", "1"], tmp_path, slots_per_gpu=2) for _ in range(4)]
    assert [(c.gpu, c.slot) for c in claims] == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]


def test_claims_across_processes_and_death(tmp_path: Path) -> None:
    # Another process holds GPU 0 (as another container sharing the lock volume would).
    code = (
        "import sys, time; from pathlib import Path; from kdsearch.workers.gpus import claim_gpu;"
        f"c = claim_gpu(['0', '1'], Path({str(tmp_path)!r})); print(c.gpu, flush=True);"
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0"
        assert claim_gpu(["0", "1"], tmp_path).gpu == "1"
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    assert claim_gpu(["0", "1"], tmp_path).gpu == "0"


def test_no_gpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KdsearchError, match="found no GPU"):
        claim_gpu([], tmp_path)
