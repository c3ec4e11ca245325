"""Optional experiment tracking: every trial also logged to MLflow and / or TensorBoard.

The study database stays the record: pruning, verdicts, reports and resuming read it
only. Tracking is a copy for the tools users already follow runs in:

- MLflow: one experiment per study (named after it), one parent run for the study
  (created once, by the first worker, under the study lock; its id is a study attr) and
  one nested run per trial: every hyperparameter and the replicate's seed as params, the
  probes and the epoch losses as metric curves (step = optimizer steps done), the final
  figures as metrics, the plots as artifacts, and the trial's end state (FINISHED,
  KILLED when pruned, FAILED).
- TensorBoard: ``<dir>/<study>/trial-<n>`` per trial: the same curves as scalars, the
  hyperparameters and final figures in the HParams tab, the plots as images.

A destination that cannot be opened when the worker starts stops it (exit 4, like an
unusable artifact store). A tracking call that fails during a trial is logged and
skipped: tracking never fails, stops or delays the verdict on a trial.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import TrialState

from kdsearch.service.errors import InfrastructureError, first_line
from kdsearch.service.record import (
    ProbePoint,
    StudyAttr,
    TrackingIds,
    TrialOutcome,
    set_study_attr,
)
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import critical_section

logger = logging.getLogger(__name__)

# MLflow run states of a trial's end (None: the trial was abandoned, another worker
# settled it).
_MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", None: "KILLED"}


def final_metrics(outcome: TrialOutcome) -> dict[str, float]:
    """The outcome's figures as flat metrics; per-class lists become ``name_class_<c>``."""
    metrics: dict[str, float] = {}
    for key, value in outcome.attrs().items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            metrics[key] = float(value)
        elif isinstance(value, list) and key.endswith("_per_class"):
            stem = key.removesuffix("_per_class")
            metrics.update({f"{stem}_class_{c}": float(v) for c, v in enumerate(value)})
    return metrics


class TrialTracking:
    """One trial's runs in every configured tracker."""

    def __init__(self, runs: list[Any], steps_per_epoch: int) -> None:
        self.runs = runs
        self.steps_per_epoch = steps_per_epoch

    def ids(self) -> TrackingIds:
        found = {k: v for run in self.runs for k, v in run.ids().items()}
        return TrackingIds(**found)

    def probe(self, point: ProbePoint) -> None:
        step = round(point.epoch * self.steps_per_epoch)
        self._each("probe", lambda run: run.probe(point, step))

    def finish(
        self,
        state: TrialState | None,
        outcome: TrialOutcome | None = None,
        files: dict[str, Path] | None = None,
    ) -> None:
        """End the runs with the trial's state (None: abandoned). ``outcome`` and ``files``
        (the plots) for a finished trial."""
        files = files or {}
        self._each("finish", lambda run: run.finish(state, outcome, files, self.steps_per_epoch))

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for run in self.runs:
            try:
                call(run)
            except Exception as exc:  # tracking is a copy: never the trial's problem
                logger.warning("%s: %s failed, skipped: %s", run.name, what, first_line(exc))


class Tracking:
    """The worker's trackers (none, MLflow, TensorBoard or both), opened once."""

    def __init__(
        self,
        spec: StudySpec,
        study: Any,
        storage: Any,
        mlflow_uri: str | None,
        tensorboard_dir: str | None,
    ) -> None:
        self.spec = spec
        self.mlflow = _MlflowStudy(mlflow_uri, spec, study, storage) if mlflow_uri else None
        self.tensorboard = Path(tensorboard_dir) / spec.name if tensorboard_dir else None
        if self.tensorboard is not None:
            _tensorboard_writer_class()  # the client is installed
            try:
                self.tensorboard.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InfrastructureError(
                    f"--tensorboard {tensorboard_dir!r}: cannot create {self.tensorboard} "
                    f"({first_line(exc)}); give a writable folder"
                ) from None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard is not None

    def start(self, number: int, params: dict[str, Any], steps_per_epoch: int) -> TrialTracking:
        """Open the trial's runs with ``params``: its hyperparameters (every one, searched
        or fixed) and who it is in the study (replicate, seed, configuration, role)."""
        runs: list[Any] = []
        for make in (
            (lambda: self.mlflow.trial_run(number, params)) if self.mlflow else None,
            (lambda: _TensorBoardRun(self.tensorboard / f"trial-{number}", params))
            if self.tensorboard
            else None,
        ):
            if make is None:
                continue
            try:
                runs.append(make())
            except Exception as exc:
                logger.warning("trial %d: tracking run not opened: %s", number, first_line(exc))
        return TrialTracking(runs, steps_per_epoch)


class _MlflowStudy:
    name = "mlflow"

    def __init__(self, uri: str, spec: StudySpec, study: Any, storage: Any) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise InfrastructureError(
                "--mlflow / tracking.mlflow is set but MLflow is not installed; "
                "pip install 'kdsearch[tracking]'"
            ) from None
        self.uri = uri
        self.study_name = spec.name
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(spec.name)
            self.parent_id = self._parent_run(spec, study, storage)
        except InfrastructureError:
            raise
        except Exception as exc:
            raise InfrastructureError(
                f"MLflow tracking URI {uri!r} is unusable ({first_line(exc)}); give a "
                "reachable server or a writable file:/sqlite: location"
            ) from None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_root(self.uri))
        except Exception:  # another worker created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _parent_run(self, spec: StudySpec, study: Any, storage: Any) -> str:
        """The study's run, created once per tracking URI under the study lock."""
        with critical_section(storage, f"{spec.name}:tracking"):
            known = dict(study.user_attrs.get(StudyAttr.TRACKING) or {})
            if self.uri in known:
                return known[self.uri]
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"study {spec.name}",
                tags={"kdsearch.study": spec.name, "kdsearch.role": "study"},
            )
            run_id = run.info.run_id
            self.client.log_dict(run_id, spec.model_dump(mode="json"), "study_spec.json")
            self.client.set_terminated(run_id, "FINISHED")
            known[self.uri] = run_id
            set_study_attr(study, StudyAttr.TRACKING, known)
            return run_id

    def trial_run(self, number: int, params: dict[str, Any]) -> _MlflowRun:
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial {number}",
            tags={
                "mlflow.parentRunId": self.parent_id,
                "kdsearch.study": self.study_name,
                "kdsearch.trial": str(number),
            },
        )
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return _MlflowRun(self.client, run_id)


class _MlflowRun:
    name = "mlflow"

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def ids(self) -> dict[str, str]:
        return {"mlflow_run_id": self.run_id}

    def probe(self, point: ProbePoint, step: int) -> None:
        self._metrics(
            {"probe_sigma": point.sigma, "probe_accuracy_drop": point.accuracy_drop,
             "probe_epoch": point.epoch},
            step,
        )  # fmt: skip

    def finish(
        self,
        state: TrialState | None,
        outcome: TrialOutcome | None,
        files: dict[str, Path],
        steps_per_epoch: int,
    ) -> None:
        if outcome is not None:
            for epoch, loss in enumerate(outcome.epoch_losses, start=1):
                self._metrics({"train_loss": loss}, epoch * steps_per_epoch)
            self._metrics(final_metrics(outcome), None)
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path), "plots")
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(state, "FAILED"))

    def _metrics(self, values: dict[str, float], step: int | None) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step or 0) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)


def _artifact_root(uri: str) -> str | None:
    """A SQLite store's runs keep their files beside the database (MLflow's default, the
    worker's current folder, would scatter them over the machines' working folders);
    other stores (a server, a file store) decide for themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / f"{database.stem}-artifacts").as_uri()


def _tensorboard_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InfrastructureError(
            "--tensorboard / tracking.tensorboard is set but TensorBoard is not installed; "
            "pip install 'kdsearch[tracking]'"
        ) from None
    return SummaryWriter


class _TensorBoardRun:
    name = "tensorboard"

    def __init__(self, folder: Path, params: dict[str, Any]) -> None:
        self.folder = folder
        self.params = params
        self.writer = _tensorboard_writer_class()(log_dir=str(folder))

    def ids(self) -> dict[str, str]:
        return {"tensorboard": str(self.folder)}

    def probe(self, point: ProbePoint, step: int) -> None:
        self.writer.add_scalar("probe/sigma", point.sigma, step)
        self.writer.add_scalar("probe/accuracy_drop", point.accuracy_drop, step)
        self.writer.flush()

    def finish(
        self,
        state: TrialState | None,
        outcome: TrialOutcome | None,
        files: dict[str, Path],
        steps_per_epoch: int,
    ) -> None:
        from torch.utils.tensorboard.summary import hparams

        try:
            metrics: dict[str, float] = {}
            if outcome is not None:
                for epoch, loss in enumerate(outcome.epoch_losses, start=1):
                    self.writer.add_scalar("train/loss", loss, epoch * steps_per_epoch)
                metrics = {f"final/{k}": v for k, v in final_metrics(outcome).items()}
            # The HParams tab: the trial's hyperparameters against its final figures, in
            # the trial's own folder (add_hparams would open a sub-folder per call).
            values = {**self.params, "state": state.name if state else "ABANDONED"}
            shown = {k: v if isinstance(v, int | float | str | bool) else str(v)
                     for k, v in values.items()}  # fmt: skip
            for summary in hparams(shown, metrics):
                self.writer.file_writer.add_summary(summary)
            for name, value in metrics.items():
                self.writer.add_scalar(name, value)
            for name, path in files.items():
                self.writer.add_image(f"plots/{name}", _png_rgb(path), dataformats="HWC")
        finally:
            self.writer.close()


def _png_rgb(path: Path) -> np.ndarray:
    """A PNG as an (H, W, 3) uint8 array."""
    import matplotlib.image

    image = matplotlib.image.imread(str(path))  # (H, W, 4) float in [0, 1] for PNG
    return (np.asarray(image)[..., :3] * 255).round().astype(np.uint8)
