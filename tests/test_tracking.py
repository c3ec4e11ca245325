"""Tracking, read back: a study's trials in a local MLflow store and a TensorBoard log
folder, the probe-curve figure, the live status view and its progress."""

from __future__ import annotations

import datetime
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import kdsearch
from kdsearch.service.record import StudyAttr, TrialAttr
from kdsearch.service.status import _duration, live_view
from kdsearch.service.summary import judge_study, read_records, summarize
from tests.helpers import tiny_spec_text

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "fixtures" / "glue" / "SST-2"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> dict:
    """Two trials: the baseline (never pruned) completes; the second is pruned at its
    first probe (kappa 0.0001, no warm-up, a probe every 2 steps)."""
    tmp = tmp_path_factory.mktemp("tracking")
    raw = yaml.safe_load(
        tiny_spec_text(
            "tracked", tiny_bert_dir, DATA, n_trials=2, pruning="threshold, warmup_epochs: 0",
            extra="thresholds: {sigma_max: 0.0001}\ntraining: {eval_every_steps: 2}\n",
        )
    )  # fmt: skip
    study = kdsearch.create_study(
        raw, storage=f"sqlite:///{tmp / 'k.db'}", artifacts=str(tmp / "art")
    )
    # MLflow 3's local store (its file store is in maintenance mode and refuses new runs
    # unless MLFLOW_ALLOW_FILE_STORE is set).
    mlflow, tb = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "tb"
    study.run_worker(threads=1, mlflow=mlflow, tensorboard=tb)
    return {"study": study, "mlflow": mlflow, "tensorboard": tb}


def test_each_trial_is_a_nested_mlflow_run(tracked: dict) -> None:
    from mlflow import MlflowClient

    study: kdsearch.Study = tracked["study"]
    baseline, pruned = study.records()
    assert (baseline.state.name, pruned.state.name) == ("COMPLETE", "PRUNED")
    client = MlflowClient(tracking_uri=tracked["mlflow"])
    experiment = client.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"study tracked", "trial 0", "trial 1"}
    parent = runs["study tracked"]
    assert study.optuna.user_attrs[StudyAttr.TRACKING] == {tracked["mlflow"]: parent.info.run_id}
    for record in (baseline, pruned):
        run = runs[f"trial {record.number}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert record.tracking.mlflow_run_id == run.info.run_id
        # every hyperparameter, searched or fixed, and the replicate's seed
        assert float(run.data.params["learning_rate"]) == record.params.get(
            "learning_rate", record.hyperparameters["learning_rate"]
        )
        assert run.data.params["seed"] == str(record.seed)
        assert run.data.params["temperature"] == str(record.hyperparameters["temperature"])
        # every probe, at the optimizer step it was taken
        history = client.get_metric_history(run.info.run_id, "probe_sigma")
        assert [m.value for m in history] == pytest.approx([p.sigma for p in record.probes])
        assert [m.step for m in history] == sorted(m.step for m in history)
    run = runs["trial 0"]
    assert run.info.status == "FINISHED"
    outcome = baseline.outcome
    assert run.data.metrics["sigma"] == pytest.approx(outcome.sigma)
    assert run.data.metrics["accuracy_drop"] == pytest.approx(outcome.accuracy_drop)
    assert run.data.metrics["train_sigma_class_1"] == pytest.approx(
        outcome.train_sigma_per_class[1]
    )
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.value for m in losses] == pytest.approx(outcome.epoch_losses)
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/probe_curve.png", "plots/confidence_delta_histogram.png"} <= plots
    # kept beside the SQLite database, not in the worker's current folder
    assert experiment.artifact_location.endswith("tracking0/mlflow-artifacts")
    assert not Path("mlruns").exists()
    assert runs["trial 1"].info.status == "KILLED"  # pruned


def test_each_trial_has_a_tensorboard_folder(tracked: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    baseline, pruned = tracked["study"].records()
    for record in (baseline, pruned):
        folder = tracked["tensorboard"] / "tracked" / f"trial-{record.number}"
        assert record.tracking.tensorboard == str(folder)
        events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        probes = [e.value for e in events.Scalars("probe/sigma")]
        assert probes == pytest.approx([p.sigma for p in record.probes], rel=1e-6)
        assert events.PluginTagToContent("hparams")  # the HParams tab's data
    events = EventAccumulator(
        str(tracked["tensorboard"] / "tracked" / "trial-0"), size_guidance={"images": 0}
    )
    events.Reload()
    assert [e.value for e in events.Scalars("final/sigma")] == pytest.approx(
        [baseline.outcome.sigma], rel=1e-6
    )
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(baseline.outcome.epoch_losses, rel=1e-6)
    images = set(events.Tags()["images"])
    assert {"plots/probe_curve.png", "plots/reliability_diagram.png"} <= images
    image = events.Images("plots/probe_curve.png")[0]
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100


def test_the_probe_curve_is_a_trial_artifact(tracked: dict) -> None:
    baseline, _ = tracked["study"].records()
    assert "probe_curve.png" in baseline.artifacts


def _view(study: kdsearch.Study, spec: Any = None) -> str:
    spec = spec or study.spec
    records = read_records(study.optuna)
    summary = summarize(records, spec, judge_study(records, spec, study.optuna))
    return live_view(records, summary, spec, now=datetime.datetime.now())


def test_live_view_of_a_finished_study(tracked: dict) -> None:
    study: kdsearch.Study = tracked["study"]
    text = _view(study)
    lines = text.splitlines()
    assert lines[0] == (
        "study tracked: 2/2 trials done (1 complete, 1 pruned), 0 running, 0 queued, "
        "0 failed (retried)"
    )
    # kappa 0.0001: the baseline is not feasible, and the pruned trial has no verdict
    assert lines[1] == "answer: none yet"
    assert lines[-1] == "time left: none: the budget is spent"
    # the command stops by itself once the budget is spent
    out = subprocess.run(
        [sys.executable, "-m", "kdsearch", "status", "--study", "tracked", "--watch", "1",
         "--storage", study.storage_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "study tracked: 2/2 trials done" in out.stdout


def test_live_view_shows_running_trials_progress_and_time_left(tracked: dict) -> None:
    # The same study seen as if trial 1 were still running, half-way through training:
    # what the heartbeat publishes (``TrialAttr.PROGRESS``) is what the view shows.
    study: kdsearch.Study = tracked["study"]
    storage = study.optuna._storage
    running = study.optuna.ask()  # a third trial, RUNNING
    storage.set_trial_user_attr(
        running._trial_id,
        TrialAttr.PROGRESS,
        {"label": "distillation", "step": 5, "total": 20, "elapsed_s": 30.0},
    )
    storage.set_trial_user_attr(running._trial_id, TrialAttr.WORKER_HOST, "gpu-7")
    bigger = study.spec.model_copy(update={"n_trials": 6})  # 4 trials left to run
    try:
        text = _view(study, bigger)
    finally:
        study.optuna.tell(running, state=TrialState.FAIL)
    assert "2/6 trials done (1 complete, 1 pruned), 1 running, 0 queued" in text
    assert (
        f"  trial {running.number} (search) on gpu-7: distillation step 5/20 (25%), about 90 s "
        "to go in it" in text
    )
    # one trial at a time, each as long as the one complete trial took
    mean = study.records()[0].elapsed_s
    expected = _duration(mean * 4)
    assert text.splitlines()[-1] == (
        f"time left: about {expected} for at most 4 trials at 1 at a time"
    )


def test_the_heartbeat_publishes_the_running_trainings_progress(storage_url: str) -> None:
    # The heartbeat thread (not the training loop) writes where training is, when it moved.
    from kdsearch.service.storage import open_storage
    from kdsearch.workers.liveness import Heartbeat
    from kdsearch.workers.progress import Progress

    storage = open_storage(storage_url)
    study = optuna.create_study(study_name="beat", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    progress = Progress(total_steps=10, label="distillation", stream=io.StringIO())
    for _ in range(3):
        progress.advance()
    try:
        with Heartbeat(study, storage, trial._trial_id, 0.1):
            time.sleep(0.5)
            progress.advance()
            time.sleep(0.5)
    finally:
        progress.close()
    published = storage.get_trial(trial._trial_id).user_attrs[TrialAttr.PROGRESS]
    assert {k: published[k] for k in ("label", "step", "total")} == {
        "label": "distillation", "step": 4, "total": 10,
    }  # fmt: skip
    assert published["elapsed_s"] >= 0.5
