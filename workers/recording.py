"""Recording a trial: who runs it, its probes, its outcome, its files.

Every user attr goes through ``kdsearch.service.record`` (declared keys only); every
storage call goes through the worker's reconnecting ``db`` wrapper.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.artifacts import upload_artifact

from kdsearch.service.errors import InfrastructureError, first_line
from kdsearch.service.record import (
    DEGENERATE,
    ProbePoint,
    StudyAttr,
    TrialAttr,
    set_study_attr,
    set_trial_attrs,
)
from kdsearch.service.spec import Hyperparameters, StudySpec
from kdsearch.service.storage import study_lock
from kdsearch.workers.assets import StudyAssets
from kdsearch.workers.figures import FigurePool, Job
from kdsearch.workers.predictions import write_predictions
from kdsearch.workers.tracking import TrialTracking
from kdsearch.workers.trial import TrialResult

logger = logging.getLogger(__name__)
T = TypeVar("T")
Db = Callable[[Callable[[], T], str], T]

TEACHER_FILES = ("teacher_train.csv", "teacher_dev.csv")


class Recorder:
    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        spec: StudySpec,
        assets: StudyAssets,
        artifact_store: Any,
        location: str,
        db: Db,
        figures: FigurePool | None = None,
    ) -> None:
        """``figures``: the processes that draw the trial figures (None: drawn here)."""
        self.figures = figures or FigurePool(0)
        self.study = study
        self.storage = storage
        self.spec = spec
        self.assets = assets
        self.artifact_store = artifact_store
        self.location = location
        self.db = db
        self.teacher_artifacts: dict[str, str] = {}

    def upload_teacher_predictions(self) -> None:
        """The teacher's prediction files, the same for every trial: uploaded once per
        study (and artifact location) as study artifacts, by the first worker. The upload
        (network I/O with S3) happens outside the study lock; only the check-and-set is
        inside, so a worker that lost the race leaves two small unused files, never two
        records."""
        uploaded = self.db(
            lambda: self.study.user_attrs.get(StudyAttr.TEACHER_ARTIFACTS), "reading the study"
        )
        if uploaded and uploaded["location"] == self.location:
            self.teacher_artifacts = uploaded["ids"]
            return
        ids = {name: self._upload(self.assets.folder / name, self.study) for name in TEACHER_FILES}

        def publish() -> dict[str, str]:
            with study_lock(self.storage, self.spec.name):
                current = self.study.user_attrs.get(StudyAttr.TEACHER_ARTIFACTS)
                if current and current["location"] == self.location:
                    return current["ids"]
                value = {"location": self.location, "ids": ids}
                set_study_attr(self.study, StudyAttr.TEACHER_ARTIFACTS, value)
                return ids

        self.teacher_artifacts = self.db(publish, "recording the teacher's predictions")

    def started(
        self, trial: optuna.Trial, hparams: Hyperparameters, device: str, precision: str
    ) -> None:
        attrs = {
            TrialAttr.WORKER_HOST: socket.gethostname(),
            TrialAttr.WORKER_PID: os.getpid(),
            TrialAttr.DEVICE: device,
            TrialAttr.PRECISION: precision,
            TrialAttr.HYPERPARAMETERS: hparams.model_dump(),
        }
        self._set(trial, attrs, "recording the trial")

    def probed(self, trial: optuna.Trial, history: list[ProbePoint]) -> None:
        points = [p.as_dict() for p in history]
        self._set(trial, {TrialAttr.PROBES: points}, "recording a probe")

    def pruned(self, trial: optuna.Trial, rule: str) -> None:
        self._set(trial, {TrialAttr.PRUNED_BY: rule}, "recording pruning")

    def degenerate(self, trial: optuna.Trial, result: TrialResult) -> None:
        """A student that gets no train input right with the teacher: its figures (sigma
        NaN, the accuracies as measured) and why it ends PRUNED."""
        attrs = {**result.outcome.attrs(), TrialAttr.PRUNED_BY: DEGENERATE}
        self._set(trial, attrs, "recording results")

    def failed(self, trial: optuna.Trial, error: str, kind: str) -> None:
        self._set(trial, {TrialAttr.ERROR: error, TrialAttr.FAILURE: kind}, "recording the error")

    def finished(
        self,
        trial: optuna.Trial,
        result: TrialResult,
        probes: list[ProbePoint],
        tracking: TrialTracking | None = None,
    ) -> None:
        """The outcome's figures, then the student's prediction files and the figures as
        trial artifacts; the ``artifacts`` attr also names the teacher's files (study
        artifacts), so any trial can be scored again (``pred,p0,p1,label``, rows in the
        split's order). ``tracking`` gets the outcome and the figures too."""
        artifact_ids = dict(self.teacher_artifacts)
        with tempfile.TemporaryDirectory() as tmp:
            # The figures (the largest part of recording a trial) are drawn by the figure
            # processes while this one writes to the database and the store.
            jobs = self._figure_jobs(Path(tmp), result, probes)
            pending = self.figures.submit(jobs)
            self._set(trial, result.outcome.attrs(), "recording results")
            for name, path in self._predictions(Path(tmp), result).items():
                artifact_ids[name] = self._upload(path, trial)
            self.figures.wait(jobs, pending)
            figures = {name: Path(tmp) / name for name in jobs}
            for name, path in figures.items():
                artifact_ids[name] = self._upload(path, trial)
            if tracking is not None:
                tracking.finish("COMPLETE", result.outcome, figures)
        self._set(trial, {TrialAttr.ARTIFACTS: artifact_ids}, "recording artifacts")

    def tracked(self, trial: optuna.Trial, ids: dict[str, str]) -> None:
        if ids:
            self._set(trial, {TrialAttr.TRACKING: ids}, "recording the tracking runs")

    def _set(self, trial: optuna.Trial, attrs: dict[str, Any], what: str) -> None:
        self.db(lambda: set_trial_attrs(self.storage, trial._trial_id, attrs), what)

    def _predictions(self, tmp: Path, result: TrialResult) -> dict[str, Path]:
        """The student's prediction files, in the paper's CSV format."""
        assets = self.assets
        paths = {name: tmp / name for name in ("student_train.csv", "student_dev.csv")}
        write_predictions(
            paths["student_train.csv"], result.student_probs_train, assets.labels_train
        )
        write_predictions(paths["student_dev.csv"], result.student_probs_dev, assets.labels_dev)
        return paths

    def _figure_jobs(
        self, tmp: Path, result: TrialResult, probes: list[ProbePoint]
    ) -> dict[str, Job]:
        """The trial's figures to draw, by file name (``workers/plots.py``)."""
        assets, limits = self.assets, self.spec.thresholds
        # Figures on the train split, where sigma is defined.
        train = (assets.teacher_probs_train, result.student_probs_train, assets.labels_train)
        histogram = "confidence_delta_histogram.png"
        jobs: dict[str, Job] = {
            histogram: (
                "delta_histogram",
                (*train, result.sigma, limits.sigma_max, tmp / histogram, assets.label_names),
            ),
            "confidence_scatter.png": (
                "confidence_scatter",
                (*train, tmp / "confidence_scatter.png"),
            ),
            "reliability_diagram.png": (
                "reliability_diagram",
                (*train, tmp / "reliability_diagram.png"),
            ),
        }
        if probes:
            jobs["probe_curve.png"] = (
                "probe_curve",
                (probes, limits.sigma_max, limits.accuracy_drop_max, tmp / "probe_curve.png"),
            )
        return jobs

    def _upload(self, path: Path, owner: optuna.Study | optuna.Trial) -> str:
        def upload() -> str:
            try:
                return upload_artifact(
                    artifact_store=self.artifact_store, file_path=str(path), study_or_trial=owner
                )
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.OptunaError):
                raise  # the database, not the store: the db wrapper reconnects
            except Exception as exc:  # a read-only or full folder, an unreachable bucket
                raise InfrastructureError(
                    f"cannot write to the artifact store {self.location!r}: {first_line(exc)}. "
                    "Make it writable (or give another --artifacts) and start the worker again"
                ) from None

        return self.db(upload, f"uploading {path.name}")
