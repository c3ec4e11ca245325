"""The worker loop: claim a trial, run it, record it, until the global budget is spent."""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from service.errors import KdsearchError
from service.spec import StudySpec
from service.storage import open_storage
from service.study import (
    build_sampler,
    claim_trial,
    load_stored_spec,
    trial_hyperparameters,
    worker_seed,
)
from workers.assets import StudyAssets, prepare_assets
from workers.predictions import write_predictions
from workers.trial import DistillationTrial, TrialResult

logger = logging.getLogger(__name__)

# A worker whose trials keep raising stops rather than burn the whole budget on FAILs.
MAX_CONSECUTIVE_FAILURES = 3


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived: fail the current trial (so it can be retried) and exit."""


@dataclass(frozen=True)
class WorkerOptions:
    storage_url: str
    study_name: str
    artifacts_dir: Path
    device: str = "auto"
    threads: int | None = None
    max_trials: int | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdsearchError(f"--device {name!r} asked for CUDA, but no GPU is visible; use cpu")
    return torch.device(name)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise StopRequested(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_worker(options: WorkerOptions) -> int:
    """Run trials until the study's budget is reached. Returns the process exit code."""
    storage = open_storage(options.storage_url)
    spec = load_stored_spec(storage, options.study_name)
    study = optuna.load_study(
        study_name=spec.name, storage=storage, sampler=build_sampler(spec, worker_seed(spec))
    )
    device = pick_device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(options.threads or os.cpu_count() or 1)
    artifact_store = FileSystemArtifactStore(str(options.artifacts_dir / "optuna"))
    (options.artifacts_dir / "optuna").mkdir(parents=True, exist_ok=True)
    ran = failures = 0
    with _stop_on_signals():
        try:
            assets = prepare_assets(spec, options.artifacts_dir / "cache", device)
            while options.max_trials is None or ran < options.max_trials:
                trial = claim_trial(study, spec, storage)
                if trial is None:
                    logger.info("study %s: budget of %d trials reached", spec.name, spec.n_trials)
                    break
                ok = _run_trial(study, trial, spec, assets, device, artifact_store)
                ran += 1
                failures = 0 if ok else failures + 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    logger.error("%d trials failed in a row; stopping this worker", failures)
                    return 1
        except StopRequested as stop:
            logger.warning("received %s: stopping", stop)
            return 0
    return 0


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: StudySpec,
    assets: StudyAssets,
    device: torch.device,
    artifact_store: FileSystemArtifactStore,
) -> bool:
    """Run one trial and map its outcome to a state (COMPLETE or FAIL). True if COMPLETE."""
    hparams = trial_hyperparameters(spec, trial.params)
    trial.set_user_attr("worker_host", socket.gethostname())
    trial.set_user_attr("device", str(device))
    trial.set_user_attr("hyperparameters", hparams.model_dump())
    logger.info("trial %d: %s", trial.number, hparams.model_dump())
    try:
        result = DistillationTrial(spec, assets, hparams, device).run()
        _record(trial, result, assets, artifact_store)
    except Exception as exc:
        logger.error("trial %d failed: %s", trial.number, exc, exc_info=True)
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        return False
    except BaseException:
        # StopRequested / KeyboardInterrupt: never leave the trial RUNNING.
        trial.set_user_attr("error", "worker stopped during the trial")
        study.tell(trial, state=TrialState.FAIL)
        raise
    if result.sigma != result.sigma:  # NaN: no input was predicted right by both models
        trial.set_user_attr("error", "no train input is predicted right by both models")
        study.tell(trial, state=TrialState.FAIL)
        return False
    # Objectives: sigma on X_train and the dev accuracy drop, both minimised.
    study.tell(trial, values=[result.sigma, result.accuracy_drop])
    logger.info(
        "trial %d: sigma %.6f, accuracy_drop %.4f (%.1f s)",
        trial.number,
        result.sigma,
        result.accuracy_drop,
        result.attrs["wall_time_s"],
    )
    return True


def _record(
    trial: optuna.Trial,
    result: TrialResult,
    assets: StudyAssets,
    artifact_store: FileSystemArtifactStore,
) -> None:
    """User attrs, then the prediction files of both models as trial artifacts, so any
    trial can be scored again (``pred,p0,p1,label``, rows in the split's order)."""
    for key, value in result.attrs.items():
        trial.set_user_attr(key, value)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "student_train.csv": (result.student_probs_train, assets.train),
            "student_dev.csv": (result.student_probs_dev, assets.dev),
        }
        artifact_ids = {}
        for name, (probs, data) in files.items():
            path = Path(tmp) / name
            write_predictions(path, probs, data.labels.numpy())
            artifact_ids[name] = upload_artifact(
                artifact_store=artifact_store, file_path=str(path), study_or_trial=trial
            )
        for name in ("teacher_train.csv", "teacher_dev.csv"):
            artifact_ids[name] = upload_artifact(
                artifact_store=artifact_store,
                file_path=str(assets.folder / name),
                study_or_trial=trial,
            )
    trial.set_user_attr("artifacts", artifact_ids)
