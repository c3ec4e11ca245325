"""The worker loop: claim a trial, run it under a heartbeat, record it, until the study's
global budget is spent.

Guarantees (tested in tests/test_reliability.py):
- a trial whose code raises is FAIL with its error kept, and re-queued (same
  hyperparameters) up to ``reliability.max_retries``; the worker goes on;
- a trial whose worker died (kill -9, lost machine) stops beating; after
  ``grace_period_s`` any worker fails it and re-queues it;
- SIGTERM / SIGINT fail the running trial, re-queue it (without using up a retry) and
  exit 0 within seconds: no trial is left RUNNING;
- storage calls survive a database outage, reconnecting with backoff up to
  ``--storage-timeout``, after which the worker exits 3 with a clear message.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

import optuna
import torch
from kdsearch.service.artifacts import (
    ArtifactLocation,
    S3Bucket,
    open_artifact_store,
    resolve_cache_dir,
)
from kdsearch.service.errors import KdsearchError
from kdsearch.service.pruning import ProbePoint, should_prune
from kdsearch.service.report import update_study_note
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import open_storage, study_lock, with_reconnect
from kdsearch.service.study import (
    PROBES_ATTR,
    Claim,
    RequeueStale,
    build_sampler,
    claim_trial,
    fail_stale_trials,
    load_stored_spec,
    requeue,
    trial_hyperparameters,
    trial_stage1,
    worker_seed,
)
from kdsearch.workers import plots
from kdsearch.workers.assets import (
    StudyAssets,
    open_asset_cache,
    prepare_assets,
    prepare_stage1_student,
)
from kdsearch.workers.device import configure as configure_device
from kdsearch.workers.predictions import write_predictions
from kdsearch.workers.trial import DistillationTrial, TrialResult
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A worker whose trials keep raising stops rather than burn the whole budget on FAILs.
MAX_CONSECUTIVE_FAILURES = 3
# Study user attr: {"location": artifact location, "ids": {file name: artifact id}}.
TEACHER_ARTIFACTS_ATTR = "teacher_artifacts"


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived: fail the current trial (so it is re-queued) and exit."""


@dataclass(frozen=True)
class WorkerOptions:
    storage_url: str
    study_name: str
    artifacts: ArtifactLocation
    cache_dir: Path | None = None  # None: see service.artifacts.resolve_cache_dir
    device: str = "auto"
    threads: int | None = None
    max_trials: int | None = None
    storage_timeout_s: float = 600.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdsearchError(f"--device {name!r} asked for CUDA, but no GPU is visible; use cpu")
    return torch.device(name)


class GracefulStop:
    """Turns SIGTERM / SIGINT into ``StopRequested`` at a safe point.

    Inside ``interruptible()`` (the trial's computation) the signal raises at once; in
    storage calls and lock sections it is deferred to the next ``check()``, so a stop
    never leaves a half-done database update behind.
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
    """Beats for one running trial from a daemon thread, and fails other workers' stale
    trials on the way, so dead workers' trials are re-queued even while every live
    worker is busy training. Storage errors are logged, never fatal: a beat missed during
    a database outage is made up by the next one."""

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
                logger.warning("heartbeat failed (will retry): %s", str(exc).splitlines()[0])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Worker:
    """One worker process: setup (storage, spec, sampler, assets), then the trial loop."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.stop = GracefulStop()
        self.host = socket.gethostname()

    def _db(self, call: Callable[[], T], what: str) -> T:
        return with_reconnect(call, what, self.options.storage_timeout_s)

    def setup(self) -> None:
        options = self.options
        # The spec holds the heartbeat settings the worker's storage needs: read it with a
        # plain connection first, then drop that connection's pool.
        plain = open_storage(options.storage_url)
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
            sampler=build_sampler(spec, worker_seed(spec)),
        )
        self.device = pick_device(options.device)
        configure_device(self.device, options.threads)
        location = options.artifacts
        shared = S3Bucket(location) if location.is_s3 else None
        self.artifact_store = open_artifact_store(location, shared)
        cache = open_asset_cache(
            location, resolve_cache_dir(location, options.cache_dir), self.storage, shared
        )
        self.stage1_student: Path | None = None
        with self.stop.interruptible():  # fine-tuning a teacher can take long
            self.assets: StudyAssets = prepare_assets(spec, cache, self.device)
            if spec.stage1 is not None and not spec.stage1_per_trial:
                self.stage1_student = prepare_stage1_student(spec, self.assets, cache, self.device)
        self.teacher_artifacts = self._db(
            lambda: self._upload_teacher_predictions(str(location)),
            "uploading the teacher's predictions",
        )

    def _upload_teacher_predictions(self, location: str) -> dict[str, str]:
        """The teacher's prediction files, the same for every trial: uploaded once per
        study (and artifact location) as study artifacts, by the first worker."""
        with study_lock(self.storage, self.spec.name):
            uploaded = self.study.user_attrs.get(TEACHER_ARTIFACTS_ATTR)
            if uploaded and uploaded["location"] == location:
                return uploaded["ids"]
            ids = {
                name: upload_artifact(
                    artifact_store=self.artifact_store,
                    file_path=str(self.assets.folder / name),
                    study_or_trial=self.study,
                )
                for name in ("teacher_train.csv", "teacher_dev.csv")
            }
            self.study.set_user_attr(TEACHER_ARTIFACTS_ATTR, {"location": location, "ids": ids})
            return ids

    def run(self) -> int:
        """Run trials until the budget is reached. Returns the process exit code."""
        # The heartbeat thread calls Optuna's experimental heartbeat API; warning filters
        # set with catch_warnings are not thread-safe, so filter for the whole process.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        with self.stop.installed():
            try:
                self.setup()
                return self._loop()
            except StopRequested as stop:
                logger.warning("received %s: stopped", stop)
                return 0

    def _loop(self) -> int:
        ran = failures = 0
        poll_s = min(5.0, float(self.spec.reliability.heartbeat_interval_s))
        while self.options.max_trials is None or ran < self.options.max_trials:
            self.stop.check()
            claimed = self._db(
                lambda: claim_trial(self.study, self.spec, self.storage), "claiming a trial"
            )
            if claimed is Claim.DONE:
                logger.info(
                    "study %s: budget of %d trials reached", self.spec.name, self.spec.n_trials
                )
                break
            if claimed is Claim.WAIT:
                # Others' trials are running; one may still fail and need a re-run.
                time.sleep(poll_s)
                continue
            ok = self._run_trial(claimed)
            ran += 1
            failures = 0 if ok else failures + 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                logger.error("%d trials failed in a row; stopping this worker", failures)
                return 1
        return 0

    def _run_trial(self, trial: optuna.Trial) -> bool:
        """Run one trial and map its outcome to a state. True unless it FAILed."""
        spec = self.spec
        for key, value in {
            "worker_host": self.host,
            "worker_pid": os.getpid(),
            "device": str(self.device),
        }.items():
            self._db(lambda k=key, v=value: trial.set_user_attr(k, v), "recording the trial")
        history: list[ProbePoint] = []
        try:
            hparams = trial_hyperparameters(spec, trial.params)
            self._db(
                lambda: trial.set_user_attr("hyperparameters", hparams.model_dump()),
                "recording the trial",
            )
            logger.info("trial %d: %s", trial.number, hparams.model_dump())
            job = DistillationTrial(
                spec,
                self.assets,
                hparams,
                self.device,
                on_probe=lambda p: self._on_probe(trial, history, p),
                stage1=trial_stage1(spec, trial.params),
                stage1_student=self.stage1_student,
            )
            with Heartbeat(self.study, trial._trial_id, spec.reliability.heartbeat_interval_s):
                with self.stop.interruptible():
                    result = job.run()
                self._record(trial, result)
        except optuna.TrialPruned as pruned:
            logger.info("trial %d pruned: %s", trial.number, pruned)
            self._finish(trial, state=TrialState.PRUNED)
            return True
        except StopRequested:
            self._fail(trial, "worker stopped during the trial (re-queued)", count=False)
            raise
        except Exception as exc:
            logger.error("trial %d failed: %s", trial.number, exc, exc_info=True)
            self._fail(trial, f"{type(exc).__name__}: {exc}", count=True)
            return False
        if result.sigma != result.sigma:  # NaN: no input predicted right by both models
            self._fail(trial, "no train input is predicted right by both models", count=True)
            return False
        # Objectives: sigma on X_train and the dev accuracy drop, both minimised.
        self._finish(trial, values=[result.sigma, result.accuracy_drop])
        logger.info(
            "trial %d: sigma %.6f, accuracy_drop %.4f (%.1f s)",
            trial.number, result.sigma, result.accuracy_drop, result.attrs["wall_time_s"],
        )  # fmt: skip
        return True

    def _on_probe(self, trial: optuna.Trial, history: list[ProbePoint], point: ProbePoint) -> None:
        """Record the probe (visible in optuna-dashboard as a user attr), then ask the
        pruning rules. Raises ``optuna.TrialPruned`` to stop the trial."""
        history.append(point)
        points = [p.as_dict() for p in history]
        self._db(lambda: trial.set_user_attr(PROBES_ATTR, points), "recording a probe")
        finished: list[list[ProbePoint]] = []
        if "pareto" in self.spec.pruning.rule:
            done = self._db(
                lambda: self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                "reading finished trials",
            )
            finished = [
                [ProbePoint.from_dict(p) for p in t.user_attrs.get(PROBES_ATTR, [])] for t in done
            ]
        rule = should_prune(history, finished, self.spec.thresholds, self.spec.pruning)
        if rule:
            self._db(lambda: trial.set_user_attr("pruned_by", rule), "recording the pruning")
            raise optuna.TrialPruned(
                f"rule {rule!r} at epoch {point.epoch:.4g}/{point.epochs}: probe sigma "
                f"{point.sigma:.4f}, accuracy_drop {point.accuracy_drop:.4f}"
            )

    def _finish(self, trial: optuna.Trial, **outcome: object) -> None:
        def tell() -> None:
            try:
                self.study.tell(trial, **outcome)  # type: ignore[arg-type]
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

    def _fail(self, trial: optuna.Trial, error: str, count: bool) -> None:
        self._db(lambda: trial.set_user_attr("error", error), "recording the error")
        self._finish(trial, state=TrialState.FAIL)
        frozen = self._db(lambda: self.study.trials[trial.number], "reading the failed trial")
        if frozen.state == TrialState.FAIL:
            self._db(
                lambda: requeue(
                    self.study, frozen, self.spec.reliability.max_retries, error, count
                ),
                "re-queueing the trial",
            )

    def _record(self, trial: optuna.Trial, result: TrialResult) -> None:
        """User attrs, then the student's prediction files and the figures as trial
        artifacts; the ``artifacts`` attr also names the teacher's files (study
        artifacts), so any trial can be scored again (``pred,p0,p1,label``, rows in the
        split's order)."""
        for key, value in result.attrs.items():
            self._db(lambda k=key, v=value: trial.set_user_attr(k, v), "recording results")
        assets = self.assets
        artifact_ids = dict(self.teacher_artifacts)
        with tempfile.TemporaryDirectory() as tmp:
            files = {
                "student_train.csv": (result.student_probs_train, assets.train.labels),
                "student_dev.csv": (result.student_probs_dev, assets.dev.labels),
            }
            paths = {}
            for name, (probs, labels) in files.items():
                paths[name] = Path(tmp) / name
                write_predictions(paths[name], probs, labels.numpy())
            # Figures on the train split, where sigma is defined.
            teacher = assets.teacher_probs_train
            student, labels = result.student_probs_train, assets.train.labels.numpy()
            figures = {
                "confidence_delta_histogram.png": lambda p: plots.delta_histogram(
                    teacher, student, labels, result.sigma, self.spec.thresholds.sigma_max, p
                ),
                "confidence_scatter.png": lambda p: plots.confidence_scatter(
                    teacher, student, labels, p
                ),
                "reliability_diagram.png": lambda p: plots.reliability_diagram(
                    teacher, student, labels, p
                ),
            }
            for name, draw in figures.items():
                paths[name] = Path(tmp) / name
                draw(paths[name])
            for name, path in paths.items():
                artifact_ids[name] = self._db(
                    lambda p=path: upload_artifact(
                        artifact_store=self.artifact_store, file_path=str(p), study_or_trial=trial
                    ),
                    "uploading artifacts",
                )
        self._db(lambda: trial.set_user_attr("artifacts", artifact_ids), "recording artifacts")


def run_worker(options: WorkerOptions) -> int:
    return Worker(options).run()
