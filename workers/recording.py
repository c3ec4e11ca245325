"""What a trial leaves besides its attrs: its files, and the study's teacher files.

- ``trial_files``: a finished trial's prediction files in the paper's CSV format
  (``pred,p0,p1,label``, rows in the split's order) and its figures, drawn by the figure
  processes (``workers/figures.py``) while the caller writes the outcome.
- ``teacher_artifacts``: the teacher's prediction files, the same for every trial,
  uploaded once per study (and artifact location) as study artifacts by the first worker;
  each trial's ``artifacts`` attr names them too, so any trial can be scored again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.artifacts import upload_artifact

from kdsearch.service.errors import InfrastructureError, first_line
from kdsearch.service.record import (
    ArtifactName,
    ProbePoint,
    StudyAttr,
    TeacherArtifacts,
    set_study_attr,
)
from kdsearch.service.spec import Thresholds
from kdsearch.service.storage import KdsearchStorage, critical_section
from kdsearch.workers.assets import StudyAssets
from kdsearch.workers.figures import FigurePool, Job
from kdsearch.workers.plots import Marks
from kdsearch.workers.predictions import write_predictions
from kdsearch.workers.trial import TrialResult

logger = logging.getLogger(__name__)
T = TypeVar("T")
Db = Callable[[Callable[[], T], str], T]


def prediction_files(tmp: Path, result: TrialResult, assets: StudyAssets) -> dict[str, Path]:
    """The student's prediction files, in the paper's CSV format."""
    paths = {name: tmp / name for name in (ArtifactName.STUDENT_TRAIN, ArtifactName.STUDENT_DEV)}
    write_predictions(
        paths[ArtifactName.STUDENT_TRAIN], result.student_probs_train, assets.labels_train
    )
    write_predictions(paths[ArtifactName.STUDENT_DEV], result.student_probs_dev, assets.labels_dev)
    return paths


def figure_jobs(
    tmp: Path,
    result: TrialResult,
    probes: list[ProbePoint],
    assets: StudyAssets,
    limits: Thresholds,
) -> dict[str, Job]:
    """The trial's figures to draw, by file name (``workers/plots.py``)."""
    # Figures on the train split, where sigma is defined.
    train = (assets.teacher_probs_train, result.student_probs_train, assets.labels_train)
    jobs: dict[str, Job] = {
        ArtifactName.HISTOGRAM: (
            "delta_histogram",
            (
                *train,
                Marks(result.sigma, limits.sigma_max, assets.label_names),
                tmp / ArtifactName.HISTOGRAM,
            ),
        ),
        ArtifactName.SCATTER: ("confidence_scatter", (*train, tmp / ArtifactName.SCATTER)),
        ArtifactName.RELIABILITY: (
            "reliability_diagram",
            (*train, tmp / ArtifactName.RELIABILITY),
        ),
    }
    if probes:
        jobs[ArtifactName.PROBE_CURVE] = (
            "probe_curve",
            (probes, limits.sigma_max, limits.accuracy_drop_max, tmp / ArtifactName.PROBE_CURVE),
        )
    return jobs


class FigureDrawing:
    """A trial's figures being drawn (each job writes ``tmp / <its name>``): made when the
    drawing starts, ``files`` waits for them."""

    def __init__(self, pool: FigurePool, jobs: dict[str, Job], tmp: Path) -> None:
        self.pool = pool
        self.jobs = jobs
        self.tmp = tmp
        self.pending = pool.submit(jobs)

    def files(self) -> dict[str, Path]:
        self.pool.wait(self.jobs, self.pending)
        return {name: self.tmp / name for name in self.jobs}


def teacher_artifacts(
    study: optuna.Study,
    storage: KdsearchStorage,
    store: Any,
    location: str,
    assets: StudyAssets,
    db: Db,
) -> dict[str, str]:
    """The teacher's prediction files' artifact ids, uploading them first if this study
    (and location) has none yet. The upload happens outside the study's critical section;
    only the check-and-set is inside, so a worker that lost the race leaves two small
    unused files, never two records."""
    current = TeacherArtifacts.from_dict(
        db(lambda: study.user_attrs.get(StudyAttr.TEACHER_ARTIFACTS), "reading the study")
    )
    if current is not None and current.location == location:
        return current.ids

    def upload(name: str) -> str:
        try:
            return upload_artifact(
                artifact_store=store, file_path=str(assets.folder / name), study_or_trial=study
            )
        except Exception as exc:
            if (
                isinstance(exc, optuna.exceptions.OptunaError)
                or "sqlalchemy" in type(exc).__module__
            ):
                raise  # the database, not the store: the db wrapper reconnects
            raise InfrastructureError(
                f"cannot write to the artifact store {location!r}: {first_line(exc)}. Make it "
                "writable (or give another --artifacts) and start the worker again"
            ) from None

    ids = {
        name: db(lambda name=name: upload(name), f"uploading {name}")
        for name in ArtifactName.TEACHER_FILES
    }

    def publish() -> dict[str, str]:
        with critical_section(storage, study.study_name):
            now = TeacherArtifacts.from_dict(study.user_attrs.get(StudyAttr.TEACHER_ARTIFACTS))
            if now is not None and now.location == location:
                return now.ids
            set_study_attr(
                study, StudyAttr.TEACHER_ARTIFACTS, TeacherArtifacts(location, ids).as_dict()
            )
            return ids

    return db(publish, "recording the teacher's predictions")
