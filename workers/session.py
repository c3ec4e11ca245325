"""One trial from its claim to its record: ``TrialSession.run`` trains it and returns how it
ended (``TrialEnd``); ``TrialSession.settle`` records that end, in one place.

Like Optuna's ``_run_trial``, every end maps to one state here:

==========================  ==========  ==========================================
the trial                   state       what else
==========================  ==========  ==========================================
finished                    COMPLETE    outcome, prediction files, figures
pruned (a rule)             PRUNED      its probes, the rule; constraints from the last probe
degenerate (sigma NaN)      PRUNED      its figures; never retried
its code raised             FAIL        the error; re-queued, a retry used
stopped (SIGTERM)           FAIL        re-queued, no retry used; the worker exits 0
store or disk unusable      FAIL        re-queued, no retry used; the worker exits 4
database gone               (none)      nothing can be written; it goes stale, re-run
settled by another worker   (none)      abandoned: one log line, nothing written
==========================  ==========  ==========================================

A trial is "settled by another worker" when this worker was silent past the grace period
(frozen, cut off) and another failed and re-queued it: every write this worker would make
then raises Optuna's ``UpdateFinishedTrialError``, its heartbeat sees the trial finished,
and the session abandons the trial without a second report. The worker goes on claiming.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import TrialState

from kdsearch.service.artifacts import remove_files, store_files
from kdsearch.service.claim import ClaimedTrial
from kdsearch.service.errors import InfrastructureError, StorageUnavailable
from kdsearch.service.faults import fault_point
from kdsearch.service.pruning import should_prune
from kdsearch.service.record import (
    DEGENERATE,
    FailureKind,
    ProbePoint,
    TrialAttr,
    TrialRecord,
    judged_objectives,
    set_trial_attrs,
    write_trial_attrs,
)
from kdsearch.service.recovery import requeue
from kdsearch.service.sampler import constraint_values, record_constraints
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import KdsearchStorage
from kdsearch.workers.assets import StudyAssets
from kdsearch.workers.figures import FigurePool
from kdsearch.workers.liveness import Heartbeat, StopRequested
from kdsearch.workers.recording import FigureDrawing, figure_jobs, prediction_files
from kdsearch.workers.stages import Recipe
from kdsearch.workers.stopping import GracefulStop
from kdsearch.workers.tracking import Tracking, TrialTracking
from kdsearch.workers.training import Cancelled
from kdsearch.workers.trial import DistillationTrial, TrialHooks, TrialResult

logger = logging.getLogger(__name__)
T = TypeVar("T")
Db = Callable[[Callable[[], T], str], T]


class Abandoned(Exception):
    """Another worker settled this worker's trial."""


@dataclass(frozen=True)
class WorkerContext:
    """What every trial of a worker shares: set up once per worker."""

    study: optuna.Study
    storage: KdsearchStorage
    spec: StudySpec
    recipe: Recipe
    assets: StudyAssets
    device: Any  # torch.device
    db: Db  # the worker's reconnecting storage-call wrapper
    stop: GracefulStop
    store: Any  # the artifact store
    location: str  # where it is (for messages)
    teacher_files: dict[str, str]  # the teacher's prediction files' artifact ids
    figures: FigurePool
    tracking: Tracking


@dataclass(frozen=True)
class TrialEnd:
    """How a trial ended: the one value ``settle`` records."""

    state: TrialState | None  # None: nothing to tell (abandoned, or the database is gone)
    result: TrialResult | None = None
    pruned_by: str | None = None
    failure: FailureKind | None = None
    error: str | None = None
    stop_worker: BaseException | None = None  # raised again once the end is recorded
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Not a failure of the trial's own doing (the worker's failure count)."""
        return self.failure != FailureKind.TRIAL


class TrialSession:
    """One trial's run: its probe history, its tracking runs, its heartbeat."""

    def __init__(self, claimed: ClaimedTrial, context: WorkerContext) -> None:
        self.claimed = claimed
        self.context = context
        self.trial = claimed.trial
        self.history: list[ProbePoint] = []
        self.tracking: TrialTracking | None = None
        self.heartbeat: Heartbeat | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="kdsearch-trial-")

    # --- running --------------------------------------------------------------------

    def run(self) -> TrialEnd:
        """Train and score the trial; every way it can end becomes a ``TrialEnd``."""
        ctx, config = self.context, self.claimed.config
        if config is None:
            return TrialEnd(TrialState.FAIL, failure=FailureKind.TRIAL, error=self.claimed.problem)
        interval = ctx.spec.reliability.heartbeat_interval_s
        try:
            with Heartbeat(ctx.study, ctx.storage, self.trial._trial_id, interval) as beat:
                self.heartbeat = beat
                job = DistillationTrial(
                    config, ctx.recipe, ctx.assets, ctx.device,
                    TrialHooks(on_probe=self._on_probe, cancelled=beat.lost.is_set),
                )  # fmt: skip
                self._started(job.steps_per_epoch)
                logger.info("trial %d: %s", self.trial.number, config.hyperparameters.model_dump())
                with ctx.stop.interruptible():
                    result = job.run()
                if math.isnan(result.sigma):
                    # Deterministic for this configuration and seed: a retry would repeat
                    # it, and a failure would count towards halting the study.
                    logger.info("trial %d: no train input right for both models", self.trial.number)
                    return TrialEnd(TrialState.PRUNED, result, pruned_by=DEGENERATE)
                fault_point("before-record")
                return TrialEnd(TrialState.COMPLETE, result, files=self._files(result))
        except optuna.TrialPruned as pruned:
            logger.info("trial %d pruned: %s", self.trial.number, pruned)
            return TrialEnd(TrialState.PRUNED, pruned_by=str(pruned.args[0]) if pruned.args else "")
        except (Abandoned, Cancelled, optuna.exceptions.UpdateFinishedTrialError):
            return TrialEnd(None)
        except StopRequested as stop:
            return TrialEnd(
                TrialState.FAIL, failure=FailureKind.STOPPED,
                error="worker stopped during the trial", stop_worker=stop,
            )  # fmt: skip
        except StorageUnavailable as gone:
            return TrialEnd(None, stop_worker=gone)  # nothing can be written: it goes stale
        except InfrastructureError as exc:
            return TrialEnd(
                TrialState.FAIL, failure=FailureKind.INFRASTRUCTURE,
                error=f"infrastructure: {exc}", stop_worker=exc,
            )  # fmt: skip
        except Exception as exc:
            logger.error("trial %d failed: %s", self.trial.number, exc, exc_info=True)
            return TrialEnd(
                TrialState.FAIL, failure=FailureKind.TRIAL, error=f"{type(exc).__name__}: {exc}"
            )

    def _started(self, steps_per_epoch: int) -> None:
        ctx, config = self.context, self.claimed.config
        assert config is not None
        attrs: dict[str, Any] = {
            TrialAttr.WORKER_HOST: socket.gethostname(),
            TrialAttr.WORKER_PID: os.getpid(),
            TrialAttr.DEVICE: str(ctx.device),
        }
        if ctx.tracking.enabled:
            record = TrialRecord.of(ctx.storage.get_trial(self.trial._trial_id))
            params = {**config.hyperparameters.model_dump(), **record.tags()}
            self.tracking = ctx.tracking.start(self.trial.number, params, steps_per_epoch)
            attrs[TrialAttr.TRACKING] = self.tracking.ids().as_dict()
        self._write(attrs, "recording the trial")

    def _on_probe(self, point: ProbePoint) -> None:
        """Record the probe (visible in optuna-dashboard as a user attr), then ask the
        pruning rules, unless the trial is protected. Raises ``optuna.TrialPruned`` to
        stop the trial."""
        ctx, config = self.context, self.claimed.config
        assert config is not None
        self.history.append(point)
        self._write({TrialAttr.PROBES: [p.as_dict() for p in self.history]}, "recording a probe")
        if self.tracking is not None:
            self.tracking.probe(point)
        if config.protected:
            return
        finished: list[list[ProbePoint]] = []
        if "pareto" in ctx.spec.pruning.rule:
            done = ctx.db(
                lambda: ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                "reading finished trials",
            )
            finished = [TrialRecord.of(t).probes for t in done]
        rule = should_prune(self.history, finished, ctx.spec.thresholds, ctx.spec.pruning)
        if rule:
            logger.info(
                "trial %d: rule %r prunes it at epoch %.4g/%d: probe sigma %.4f, accuracy_drop "
                "%.4f", self.trial.number, rule, point.epoch, point.epochs, point.sigma,
                point.accuracy_drop,
            )  # fmt: skip
            raise optuna.TrialPruned(rule)

    def _files(self, result: TrialResult) -> dict[str, Path]:
        """The trial's prediction files and figures, drawn by the figure processes."""
        ctx, tmp = self.context, Path(self._tmp.name)
        jobs = figure_jobs(tmp, result, self.history, ctx.assets, ctx.spec.thresholds)
        drawing = FigureDrawing(ctx.figures, jobs, tmp)
        return {**prediction_files(tmp, result, ctx.assets), **drawing.files()}

    def _write(self, attrs: dict[str, Any], what: str) -> None:
        ctx = self.context
        try:
            ctx.db(lambda: set_trial_attrs(ctx.storage, self.trial._trial_id, attrs), what)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise Abandoned(what) from None

    # --- settling -------------------------------------------------------------------

    def settle(self, end: TrialEnd) -> None:
        """Record ``end``: the trial's attrs (and files), its constraints, its state told
        to Optuna, a re-run queued for a failure, its tracking runs ended. A trial someone
        else settled meanwhile is abandoned here too, once, whatever write finds out."""
        try:
            if end.state is None:
                self._abandoned(end)
                if end.stop_worker is not None:
                    raise end.stop_worker
            else:
                self._record(end)
        except StorageUnavailable:
            if not isinstance(end.stop_worker, StopRequested):
                raise
            logger.warning("could not record the stop; the trial will go stale instead")
            raise end.stop_worker from None
        finally:
            self._tmp.cleanup()

    def _abandoned(self, end: TrialEnd) -> None:
        if end.stop_worker is None:
            logger.warning(
                "trial %d: abandoned (another worker settled it while this one was silent); "
                "nothing recorded here, its re-run is queued",
                self.trial.number,
            )
        if self.tracking is not None:
            self.tracking.finish(None)

    def _record(self, end: TrialEnd) -> None:
        ctx = self.context
        number = self.trial.number
        stored: dict[str, dict[str, Any]] = {}
        try:
            attrs, stored = self._end_attrs(end)
            write = lambda: write_trial_attrs(ctx.storage, self.trial._trial_id, attrs, stored)  # noqa: E731
            ctx.db(write, "recording the trial's end")
            if end.state in (TrialState.COMPLETE, TrialState.PRUNED):
                outcome = end.result.outcome if end.result is not None else None
                sigma, drop = judged_objectives(outcome, self.history)
                values = constraint_values(sigma, drop, ctx.spec.thresholds)
                ctx.db(lambda: record_constraints(self.trial, values), "recording constraints")
            told = ctx.db(lambda: self._tell(end), f"finishing trial {number}")
        except optuna.exceptions.UpdateFinishedTrialError:
            told = False
        except InfrastructureError as exc:
            # The store failed while the files were written: the trial is an
            # infrastructure failure after all (store_files removed what it wrote).
            self._record(
                TrialEnd(TrialState.FAIL, failure=FailureKind.INFRASTRUCTURE,
                         error=f"infrastructure: {exc}", stop_worker=exc)
            )  # fmt: skip
            return
        if not told:
            remove_files(ctx.store, [meta["artifact_id"] for meta in stored.values()])
            self._abandoned(TrialEnd(None))
            return
        if self.tracking is not None:
            outcome = end.result.outcome if end.result is not None else None
            self.tracking.finish(
                end.state, outcome, {k: v for k, v in end.files.items() if k.endswith(".png")}
            )
        if end.state == TrialState.FAIL:
            self._requeue(end)
        elif end.state == TrialState.COMPLETE and end.result is not None:
            logger.info(
                "trial %d: sigma %.6f, accuracy_drop %.4f (%.1f s)",
                number, end.result.sigma, end.result.accuracy_drop, end.result.outcome.wall_time_s,
            )  # fmt: skip
        if end.stop_worker is not None:
            raise end.stop_worker

    def _end_attrs(self, end: TrialEnd) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The attrs of ``end``, with the files stored (their metadata goes with them)."""
        ctx = self.context
        attrs: dict[str, Any] = {}
        stored: dict[str, dict[str, Any]] = {}
        if end.result is not None:
            attrs.update(end.result.outcome.attrs())
        if end.pruned_by is not None:
            attrs[TrialAttr.PRUNED_BY] = end.pruned_by
        if end.state == TrialState.FAIL:
            attrs.update({TrialAttr.ERROR: end.error, TrialAttr.FAILURE: end.failure})
        if end.files:
            stored = store_files(ctx.store, end.files, ctx.location)
            ids = {name: meta["artifact_id"] for name, meta in stored.items()}
            attrs[TrialAttr.ARTIFACTS] = {**ctx.teacher_files, **ids}
        return attrs, stored

    def _tell(self, end: TrialEnd) -> bool:
        """Tell Optuna; False when the trial was already finished by someone else (an
        earlier attempt of this very call that went through before a connection dropped
        counts as ours: its values are ours)."""
        ctx = self.context
        values = None
        if end.state == TrialState.COMPLETE and end.result is not None:
            # Objectives: sigma on X_train and the dev accuracy drop, both minimised.
            values = [end.result.sigma, end.result.accuracy_drop]
        before = ctx.storage.trial_state(self.trial._trial_id)
        if before != TrialState.RUNNING:
            frozen = ctx.storage.get_trial(self.trial._trial_id)
            return before == end.state and (values is None or list(frozen.values or []) == values)
        if values is not None:
            ctx.study.tell(self.trial, values, skip_if_finished=True)
        else:
            ctx.study.tell(self.trial, state=end.state, skip_if_finished=True)
        frozen = ctx.storage.get_trial(self.trial._trial_id)
        return frozen.state == end.state and (values is None or list(frozen.values or []) == values)

    def _requeue(self, end: TrialEnd) -> None:
        """Only the process that moved the trial to FAIL re-queues it; only a failure of
        the trial's own doing uses up a retry."""
        ctx = self.context
        frozen = ctx.db(
            lambda: ctx.storage.get_trial(self.trial._trial_id), "reading the failed trial"
        )
        count = end.failure == FailureKind.TRIAL
        ctx.db(
            lambda: requeue(
                ctx.study, frozen, ctx.spec.reliability.max_retries, end.error or "", count
            ),
            "re-queueing the trial",
        )
