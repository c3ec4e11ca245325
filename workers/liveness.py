"""Keeping a worker's trials alive and its stops clean: stop signals and the heartbeat.

- ``GracefulStop`` (``workers/stopping.py``, re-exported here) turns SIGTERM / SIGINT into
  ``StopRequested`` at a safe point: at once inside the trial's computation, deferred
  during storage calls, so a stop never leaves a half-done database update behind.
- ``Heartbeat`` beats for the running trial from its own thread (long epochs and
  evaluations never delay it), and fails other workers' stale trials on the way, so a
  dead worker's trial is re-queued even while every live worker is busy training.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import optuna

from kdsearch.service.errors import first_line
from kdsearch.service.record import TrialAttr, set_trial_attrs
from kdsearch.service.study import fail_stale_trials
from kdsearch.workers import progress
from kdsearch.workers.stopping import GracefulStop, StopRequested

__all__ = ["GracefulStop", "Heartbeat", "StopRequested"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """Beats for one running trial from a daemon thread, and publishes the trial's
    training progress (``workers.progress.snapshot``) with each beat when it moved: the
    training loop itself never waits on the database for it. Storage errors are logged,
    never fatal: a beat missed during a database outage is made up by the next one."""

    def __init__(
        self,
        study: optuna.Study,
        trial_id: int,
        interval_s: float,
        storage: optuna.storages.RDBStorage | None = None,
    ) -> None:
        """``storage``: the worker's ``KdsearchStorage`` (the study's own is wrapped in
        Optuna's cache), where the progress is written."""
        self.study = study
        self.trial_id = trial_id
        self.interval_s = interval_s
        self.storage = storage
        self._published: tuple[Any, ...] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdsearch-heartbeat", daemon=True)

    def _run(self) -> None:
        storage = self.study._storage
        while not self._stop.is_set():
            try:
                storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
                self._publish_progress()
                fail_stale_trials(self.study)
            except Exception as exc:  # a heartbeat must never kill the worker
                logger.warning("heartbeat failed (will retry): %s", first_line(exc))
            self._stop.wait(self.interval_s)

    def _publish_progress(self) -> None:
        now = progress.snapshot()
        key = None if now is None else (now["label"], now["step"])
        if now is None or key == self._published or self.storage is None:
            return
        set_trial_attrs(self.storage, self.trial_id, {TrialAttr.PROGRESS: now})
        self._published = key

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
