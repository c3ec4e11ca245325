"""Keeping a worker's trials alive and its stops clean: stop signals and the heartbeat.

- ``GracefulStop`` (``workers/stopping.py``, re-exported here) turns SIGTERM / SIGINT into
  ``StopRequested`` at a safe point: at once inside the trial's computation, deferred
  during storage calls, so a stop never leaves a half-done database update behind.
- ``Heartbeat`` beats for the running trial from its own thread (long epochs and
  evaluations never delay it), publishes its progress, and fails other workers' stale
  trials on the way, so a dead worker's trial is re-queued even while every live worker
  is busy training. When it finds its own trial settled by someone else (the worker was
  frozen, or cut off, past the grace period, and another worker failed and re-queued the
  trial), it says so (``lost``): the trial stops training and is abandoned cleanly.
"""

from __future__ import annotations

import logging
import threading

import optuna
from optuna.trial import TrialState

from kdsearch.service.errors import first_line
from kdsearch.service.record import TrialAttr, set_trial_attrs
from kdsearch.service.recovery import sweep_stale_trials
from kdsearch.service.storage import TRANSIENT_ERRORS, KdsearchStorage
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
        self, study: optuna.Study, storage: KdsearchStorage, trial_id: int, interval_s: float
    ) -> None:
        self.study = study
        self.storage = storage
        self.trial_id = trial_id
        self.interval_s = interval_s
        self.lost = threading.Event()  # the trial was settled by another worker
        self._published: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdsearch-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.storage.trial_state(self.trial_id) != TrialState.RUNNING:
                    logger.warning(
                        "trial id %d was settled by another worker while this one ran it "
                        "(it was silent past the grace period): abandoning it",
                        self.trial_id,
                    )
                    self.lost.set()
                    return
                self.storage.record_heartbeat(self.trial_id)
                self._publish_progress()
                sweep_stale_trials(self.study, self.storage, self.study.study_name)
            except TRANSIENT_ERRORS as exc:  # a heartbeat must never kill the worker
                self.storage.note_outage()
                logger.warning("heartbeat failed (will retry): %s", first_line(exc))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # settled meanwhile: the next beat sees it
            except Exception as exc:
                logger.warning("heartbeat failed (will retry): %s", first_line(exc))
            self._stop.wait(self.interval_s)

    def _publish_progress(self) -> None:
        now = progress.snapshot()
        if now is None:
            return
        key = (now.label, now.step)
        if key == self._published:
            return
        set_trial_attrs(self.storage, self.trial_id, {TrialAttr.PROGRESS: now.as_dict()})
        self._published = key

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
