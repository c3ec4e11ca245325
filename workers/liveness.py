"""Keeping a worker's trials alive and its stops clean: stop signals and the heartbeat.

- ``GracefulStop`` turns SIGTERM / SIGINT into ``StopRequested`` at a safe point: at once
  inside the trial's computation, deferred during storage calls, so a stop never leaves a
  half-done database update behind.
- ``Heartbeat`` beats for the running trial from its own thread (long epochs and
  evaluations never delay it), and fails other workers' stale trials on the way, so a
  dead worker's trial is re-queued even while every live worker is busy training.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import optuna

from kdsearch.service.errors import first_line
from kdsearch.service.study import fail_stale_trials

logger = logging.getLogger(__name__)


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived: fail the current trial (so it is re-queued) and exit."""


class GracefulStop:
    """Turns SIGTERM / SIGINT into ``StopRequested`` at a safe point.

    Inside ``interruptible()`` (the trial's computation, asset building, waiting) the
    signal raises at once; elsewhere it is deferred to the next ``check()``.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._interruptible = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = False
            raise StopRequested(self.requested)

    def check(self) -> None:
        if self.requested:
            raise StopRequested(self.requested)

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


class Heartbeat:
    """Beats for one running trial from a daemon thread. Storage errors are logged, never
    fatal: a beat missed during a database outage is made up by the next one."""

    def __init__(self, study: optuna.Study, trial_id: int, interval_s: float) -> None:
        self.study = study
        self.trial_id = trial_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdsearch-heartbeat", daemon=True)

    def _run(self) -> None:
        storage = self.study._storage
        while not self._stop.is_set():
            try:
                storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
                fail_stale_trials(self.study)
            except Exception as exc:  # a heartbeat must never kill the worker
                logger.warning("heartbeat failed (will retry): %s", first_line(exc))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
