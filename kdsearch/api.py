"""kdsearch from Python: the studies, workers and results the CLI gives, for notebooks.

    import kdsearch

    study = kdsearch.create_study("studies/demo-sst2.yaml", storage="sqlite:///kd.db")
    study.run_worker(max_trials=2)               # trials in this process
    study.answer()                               # the configuration the study names
    df = study.trials_dataframe()                # one row per trial, typed columns
    preds = study.predictions(trial=0)           # per-input teacher/student probabilities

The API is small on purpose: a ``Study`` handle over the Optuna study (``study.optuna``
for everything else). Nothing here imports torch until a worker runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
import tempfile
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from kdsearch.service.artifacts import (
    check_location,
    explicit_artifacts,
    readable_store,
    resolve_artifacts,
    study_artifacts,
)
from kdsearch.service.errors import KdsearchError
from kdsearch.service.record import ArtifactName, TrialOutcome, TrialRecord
from kdsearch.service.spec import INTEGER_HYPERPARAMETERS, StudySpec, short
from kdsearch.service.storage import open_storage, redact, resolve_storage_url, study_names
from kdsearch.service.study import create_or_attach, load_stored_spec
from kdsearch.service.summary import StudySummary, judge_study, read_records, summarize

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Study", "create_study", "load_study"]


def create_study(
    spec: str | Path | Mapping[str, Any] | StudySpec,
    storage: str | None = None,
    artifacts: str | None = None,
) -> Study:
    """Create the study a spec describes, or attach to it if it exists with the same spec.

    ``spec``: a YAML path, a mapping with the YAML's keys (relative paths resolve against
    the working folder) or a ``StudySpec``. ``storage``: a database URL (default:
    ``$KDSEARCH_STORAGE``, else ``sqlite:///kdsearch.db``). ``artifacts``: where the
    study's workers keep their files (default: ``$KDSEARCH_ARTIFACTS``, else recorded by
    the first worker). Bad input raises ``KdsearchError`` and writes nothing.
    """
    from kdsearch.workers.preflight import load_study_spec

    _check_text("storage", storage)
    _check_text("artifacts", artifacts)
    parsed = load_study_spec(spec)  # the schema, the data and model files: before storing
    url = resolve_storage_url(storage)
    explicit = explicit_artifacts(artifacts)
    location = str(resolve_artifacts(explicit)) if explicit else None
    if location is not None:
        check_location(resolve_artifacts(location))  # before the database is touched
    created = create_or_attach(open_storage(url), parsed, artifacts=location)
    return Study(parsed.name, url, created=created)


def load_study(name: str, storage: str | None = None) -> Study:
    """An existing study (``KdsearchError`` if there is none by that name)."""
    _check_text("name", name, required=True)
    _check_text("storage", storage)
    return Study(name, resolve_storage_url(storage))


_TEXT_HINTS = {
    "name": "the study's name, as in its YAML",
    "storage": "a database URL like postgresql+psycopg2://USER@HOST/DB or sqlite:///kdsearch.db, "
    "or leave it out for $KDSEARCH_STORAGE",
    "artifacts": "a folder or s3://BUCKET/PREFIX, or leave it out for the default",
}


def _check_text(what: str, value: Any, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str | Path) or not str(value):
        raise KdsearchError(
            f"{what} must be a non-empty text, not {short(value)}; give {_TEXT_HINTS[what]}"
        )


class Study:
    """A kdsearch study: its spec, its workers, its results."""

    def __init__(self, name: str, storage_url: str, created: bool = False) -> None:
        self.name = name
        self.storage_url = storage_url
        self.created = created  # this handle's create_study made it (False: attached)
        self._storage = open_storage(storage_url, create=False)
        self.spec: StudySpec = load_stored_spec(self._storage, name)

    def __repr__(self) -> str:
        return f"kdsearch.Study({self.name!r}, task={self.spec.task!r})"

    @property
    def shown_storage(self) -> str:
        """The storage URL, password hidden."""
        return redact(self.storage_url)

    def _exists(self) -> None:
        if self.name not in study_names(self._storage):
            raise KdsearchError(
                f"study {self.name!r} no longer exists in {self.shown_storage} (deleted?); "
                "create it again with kdsearch.create_study"
            )

    @property
    def optuna(self) -> optuna.Study:
        """The underlying Optuna study (values: sigma, accuracy_drop)."""
        self._exists()
        return optuna.load_study(study_name=self.name, storage=self._storage)

    def run_worker(self, **options: Any) -> None:
        """Run trials in this process until the study's budget is spent, or
        ``max_trials`` have run. Same guarantees as ``kdsearch worker`` (heartbeat,
        retries, Ctrl-C re-queues the running trial). Options, as the CLI's (see
        ``kdsearch worker --help``): ``max_trials``, ``device``, ``threads``,
        ``artifacts``, ``cache_dir``, ``storage_timeout_s``, ``precision``, ``mlflow``,
        ``tensorboard``. Logs go to the ``kdsearch`` logger (shown at INFO unless logging
        is configured already)."""
        from kdsearch.workers.models import quiet_transformers
        from kdsearch.workers.options import WorkerOptions
        from kdsearch.workers.worker import Worker

        self._exists()
        worker_options = WorkerOptions.from_api(self.storage_url, self.name, options)
        _show_logs()
        quiet_transformers()
        Worker(worker_options).run()

    def records(self) -> list[TrialRecord]:
        """Every trial, read typed (``kdsearch.service.record.TrialRecord``)."""
        self._exists()
        study = self.optuna
        now = datetime.datetime.now()
        return [TrialRecord.of(t, now) for t in study.get_trials(deepcopy=False)]

    def summary(self) -> StudySummary:
        """The study at a glance: its configurations, its baseline's verdict, its answer."""
        study = self.optuna
        records = read_records(study)
        return summarize(records, self.spec, judge_study(records, self.spec, study))

    def answer(self) -> dict[str, Any] | None:
        """The configuration the study names (as ``kdsearch status`` and ``report`` do),
        with whether it is confirmed on held-out seeds and the figures it rests on; None
        while there is none."""
        s = self.summary()
        if s.answer is None:
            return None
        return {
            "config": s.answer.config,
            "params": s.answer.params,
            "confirmed": s.answer_confirmed,
            "sigma": s.answer_sigma,
            "accuracy_drop": s.answer_accuracy_drop,
            "seeds": s.answer_seeds,
            "trials": s.answer_trials,
            "export_trial": s.answer_trial,
        }

    def trials_dataframe(self) -> pd.DataFrame:
        """One row per trial: number, state, role, configuration, seed, the searched
        hyperparameters, the objectives, feasibility, and every figure of
        ``TrialOutcome`` (missing until it finishes)."""
        import pandas as pd

        rows = []
        for r in self.records():
            row: dict[str, Any] = {
                "trial": r.number,
                "state": r.state.name,
                "role": r.role.value,
                "baseline": r.baseline,
                "config": r.config,
                "replicate": r.replicate,
                "seed": r.seed,
                "attempt": r.attempt,
                **{name: r.params.get(name) for name in self.spec.search_space},
                "feasible": r.feasible,
                "pruned_by": r.pruned_by,
                "error": r.error,
                "worker_host": r.worker_host,
                "device": r.device,
                "elapsed_s": r.elapsed_s,
            }
            outcome = dataclasses.asdict(r.outcome) if r.outcome else {}
            row.update({name: outcome.get(name) for name in _OUTCOME_DTYPES})
            rows.append(row)
        frame = pd.DataFrame(rows, columns=[*_columns(self.spec)])
        dtypes = {
            "trial": "int64", "state": "string", "role": "string", "baseline": "bool",
            "config": "string", "replicate": "int64", "seed": "Int64", "attempt": "int64",
            "feasible": "boolean", "pruned_by": "string", "error": "string",
            "worker_host": "string", "device": "string", "elapsed_s": "float64",
            **{name: _param_dtype(name) for name in self.spec.search_space},
            **_OUTCOME_DTYPES,
        }  # fmt: skip
        return frame.astype(dtypes)

    def configurations_dataframe(self) -> pd.DataFrame:
        """One row per configuration: its searched values, its search seeds' figures (mean,
        sd, confidence bounds of sigma and of the accuracy drop), the verdict, its
        held-out seeds' figures apart, and whether it is the study's answer."""
        import pandas as pd

        frame = pd.DataFrame([c.flat() for c in self.summary().configurations])
        if frame.empty:
            return frame
        floats = [c for c in frame if c.endswith(("_mean", "_sd", "_low", "_high"))]
        return frame.astype(
            {**dict.fromkeys(floats, "float64"), "seeds": "int64", "confirmation_seeds": "int64"}
        )

    def _prediction_record(self, trial: int) -> TrialRecord:
        if isinstance(trial, bool) or not isinstance(trial, int):
            raise KdsearchError(f"trial must be a trial number (0, 1, 2, ...), not {trial!r}")
        record = next((r for r in self.records() if r.number == trial), None)
        if record is None or not record.artifacts:
            raise KdsearchError(
                f"trial {trial} of {self.name!r} has no prediction files (it did not finish); "
                "choose a COMPLETE trial (kdsearch status lists them)"
            )
        return record

    def prediction_files(
        self, trial: int, out: str | Path, artifacts: str | None = None
    ) -> list[Path]:
        """Save a finished trial's four prediction files (``teacher_train.csv``,
        ``teacher_dev.csv``, ``student_train.csv``, ``student_dev.csv``; the paper's
        ``pred,p0,p1,label`` format) into folder ``out``; returns their paths."""
        from optuna.artifacts import download_artifact

        record = self._prediction_record(trial)
        store = self._store(artifacts)
        folder = Path(out)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KdsearchError(f"cannot write to {str(folder)!r}: {exc.strerror}") from None
        written = []
        for who in ("teacher", "student"):
            for split in ("train", "dev"):
                name = ArtifactName.predictions(who, split)
                path = folder / name
                with tempfile.TemporaryDirectory() as tmp:
                    download_artifact(
                        artifact_store=store, artifact_id=record.artifacts[name],
                        file_path=str(Path(tmp) / name),
                    )  # fmt: skip
                    shutil.move(str(Path(tmp) / name), path)
                written.append(path)
        return written

    def _store(self, artifacts: str | None) -> Any:
        location = study_artifacts(self._storage, self.name, explicit_artifacts(artifacts))
        store = readable_store(location)
        if store is None:
            raise KdsearchError(f"the artifact location {str(location)!r} cannot be read")
        return store

    def predictions(
        self, trial: int, split: str = "train", artifacts: str | None = None
    ) -> pd.DataFrame:
        """A finished trial's per-input probabilities on ``split`` (``train`` or ``dev``),
        rows in the split's order: ``label``, ``teacher_p0..``, ``student_p0..``,
        ``both_correct`` and ``delta`` (p0 teacher - p0 student), the columns sigma is
        computed from."""
        import numpy as np
        import pandas as pd

        from kdsearch.workers.predictions import read_predictions

        if split not in ("train", "dev"):
            raise KdsearchError(f"split {split!r} is not allowed; use 'train' or 'dev'")
        with tempfile.TemporaryDirectory() as tmp:
            files = self.prediction_files(trial, tmp, artifacts)
            loaded = {
                who: read_predictions(
                    next(p for p in files if p.name == ArtifactName.predictions(who, split))
                )
                for who in ("teacher", "student")
            }
        teacher, student = loaded["teacher"], loaded["student"]
        frame = pd.DataFrame({"label": teacher.labels})
        for who, preds in loaded.items():
            for c in range(preds.probs.shape[1]):
                frame[f"{who}_p{c}"] = preds.probs[:, c]
        frame["both_correct"] = (teacher.preds == teacher.labels) & (
            student.preds == teacher.labels
        )
        frame["delta"] = np.where(
            frame["both_correct"], teacher.probs[:, 0] - student.probs[:, 0], np.nan
        )
        return frame


def _show_logs() -> None:
    """In a notebook nothing configures logging: show kdsearch's INFO lines (the trials,
    their figures) there, as Optuna shows its own, unless logging is configured."""
    root, own = logging.getLogger(), logging.getLogger("kdsearch")
    if root.handlers or own.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    own.addHandler(handler)
    own.setLevel(logging.INFO)


def _pandas_dtype(annotation: Any) -> str:
    """The nullable pandas dtype of a ``TrialOutcome`` field's type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {float: "float64", int: "Int64"}.get(annotation, "object")  # lists: object


_HINTS = typing.get_type_hints(TrialOutcome)
_OUTCOME_DTYPES = {f.name: _pandas_dtype(_HINTS[f.name]) for f in dataclasses.fields(TrialOutcome)}


def _param_dtype(name: str) -> str:
    return "Int64" if name in INTEGER_HYPERPARAMETERS else "float64"


def _columns(spec: StudySpec) -> list[str]:
    return [
        "trial", "state", "role", "baseline", "config", "replicate", "seed", "attempt",
        *spec.search_space, "feasible", "pruned_by", "error", "worker_host", "device",
        "elapsed_s", *_OUTCOME_DTYPES,
    ]  # fmt: skip
