"""The figure processes: they draw what the worker itself would draw, fall back to the
worker when they break, and never outlive a worker killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdsearch.service.errors import KdsearchError
from kdsearch.workers.figures import FigurePool, Job, figure_processes
from tests.helpers import assert_clean_failure, kdsearch

PNG = b"\x89PNG\r\n\x1a\n"


def _jobs(folder: Path) -> dict[str, Job]:
    rng = np.random.default_rng(0)
    teacher = rng.dirichlet([1.0, 1.0], size=200)  # (200, 2)
    student = rng.dirichlet([1.0, 1.0], size=200)
    labels = rng.integers(0, 2, size=200)
    return {
        name: (function, (teacher, student, labels, folder / name))
        for name, function in (
            ("scatter.png", "confidence_scatter"),
            ("reliability.png", "reliability_diagram"),
        )
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def test_pool_draws_every_figure_and_falls_back_when_broken(tmp_path: Path) -> None:
    pool = FigurePool(2)
    try:
        jobs = _jobs(tmp_path)
        pool.wait(jobs, pool.submit(jobs))
        for name in jobs:
            assert (tmp_path / name).read_bytes().startswith(PNG)
            (tmp_path / name).unlink()
        # Kill the children: the figures are still drawn (here), and the pool recovers.
        assert pool._pool is not None
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        pool.wait(jobs, pool.submit(jobs))
        assert all((tmp_path / name).read_bytes().startswith(PNG) for name in jobs)
        for name in jobs:
            (tmp_path / name).unlink()
        pool.wait(jobs, pool.submit(jobs))
        assert all((tmp_path / name).exists() for name in jobs)
    finally:
        pool.close()


def test_children_skip_the_script_and_exit_when_their_worker_is_killed(tmp_path: Path) -> None:
    # A stand-in worker: a user's script with no ``__main__`` guard that imports torch. A
    # spawned child would re-run it (torch and all, and a second pool); it must not. It
    # prints its children and waits to be killed.
    script = tmp_path / "user_script.py"
    script.write_text(
        "import time\n"
        "import torch\n"
        "from kdsearch.workers.figures import FigurePool\n"
        "pool = FigurePool(2)\n"
        "pool._pool.submit(time.sleep, 0).result()\n"
        "while len(pool._pool._processes) < 2: time.sleep(0.1)\n"
        "print(*pool._pool._processes, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    children = [int(pid) for pid in worker.stdout.readline().split()]
    assert len(children) == 2 and all(_alive(pid) for pid in children)
    deadline = time.monotonic() + 30
    for pid in children:  # once a child has matplotlib, it is past re-running a script
        while "ft2font" not in (maps := Path(f"/proc/{pid}/maps").read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "libtorch" not in maps
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children)


def test_a_bad_process_count_is_refused_by_the_worker(tmp_path: Path) -> None:
    result = kdsearch(
        "worker", "--study", "any", "--storage", f"sqlite:///{tmp_path / 'k.db'}",
        env={"KDSEARCH_FIGURE_PROCESSES": "-1"},
    )  # fmt: skip
    assert_clean_failure(result, "KDSEARCH_FIGURE_PROCESSES='-1'", "0 to 64")
    assert not (tmp_path / "k.db").exists()  # refused before anything is opened


@pytest.mark.parametrize("raw", ["abc", "-1", "2.5", "65", ""])
def test_bad_process_counts(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSEARCH_FIGURE_PROCESSES", raw)
    with pytest.raises(KdsearchError, match="whole number from 0 to 64"):
        figure_processes()


def test_the_process_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSEARCH_FIGURE_PROCESSES", "0")
    assert figure_processes() == 0
    monkeypatch.setenv("KDSEARCH_FIGURE_PROCESSES", " 3 ")
    assert figure_processes() == 3
    monkeypatch.delenv("KDSEARCH_FIGURE_PROCESSES")
    assert figure_processes() == max(1, min(4, os.cpu_count() or 1))
