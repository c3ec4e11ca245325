"""The worker loop: claim a trial, run it under a heartbeat, record it, until the study's
global budget is spent.

Guarantees (tested in tests/test_reliability.py):
- a trial whose code raises is FAIL with its error kept, and re-queued (same
  hyperparameters) up to ``reliability.max_retries``; the worker goes on;
- a trial whose worker died (kill -9, lost machine) stops beating; after
  ``grace_period_s`` any worker fails it and re-queues it, even if the worker died
  before its first beat;
- SIGTERM / SIGINT fail the running trial, re-queue it (without using up a retry) and
  exit 0 within seconds: no trial is left RUNNING;
- storage calls survive a database outage, reconnecting with backoff up to
  ``--storage-timeout``, after which the worker exits 3 with a clear message;
- an unusable artifact store or cache (infrastructure, not the trial's fault) fails the
  running trial without using up a retry and stops the worker (exit 4).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.artifacts import (
    S3Bucket,
    open_artifact_store,
    resolve_cache_dir,
)
from kdsearch.service.errors import FailureStreak, InfrastructureError, StorageUnavailable
from kdsearch.service.faults import fault_point
from kdsearch.service.pruning import should_prune
from kdsearch.service.record import (
    FailureKind,
    ProbePoint,
    TrialAttr,
    TrialRecord,
    set_trial_attrs,
)
from kdsearch.service.report import update_study_note
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import open_storage, study_lock, with_reconnect
from kdsearch.service.study import (
    Claim,
    RequeueStale,
    baseline_accuracy,
    build_sampler,
    claim_trial,
    halted_reason,
    load_stored_spec,
    record_artifact_location,
    requeue,
    study_artifacts,
    worker_seed,
)
from kdsearch.workers.assets import StudyAssets, open_asset_cache, prepare_assets
from kdsearch.workers.device import configure as configure_device
from kdsearch.workers.device import pick_device, training_dtype
from kdsearch.workers.figures import FigurePool, figure_processes
from kdsearch.workers.liveness import GracefulStop, Heartbeat, StopRequested
from kdsearch.workers.recording import Recorder
from kdsearch.workers.tracking import Tracking, TrialTracking
from kdsearch.workers.trial import build_trial

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A worker whose trials keep raising stops rather than burn the whole budget on FAILs.
MAX_CONSECUTIVE_FAILURES = 3
# A stopping worker gives the database this long to record its trial as failed (docker
# stop waits 60 s); past it, the trial goes stale and another worker re-queues it.
STOP_STORAGE_S = 10.0


@dataclass(frozen=True)
class WorkerOptions:
    storage_url: str
    study_name: str
    artifacts: str | None = None
    """--artifacts / $KDSEARCH_ARTIFACTS; None: the study's recorded location (or the default)."""
    cache_dir: Path | None = None  # None: see service.artifacts.resolve_cache_dir
    device: str = "auto"
    threads: int | None = None
    max_trials: int | None = None
    storage_timeout_s: float = 600.0
    sampler_seed: int | None = None
    """None: derived from the study's seed, the host and the pid (workers never replay
    each other's samples); a number makes one worker's search reproducible."""
    precision: str | None = None
    """auto, fp32 or bf16 for this worker; None: the study's ``training.precision``."""
    mlflow: str | None = None
    """An MLflow tracking URI for this worker; None: the study's ``tracking.mlflow``."""
    tensorboard: str | None = None
    """A TensorBoard log folder for this worker; None: the study's ``tracking.tensorboard``."""


class Worker:
    """One worker process: setup (storage, spec, sampler, assets), then the trial loop."""

    def __init__(self, options: WorkerOptions, stop: GracefulStop | None = None) -> None:
        self.options = options
        self.stop = stop or GracefulStop()
        self._deadline: float | None = None  # caps every storage retry once set (stopping)
        self.figures: FigurePool | None = None  # started by setup()

    def _db(self, call: Callable[[], T], what: str) -> T:
        return with_reconnect(call, what, self.options.storage_timeout_s, self._deadline)

    def setup(self) -> None:
        options = self.options
        drawers = figure_processes()  # checked before anything is started
        # The spec holds the heartbeat settings the worker's storage needs: read it with a
        # plain connection first, then drop that connection's pool.
        plain = open_storage(options.storage_url, create=False)
        spec = load_stored_spec(plain, options.study_name)
        plain.engine.dispose()
        rel = spec.reliability
        self.storage = open_storage(
            options.storage_url,
            heartbeat_interval_s=rel.heartbeat_interval_s,
            grace_period_s=rel.grace_period_s,
            stale_trial_callback=RequeueStale(rel.max_retries),
        )
        self.spec: StudySpec = spec
        self.study = optuna.load_study(
            study_name=spec.name,
            storage=self.storage,
            sampler=build_sampler(
                spec,
                worker_seed(spec) if options.sampler_seed is None else options.sampler_seed,
            ),
        )
        self.device = pick_device(options.device)
        configure_device(self.device, options.threads)
        self.dtype = training_dtype(options.precision or spec.training.precision, self.device)
        location = study_artifacts(self.storage, spec.name, options.artifacts, worker=True)
        shared = S3Bucket(location) if location.is_s3 else None
        artifact_store = open_artifact_store(location, shared)
        cache = open_asset_cache(
            location, resolve_cache_dir(location, options.cache_dir), self.storage, shared
        )
        record_artifact_location(self.storage, spec.name, location)  # reachable: recorded
        with self.stop.interruptible():  # fine-tuning a teacher, stage 1: can take long
            self.assets: StudyAssets = prepare_assets(spec, cache, self.device, self.dtype)
        # Its processes start while the first trial runs (0: figures drawn here).
        self.figures = FigurePool(drawers)
        self.recorder = Recorder(
            self.study,
            self.storage,
            spec,
            self.assets,
            artifact_store,
            str(location),
            self._db,
            self.figures,
        )
        self.recorder.upload_teacher_predictions()
        self.tracking = self._db(
            lambda: Tracking(
                spec,
                self.study,
                self.storage,
                options.mlflow or spec.tracking.mlflow,
                options.tensorboard or spec.tracking.tensorboard,
            ),
            "opening the tracking destinations",
        )

    def run(self) -> int:
        """Run trials until the budget is reached (or ``max_trials``). Returns 0; problems
        the user must fix raise ``KdsearchError`` (with the exit code to use)."""
        # The heartbeat thread calls Optuna's experimental heartbeat API; warning filters
        # set with catch_warnings are not thread-safe, so filter for the whole process.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        with self.stop.installed():
            try:
                self.stop.check()
                self.setup()
                return self._loop()
            except StopRequested as stop:
                logger.warning("received %s: stopped", stop)
                return 0
            finally:
                if self.figures is not None:
                    self.figures.close()

    def _loop(self) -> int:
        ran = failures = 0
        poll_s = min(5.0, float(self.spec.reliability.heartbeat_interval_s))
        while self.options.max_trials is None or ran < self.options.max_trials:
            self.stop.check()
            claimed = self._claim()
            if claimed is Claim.DONE:
                logger.info(
                    "study %s: budget of %d trials reached", self.spec.name, self.spec.n_trials
                )
                break
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
            ok = self._run_trial(claimed)
            ran += 1
            failures = 0 if ok else failures + 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise FailureStreak(
                    f"{failures} trials failed in a row on this worker (errors in their "
                    "`error` user attr, `kdsearch status`); fix the cause and start it again"
                )
        return 0

    def _claim(self) -> optuna.Trial | Claim:
        """``claim_trial``, safe to retry: a trial an earlier attempt created before its
        connection dropped is failed (and its queued parameters re-queued) first."""
        created: list[optuna.Trial] = []

        def attempt() -> optuna.Trial | Claim:
            while created:  # popped only once failed: a retry during an outage keeps it
                self._abandon(created[-1])
                created.pop()
            return claim_trial(self.study, self.spec, self.storage, on_ask=created.append)

        return self._db(attempt, "claiming a trial")

    def _abandon(self, trial: optuna.Trial) -> None:
        frozen = self.storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.RUNNING:
            logger.warning(
                "trial %d: its claim failed halfway; failed and re-queued", frozen.number
            )
            set_trial_attrs(self.storage, trial._trial_id, {TrialAttr.FAILURE: FailureKind.CLAIM})
            self.study.tell(trial, state=TrialState.FAIL)
            requeue(self.study, frozen, self.spec.reliability.max_retries, "claim failed", False)

    def _run_trial(self, trial: optuna.Trial) -> bool:
        """Run one trial and map its outcome to a state. True unless it FAILed."""
        self._tracking: TrialTracking | None = None
        ended = "FAIL"  # the tracking runs' end state unless the trial gets further
        try:
            ok = self._run_and_record(trial)
            ended = "" if ok else "FAIL"
            return ok
        except optuna.TrialPruned:
            ended = "PRUNED"
            self._finish(trial, state=TrialState.PRUNED)
            return True
        finally:
            if self._tracking is not None and ended:
                self._tracking.finish(ended)

    def _run_and_record(self, trial: optuna.Trial) -> bool:
        spec = self.spec
        history: list[ProbePoint] = []
        interval = spec.reliability.heartbeat_interval_s
        with Heartbeat(self.study, trial._trial_id, interval, self.storage):
            try:
                frozen = self._db(lambda: self.storage.get_trial(trial._trial_id), "reading it")
                record = TrialRecord.of(frozen)
                # The baseline (every trial's point of comparison) and the further seeds of
                # a configuration (their configuration earned them) are never pruned.
                protected = record.baseline or record.replicate > 0
                job = build_trial(
                    spec,
                    self.assets,
                    trial.params,
                    self.device,
                    on_probe=lambda p: self._on_probe(trial, history, p, protected),
                    baseline_accuracy=self._baseline_accuracy(),
                    is_baseline=record.baseline and record.replicate == 0,
                    seed=record.seed,
                    dtype=self.dtype,
                )
                precision = "bf16" if self.dtype is not None else "fp32"
                self.recorder.started(trial, job.hparams, str(self.device), precision)
                if self.tracking.enabled:
                    self._tracking = self.tracking.start(
                        trial.number, job.hparams, record.tags(), job.steps_per_epoch
                    )
                    self.recorder.tracked(trial, self._tracking.ids())
                logger.info("trial %d: %s", trial.number, job.hparams.model_dump())
                with self.stop.interruptible():
                    result = job.run()
                if math.isnan(result.sigma):
                    # Deterministic for this configuration and seed: a retry would repeat
                    # it, and a failure would count towards halting the study.
                    self.recorder.degenerate(trial, result)
                    raise optuna.TrialPruned(
                        "no train input is predicted right by both models: sigma is undefined"
                    )
                fault_point("before-record")
                self.recorder.finished(trial, result, history, self._tracking)
            except optuna.TrialPruned as pruned:
                logger.info("trial %d pruned: %s", trial.number, pruned)
                raise  # recorded by _run_trial, outside the heartbeat
            except StopRequested:
                self._deadline = time.monotonic() + STOP_STORAGE_S
                try:
                    self._fail(trial, "worker stopped during the trial", FailureKind.STOPPED)
                except StorageUnavailable:
                    logger.warning("could not record the stop; the trial will go stale instead")
                raise
            except StorageUnavailable:
                raise  # the database is gone: nothing to record; the trial goes stale
            except InfrastructureError as exc:
                self._fail(trial, f"infrastructure: {exc}", FailureKind.INFRASTRUCTURE)
                raise
            except Exception as exc:
                logger.error("trial %d failed: %s", trial.number, exc, exc_info=True)
                self._fail(trial, f"{type(exc).__name__}: {exc}", FailureKind.TRIAL)
                return False
        # Objectives: sigma on X_train and the dev accuracy drop, both minimised.
        self._finish(trial, values=[result.sigma, result.accuracy_drop])
        logger.info(
            "trial %d: sigma %.6f, accuracy_drop %.4f (%.1f s)",
            trial.number, result.sigma, result.accuracy_drop, result.outcome.wall_time_s,
        )  # fmt: skip
        return True

    def _baseline_accuracy(self) -> float | None:
        trials = self._db(
            lambda: self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
            "reading the baseline",
        )
        return baseline_accuracy(trials)

    def _on_probe(
        self, trial: optuna.Trial, history: list[ProbePoint], point: ProbePoint, protected: bool
    ) -> None:
        """Record the probe (visible in optuna-dashboard as a user attr), then ask the
        pruning rules, unless the trial is ``protected``. Raises ``optuna.TrialPruned`` to
        stop the trial."""
        history.append(point)
        self.recorder.probed(trial, history)
        if self._tracking is not None:
            self._tracking.probe(point)
        if protected:
            return
        finished: list[list[ProbePoint]] = []
        if "pareto" in self.spec.pruning.rule:
            done = self._db(
                lambda: self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                "reading finished trials",
            )
            finished = [TrialRecord.of(t).probes for t in done]
        rule = should_prune(history, finished, self.spec.thresholds, self.spec.pruning)
        if rule:
            self.recorder.pruned(trial, rule)
            raise optuna.TrialPruned(
                f"rule {rule!r} at epoch {point.epoch:.4g}/{point.epochs}: probe sigma "
                f"{point.sigma:.4f}, accuracy_drop {point.accuracy_drop:.4f}"
            )

    def _finish(self, trial: optuna.Trial, **outcome: Any) -> None:
        def tell() -> None:
            try:
                self.study.tell(trial, **outcome)
            except ValueError as exc:
                # Already finished: an earlier attempt of this call went through before the
                # connection dropped, or another worker failed the trial as stale during a
                # long outage (then it was re-queued and will run again).
                logger.warning("trial %d was already finished: %s", trial.number, exc)

        self._db(tell, f"finishing trial {trial.number}")
        if outcome.get("state") != TrialState.FAIL:
            self._db(self._update_note, "updating the study note")

    def _update_note(self) -> None:
        with study_lock(self.storage, self.spec.name):
            update_study_note(self.study, self.spec)

    def _fail(self, trial: optuna.Trial, error: str, kind: str) -> None:
        """FAIL the trial with its error and re-queue it; only a failure of the trial's own
        doing (``FailureKind.TRIAL``) uses up a retry."""
        count = kind == FailureKind.TRIAL
        self.recorder.failed(trial, error, kind)
        self._finish(trial, state=TrialState.FAIL)
        frozen: FrozenTrial = self._db(
            lambda: self.storage.get_trial(trial._trial_id), "reading the failed trial"
        )
        if frozen.state == TrialState.FAIL:
            self._db(
                lambda: requeue(
                    self.study, frozen, self.spec.reliability.max_retries, error, count
                ),
                "re-queueing the trial",
            )


def run_worker(options: WorkerOptions, stop: GracefulStop | None = None) -> int:
    return Worker(options, stop).run()
