"""A whole study on PostgreSQL: two real worker processes, tiny real BERT, real SST-2 rows."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from kdsearch.service.loading import load_spec
from kdsearch.service.record import STUDY_KEYS, TRIAL_KEYS
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach
from kdsearch.workers.metrics import confidence_stats
from kdsearch.workers.predictions import read_predictions
from tests.helpers import ROOT, tiny_spec_text, write_spec

pytestmark = pytest.mark.slow


def start_worker(pg_url: str, study: str, artifacts: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDSEARCH_STORAGE": pg_url}
    return subprocess.Popen(
        [sys.executable, "-m", "kdsearch", "worker", "--study", study,
         "--artifacts", str(artifacts), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def test_two_workers_finish_exactly_the_budget(
    tmp_path: Path, pg_url: str, tiny_bert_dir: Path, fixture_glue: Path
) -> None:
    spec = load_spec(
        write_spec(
            tmp_path / "e2e.yaml", tiny_spec_text("e2e", tiny_bert_dir, fixture_glue / "SST-2")
        )
    )
    create_or_attach(open_storage(pg_url), spec)
    artifacts = tmp_path / "artifacts"
    workers = [start_worker(pg_url, "e2e", artifacts) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)

    study = optuna.load_study(study_name="e2e", storage=pg_url)
    errors = [t.user_attrs.get("error") for t in study.trials]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3, (errors, logs)
    # Both workers ran trials, and the teacher was fine-tuned (assets prepared) once.
    assert sum("preparing study assets" in log for log in logs) == 1, logs
    assert {t.user_attrs["worker_host"] for t in study.trials} == {socket.gethostname()}
    assert study.trials[0].params == {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1}

    store = FileSystemArtifactStore(str(artifacts / "optuna"))
    teacher_files = set()
    for trial in study.trials:
        sigma, drop = trial.values
        assert math.isfinite(sigma) and math.isfinite(drop)
        assert 0 <= sigma < 1 and -1 <= drop <= 1
        assert trial.user_attrs["sigma"] == sigma
        assert trial.constraints == pytest.approx(
            {"sigma": sigma - 0.05, "accuracy_drop": drop - 0.01}
        )
        # sigma recomputed from the saved predictions of teacher and student
        files = {}
        for name, artifact_id in trial.user_attrs["artifacts"].items():
            files[name] = tmp_path / f"t{trial.number}-{name}"
            download_artifact(
                artifact_store=store, artifact_id=artifact_id, file_path=str(files[name])
            )
        teacher_files.add(files["teacher_train.csv"].read_bytes())
        teacher = read_predictions(files["teacher_train.csv"])
        student = read_predictions(files["student_train.csv"])
        assert len(teacher.labels) == 160  # train_limit
        stats = confidence_stats(teacher.probs, student.probs, teacher.labels)
        assert stats.sigma == pytest.approx(sigma, abs=1e-12)
        assert stats.n_kept == trial.user_attrs["train_n_kept"]
        dev = read_predictions(files["student_dev.csv"])
        teacher_dev = read_predictions(files["teacher_dev.csv"])
        accuracy = lambda p: float((p.preds == p.labels).mean())  # noqa: E731
        assert accuracy(teacher_dev) - accuracy(dev) == pytest.approx(drop, abs=1e-12)
    # Every trial of both workers used the very same teacher logits.
    assert len(teacher_files) == 1
    # Every attribute written is declared in the record module.
    for trial in study.trials:
        assert set(trial.user_attrs) <= TRIAL_KEYS, set(trial.user_attrs) - TRIAL_KEYS
    assert set(study.user_attrs) <= STUDY_KEYS, set(study.user_attrs) - STUDY_KEYS
