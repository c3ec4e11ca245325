"""The worker loop: claim a trial, run it in a session, settle it, until the study's global
budget is spent.

Guarantees (tested in tests/test_reliability.py):
- a trial whose code raises is FAIL with its error kept, and re-queued (same
  hyperparameters) up to ``reliability.max_retries``; the worker goes on;
- a trial whose worker died (kill -9, lost machine) stops beating; after
  ``grace_period_s`` any worker fails it and re-queues it, even if the worker died
  before its first beat;
- a worker whose trial another worker settled meanwhile (it was frozen or cut off past the
  grace period) abandons that trial cleanly and goes on claiming;
- SIGTERM / SIGINT fail the running trial, re-queue it (without using up a retry) and
  exit 0 within seconds: no trial is left RUNNING;
- storage calls survive a database outage, reconnecting with backoff up to
  ``--storage-timeout``, after which the worker exits 3 with a clear message;
- an unusable artifact store or cache (infrastructure, not the trial's fault) fails the
  running trial without using up a retry and stops the worker (exit 4).

The worker keeps no per-trial state: each trial's lives in its ``TrialSession``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import optuna
from optuna.trial import TrialState

from kdsearch.service.artifacts import (
    S3Bucket,
    explicit_artifacts,
    open_artifact_store,
    record_study_location,
    resolve_cache_dir,
    study_artifacts,
)
from kdsearch.service.claim import Claim, ClaimedTrial, StudyView, claim_trial
from kdsearch.service.errors import FailureStreak
from kdsearch.service.record import (
    FailureKind,
    StudyAttr,
    TeacherFigures,
    TrialAttr,
    set_study_attr,
    set_trial_attrs,
)
from kdsearch.service.recovery import RequeueStale, halted_reason, requeue
from kdsearch.service.report import update_study_note
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import (
    KdsearchStorage,
    LockBusy,
    critical_section,
    open_storage,
    with_reconnect,
)
from kdsearch.service.study import load_stored_spec
from kdsearch.service.trial_config import Precision
from kdsearch.workers.assets import StudyAssets, prepare_assets
from kdsearch.workers.cache import open_asset_cache
from kdsearch.workers.device import configure as configure_device
from kdsearch.workers.device import dtype_of, pick_device, resolve_precision
from kdsearch.workers.figures import FigurePool, figure_processes
from kdsearch.workers.liveness import GracefulStop, StopRequested
from kdsearch.workers.options import WorkerOptions
from kdsearch.workers.recording import teacher_artifacts
from kdsearch.workers.session import TrialSession, WorkerContext
from kdsearch.workers.stages import Recipe
from kdsearch.workers.tracking import Tracking

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A worker whose trials keep raising stops rather than burn the whole budget on FAILs.
MAX_CONSECUTIVE_FAILURES = 3
# A stopping worker gives the database this long to record its trial as failed (docker
# stop waits 60 s); past it, the trial goes stale and another worker re-queues it.
STOP_STORAGE_S = 10.0
# The study note (optuna-dashboard) is rewritten by a worker at most this often: it reads
# the whole study.
NOTE_EVERY_S = 30.0


class Worker:
    """One worker process: setup (storage, spec, sampler, assets), then the trial loop."""

    def __init__(self, options: WorkerOptions, stop: GracefulStop | None = None) -> None:
        self.options = options
        self.stop = stop or GracefulStop()
        self._deadline: float | None = None  # caps every storage retry once stopping
        self.figures: FigurePool | None = None  # started by setup()
        self._noted = -float("inf")

    def _db(self, call: Callable[[], T], what: str) -> T:
        if self.stop.requested and self._deadline is None:
            self._deadline = time.monotonic() + STOP_STORAGE_S
        return with_reconnect(call, what, self.options.storage_timeout_s, self._deadline)

    def setup(self) -> WorkerContext:
        options = self.options
        drawers = figure_processes()  # checked before anything is started
        # The spec holds the heartbeat settings the worker's storage needs: read it with a
        # plain connection first, then drop that connection's pool.
        plain = open_storage(options.storage_url, create=False)
        spec = load_stored_spec(plain, options.study_name)
        plain.engine.dispose()
        rel = spec.reliability
        storage = open_storage(
            options.storage_url,
            heartbeat_interval_s=rel.heartbeat_interval_s,
            grace_period_s=rel.grace_period_s,
            stale_trial_callback=RequeueStale(rel.max_retries),
        )
        self.storage: KdsearchStorage = storage
        self.spec: StudySpec = spec
        study = optuna.load_study(study_name=spec.name, storage=storage)
        self.view = StudyView(study)
        device = pick_device(options.device)
        configure_device(device, options.threads)
        self.precision: Precision = resolve_precision(
            options.precision or spec.training.precision, device
        )
        explicit = explicit_artifacts(options.artifacts)  # the option, else $KDSEARCH_ARTIFACTS
        location = study_artifacts(storage, spec.name, explicit, worker=True)
        shared = S3Bucket(location) if location.is_s3 else None
        store = open_artifact_store(location, shared)
        cache = open_asset_cache(
            location, resolve_cache_dir(location, options.cache_path), storage, shared
        )
        tracking = self._db(
            lambda: Tracking(
                spec, study, storage, options.mlflow or spec.tracking.mlflow,
                options.tensorboard or spec.tracking.tensorboard,
            ),
            "opening the tracking destinations",
        )  # fmt: skip
        record_study_location(storage, spec.name, location)  # reachable: recorded
        with self.stop.interruptible():  # fine-tuning a teacher, stage 1: can take long
            assets = prepare_assets(spec, cache, device, dtype_of(self.precision))
        self._record_teacher(study, assets)
        # Its processes start while the first trial runs (0: figures drawn here).
        self.figures = FigurePool(drawers)
        return WorkerContext(
            study=study,
            storage=storage,
            spec=spec,
            recipe=Recipe.of(spec),
            assets=assets,
            device=device,
            db=self._db,
            stop=self.stop,
            store=store,
            location=str(location),
            teacher_files=teacher_artifacts(study, storage, store, str(location), assets, self._db),
            figures=self.figures,
            tracking=tracking,
        )

    def _record_teacher(self, study: optuna.Study, assets: StudyAssets) -> None:
        """The teacher's figures, recorded once per study: the claim reads its dev
        accuracy (the teacher reference) from there."""
        figures = assets.figures.as_dict()

        def record() -> None:
            if study.user_attrs.get(StudyAttr.TEACHER) == figures:
                return
            with critical_section(self.storage, self.spec.name):
                set_study_attr(study, StudyAttr.TEACHER, figures)

        self._db(record, "recording the teacher's figures")
        assert TeacherFigures.from_dict(figures) is not None

    def run(self) -> int:
        """Run trials until the budget is reached (or ``max_trials``). Returns 0; problems
        the user must fix raise ``KdsearchError`` (with the exit code to use)."""
        # The heartbeat thread calls Optuna's experimental heartbeat API; warning filters
        # set with catch_warnings are not thread-safe, so filter for the whole process.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        with self.stop.installed():
            try:
                self.stop.check()
                context = self.setup()
                return self._loop(context)
            except StopRequested as stop:
                logger.warning("received %s: stopped", stop)
                return 0
            finally:
                if self.figures is not None:
                    self.figures.close()

    def _loop(self, context: WorkerContext) -> int:
        ran = failures = 0
        poll_s = min(5.0, float(self.spec.reliability.heartbeat_interval_s))
        limit = self.options.max_trials
        while limit is None or ran < limit:
            self.stop.check()
            claimed = self._claim()
            if claimed is Claim.DONE:
                # Fewer than the budget when an answer is confirmed early: the rest of
                # the confirmation reserve is not needed.
                used = self.view.usage()
                logger.info(
                    "study %s: done, %d of its budget of %d trials used",
                    self.spec.name,
                    used.search + used.confirmation,
                    self.spec.n_trials,
                )
                self._note(force=True)
                return 0
            if claimed is Claim.HALTED:
                reason = self._db(
                    lambda: halted_reason(self.storage, self.spec.name), "reading the study"
                )
                raise FailureStreak(f"study {self.spec.name!r} is halted: {reason}")
            if claimed is Claim.WAIT:
                # Others' trials are running; one may still fail and need a re-run.
                with self.stop.interruptible():
                    time.sleep(poll_s)
                continue
            session = TrialSession(claimed, context)
            end = session.run()
            session.settle(end)
            ran += 1
            failures = 0 if end.ok else failures + 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise FailureStreak(
                    f"{failures} trials failed in a row on this worker (errors in their "
                    "`error` user attr, `kdsearch status`); fix the cause and start it again"
                )
            if end.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self._note()
        logger.info("worker: stopping after %d trials (--max-trials %d)", ran, limit)
        return 0

    def _claim(self) -> ClaimedTrial | Claim:
        """``claim_trial``, safe to retry: a trial an earlier attempt committed before its
        connection dropped (while sampling) is failed, and its queued values re-queued,
        first."""
        created: list[int] = []

        def attempt() -> ClaimedTrial | Claim:
            while created:  # popped only once failed: a retry during an outage keeps it
                self._abandon(created[-1])
                created.pop()
            claimed = claim_trial(
                self.view, self.spec, self.storage, self.precision, created.append
            )
            created.clear()
            return claimed

        while True:
            try:
                return self._db(attempt, "claiming a trial")
            except LockBusy as busy:
                logger.warning("%s", busy)

    def _abandon(self, trial_id: int) -> None:
        frozen = self.storage.get_trial(trial_id)
        if frozen.state == TrialState.RUNNING:
            logger.warning(
                "trial %d: its claim failed halfway; failed and re-queued", frozen.number
            )
            set_trial_attrs(self.storage, trial_id, {TrialAttr.FAILURE: FailureKind.CLAIM.value})
            self.view.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
            requeue(
                self.view.study, frozen, self.spec.reliability.max_retries, "claim failed", False
            )

    def _note(self, force: bool = False) -> None:
        """Rewrite the study note (rate-limited): readers see the answer in the dashboard."""
        if not force and time.monotonic() - self._noted < NOTE_EVERY_S:
            return

        def write() -> None:
            with critical_section(self.storage, f"{self.spec.name}:note", wait=False) as held:
                if held:  # another worker is writing it: theirs is as fresh
                    update_study_note(self.view.study, self.spec)

        self._db(write, "updating the study note")
        self._noted = time.monotonic()


def run_worker(options: WorkerOptions, stop: GracefulStop | None = None) -> int:
    return Worker(options, stop).run()
