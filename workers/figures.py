"""Drawing a trial's figures in parallel, off the worker's main process.

A trial's figures sit between its last computation and its completion, and drawing them
is CPU work that holds the GIL (about 60 ms a figure, most of it fixed overhead), so
threads do not help. A small pool of spawned processes draws them side by side while the
worker records the outcome; started with the worker (its start-up overlaps the first
trial), shut down with it. A pool that breaks (a child killed) is replaced by drawing in
the worker itself: figures are never worth losing a trial for.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from kdsearch.service.errors import KdsearchError

logger = logging.getLogger(__name__)

# A figure job: the name of a function in workers/plots.py and its arguments (numpy
# arrays and plain values: cheap to pickle), the output path last.
Job = tuple[str, tuple[Any, ...]]


def draw(function: str, args: tuple[Any, ...]) -> None:
    from kdsearch.workers import plots

    getattr(plots, function)(*args)


def _exit_with(parent: int) -> None:
    # A worker killed outright (SIGKILL, the OOM killer) cannot shut its pool down, and a
    # pool's child never learns of it from its queue: it watches its parent instead.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _child_init(parent: int) -> None:
    # The worker handles stops; a Ctrl-C reaching the whole process group must not make
    # the children print tracebacks. They end with the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    from kdsearch.workers import plots  # noqa: F401  (import once, before the first job)


@contextmanager
def _bare_main() -> Iterator[None]:
    """A spawned child first re-runs its parent's ``__main__`` when that is a script: a
    user's script or a benchmark (seconds of CPU for torch and transformers, taken from
    the trial running beside it), or worse, a script without an ``if __name__ ==
    "__main__"`` guard, which would start workers again. The children need only
    matplotlib: while they are started, ``__main__`` is an empty module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def figure_processes() -> int:
    """How many processes draw figures: ``$KDSEARCH_FIGURE_PROCESSES``, else one per CPU
    up to 4 (0: the worker draws them itself, for machines short of memory)."""
    raw = os.environ.get("KDSEARCH_FIGURE_PROCESSES")
    if raw is None:
        return max(1, min(4, os.cpu_count() or 1))
    if not raw.strip().isdigit() or int(raw) > 64:
        raise KdsearchError(
            f"KDSEARCH_FIGURE_PROCESSES={raw[:40]!r} is not a whole number from 0 to 64 (the "
            "processes that draw a trial's figures; 0 draws them in the worker): set it to "
            "a number such as 2, or unset it"
        )
    return int(raw)


class FigurePool:
    def __init__(self, processes: int) -> None:
        """``processes`` 0: no processes, ``wait`` draws every figure here."""
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        if processes:
            self._start()

    def _start(self) -> None:
        try:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init,
                initargs=(os.getpid(),),
            )
            with _bare_main():
                for _ in range(self.processes):  # spawn them now, in the background
                    self._pool.submit(os.getpid)
        except (OSError, RuntimeError) as exc:
            logger.warning("figures will be drawn in the worker itself: %s", exc)
            self._pool = None

    def submit(self, jobs: Mapping[str, Job]) -> dict[str, Future[None] | None]:
        """Start drawing every job; ``wait`` collects them. None: drawn later, here."""
        if self._pool is None:
            return dict.fromkeys(jobs)
        try:
            with _bare_main():  # a submit may start a child in place of one that ended
                return {name: self._pool.submit(draw, *job) for name, job in jobs.items()}
        except (BrokenProcessPool, RuntimeError):
            self._restart()
            return dict.fromkeys(jobs)

    def wait(self, jobs: Mapping[str, Job], futures: Mapping[str, Future[None] | None]) -> None:
        """Every figure drawn: by the pool, or here for those it could not draw."""
        broken = False
        for name, future in futures.items():
            try:
                if future is not None:
                    future.result()
                    continue
            except BrokenProcessPool:  # every future of a broken pool raises it
                broken = True
            draw(*jobs[name])
        if broken:  # once, for the next trial
            self._restart()

    def _restart(self) -> None:
        logger.warning("the figure processes stopped; starting new ones")
        self.close()
        self._start()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
