"""kdsearch from Python: the studies, workers and results the CLI gives, for notebooks.

    import kdsearch

    study = kdsearch.create_study("studies/demo-sst2.yaml", storage="sqlite:///kd.db")
    study.run_worker(max_trials=2)               # trials in this process
    df = study.trials_dataframe()                # one row per trial, typed columns
    preds = study.predictions(trial=0)           # per-input teacher/student probabilities

The API is small on purpose: a ``Study`` handle over the Optuna study (``study.optuna``
for everything else). Nothing here imports torch until a worker runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import tempfile
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from kdsearch.service.artifacts import explicit_artifacts, readable_store
from kdsearch.service.errors import KdsearchError
from kdsearch.service.record import TrialOutcome, TrialRecord
from kdsearch.service.spec import StudySpec, load_spec, spec_from_dict
from kdsearch.service.storage import open_storage, resolve_storage_url
from kdsearch.service.study import create_or_attach, load_stored_spec, study_artifacts

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
    if isinstance(spec, StudySpec):
        parsed = spec
    elif isinstance(spec, Mapping):
        parsed = spec_from_dict(dict(spec), source="<dict>", base_dir=Path.cwd())
    else:
        parsed = load_spec(spec)
    from kdsearch.service.artifacts import resolve_artifacts
    from kdsearch.workers.preflight import require_study_inputs

    require_study_inputs(parsed, "the study spec")  # data and model files, before storing
    url = resolve_storage_url(storage)
    explicit = explicit_artifacts(artifacts)
    location = str(resolve_artifacts(explicit)) if explicit else None
    create_or_attach(open_storage(url), parsed, artifacts=location)
    return Study(parsed.name, url)


def load_study(name: str, storage: str | None = None) -> Study:
    """An existing study (``KdsearchError`` if there is none by that name)."""
    url = resolve_storage_url(storage)
    load_stored_spec(open_storage(url, create=False), name)
    return Study(name, url)


class Study:
    """A kdsearch study: its spec, its workers, its results."""

    def __init__(self, name: str, storage_url: str) -> None:
        self.name = name
        self.storage_url = storage_url
        self._storage = open_storage(storage_url, create=False)
        self.spec: StudySpec = load_stored_spec(self._storage, name)

    def __repr__(self) -> str:
        return f"kdsearch.Study({self.name!r}, task={self.spec.task!r})"

    @property
    def optuna(self) -> optuna.Study:
        """The underlying Optuna study (values: sigma, accuracy_drop)."""
        return optuna.load_study(study_name=self.name, storage=self._storage)

    def run_worker(
        self,
        max_trials: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        artifacts: str | None = None,
        cache_dir: str | Path | None = None,
        storage_timeout_s: float = 600.0,
        sampler_seed: int | None = None,
        precision: str | None = None,
        mlflow: str | None = None,
        tensorboard: str | Path | None = None,
    ) -> None:
        """Run trials in this process until the study's budget is spent, or ``max_trials``
        have run. Same guarantees as ``kdsearch worker`` (heartbeat, retries, Ctrl-C
        re-queues the running trial). ``sampler_seed`` makes this worker's samples
        reproducible (default: derived from the study seed, host and process).
        ``precision``, ``mlflow`` and ``tensorboard`` override the study's
        ``training.precision`` and ``tracking``."""
        from kdsearch.workers.worker import Worker, WorkerOptions

        options = WorkerOptions(
            storage_url=self.storage_url,
            study_name=self.name,
            artifacts=explicit_artifacts(artifacts),
            cache_dir=Path(cache_dir) if cache_dir else None,
            device=device,
            threads=threads,
            max_trials=max_trials,
            storage_timeout_s=storage_timeout_s,
            sampler_seed=sampler_seed,
            precision=precision,
            mlflow=mlflow,
            tensorboard=str(tensorboard) if tensorboard else None,
        )
        Worker(options).run()

    def records(self) -> list[TrialRecord]:
        """Every trial, read typed (``kdsearch.service.record.TrialRecord``)."""
        now = datetime.datetime.now()
        return [TrialRecord.of(t, now) for t in self.optuna.get_trials(deepcopy=False)]

    def trials_dataframe(self) -> pd.DataFrame:
        """One row per trial: number, state, the searched hyperparameters, the objectives,
        feasibility, and every figure of ``TrialOutcome`` (missing until it finishes)."""
        import pandas as pd

        rows = []
        for r in self.records():
            row: dict[str, Any] = {
                "trial": r.number,
                "state": r.state.name,
                "baseline": r.baseline,
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
            "trial": "int64", "state": "string", "baseline": "bool", "attempt": "int64",
            "feasible": "boolean", "pruned_by": "string", "error": "string",
            "worker_host": "string", "device": "string", "elapsed_s": "float64",
            **{name: _param_dtype(self.spec, name) for name in self.spec.search_space},
            **_OUTCOME_DTYPES,
        }  # fmt: skip
        return frame.astype(dtypes)

    def configurations_dataframe(self) -> pd.DataFrame:
        """One row per configuration: its searched values, how many seeds finished, the
        mean, sd and confidence bounds of sigma and of the accuracy drop over them, and the
        verdict (feasible / infeasible / uncertain; ``service/racing.py``)."""
        import pandas as pd

        from kdsearch.service.racing import aggregate
        from kdsearch.service.report import configuration_rows

        rows = configuration_rows(aggregate(self.records(), self.spec), self.spec)
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        floats = [c for c in frame if c.startswith(("sigma_", "drop_"))]
        return frame.astype({**dict.fromkeys(floats, "float64"), "seeds": "int64"})

    def predictions(
        self, trial: int, split: str = "train", artifacts: str | None = None
    ) -> pd.DataFrame:
        """A finished trial's per-input probabilities on ``split`` (``train`` or ``dev``),
        rows in the split's order: ``label``, ``teacher_p0..``, ``student_p0..``,
        ``both_correct`` and ``delta`` (p0 teacher - p0 student), the columns sigma is
        computed from."""
        import numpy as np
        import pandas as pd
        from optuna.artifacts import download_artifact

        from kdsearch.workers.predictions import read_predictions

        if split not in ("train", "dev"):
            raise KdsearchError(f"split {split!r} is not allowed; use 'train' or 'dev'")
        record = next((r for r in self.records() if r.number == trial), None)
        if record is None or not record.artifacts:
            raise KdsearchError(
                f"trial {trial} of {self.name!r} has no prediction files (it did not finish); "
                "choose a COMPLETE trial"
            )
        location = study_artifacts(self._storage, self.name, explicit_artifacts(artifacts))
        store = readable_store(location)
        if store is None:
            raise KdsearchError(f"the artifact location {str(location)!r} cannot be read")
        loaded = {}
        with tempfile.TemporaryDirectory() as tmp:
            for who in ("teacher", "student"):
                path = Path(tmp) / f"{who}.csv"
                artifact_id = record.artifacts[f"{who}_{split}.csv"]
                download_artifact(
                    artifact_store=store, artifact_id=artifact_id, file_path=str(path)
                )
                loaded[who] = read_predictions(path)
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


def _pandas_dtype(annotation: Any) -> str:
    """The nullable pandas dtype of a ``TrialOutcome`` field's type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {float: "float64", int: "Int64"}.get(annotation, "object")  # lists: object


_HINTS = typing.get_type_hints(TrialOutcome)
_OUTCOME_DTYPES = {f.name: _pandas_dtype(_HINTS[f.name]) for f in dataclasses.fields(TrialOutcome)}


def _param_dtype(spec: StudySpec, name: str) -> str:
    from kdsearch.service.spec import INTEGER_HYPERPARAMETERS

    return "Int64" if name in INTEGER_HYPERPARAMETERS else "float64"


def _columns(spec: StudySpec) -> list[str]:
    return [
        "trial", "state", "baseline", "attempt", *spec.search_space, "feasible", "pruned_by",
        "error", "worker_host", "device", "elapsed_s", *_OUTCOME_DTYPES,
    ]  # fmt: skip
