"""One trial in process: study assets, determinism, evaluation batching, recorded figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from kdsearch.service.spec import StudySpec, load_spec
from kdsearch.service.study import trial_hyperparameters
from kdsearch.workers.assets import AssetCache, StudyAssets, prepare_assets
from kdsearch.workers.distill import predict_logits
from kdsearch.workers.models import load_teacher
from kdsearch.workers.trial import DistillationTrial

from tests.conftest import tiny_spec_text, write_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> StudySpec:
    fixtures = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    folder = tmp_path_factory.mktemp("trial")
    return load_spec(write_spec(folder / "t.yaml", tiny_spec_text("t", tiny_bert_dir, fixtures)))


@pytest.fixture(scope="module")
def assets(spec: StudySpec, tmp_path_factory: pytest.TempPathFactory) -> StudyAssets:
    return prepare_assets(spec, AssetCache(tmp_path_factory.mktemp("cache")), CPU)


def test_assets_are_computed_once_and_reused(
    spec: StudySpec, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kdsearch.workers.assets")
    first = prepare_assets(spec, AssetCache(tmp_path), CPU)
    second = prepare_assets(spec, AssetCache(tmp_path), CPU)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("preparing study assets" in m for m in messages) == 1
    assert sum("reusing study assets" in m for m in messages) == 1
    torch.testing.assert_close(first.teacher_logits_train, second.teacher_logits_train)
    assert first.teacher_logits_train.shape == (160, 2)
    assert first.teacher_logits_dev.shape == (64, 2)
    # the fine-tuned teacher is kept with the assets
    assert (first.folder / "teacher" / "config.json").is_file()
    # a changed spec (here: max_seq_length) gets new assets, never stale ones
    other = prepare_assets(
        spec.model_copy(update={"max_seq_length": 16}), AssetCache(tmp_path), CPU
    )
    assert other.folder != first.folder


def test_teacher_fine_tuning_learns_the_task(assets: StudyAssets) -> None:
    # 160 real SST-2 rows, tiny random BERT: fine-tuning must beat the majority class.
    majority = max(np.mean(assets.train.labels.numpy()), 1 - np.mean(assets.train.labels.numpy()))
    assert assets.teacher_train_accuracy > majority + 0.05


def test_same_trial_same_numbers(spec: StudySpec, assets: StudyAssets) -> None:
    hparams = trial_hyperparameters(spec, {"learning_rate": 2e-3, "batch_size": 16, "epochs": 2})
    first = DistillationTrial(spec, assets, hparams, CPU).run()
    second = DistillationTrial(spec, assets, hparams, CPU).run()
    assert first.sigma == second.sigma
    assert first.accuracy_drop == second.accuracy_drop
    np.testing.assert_array_equal(first.student_probs_train, second.student_probs_train)
    assert first.attrs["epoch_losses"] == second.attrs["epoch_losses"]
    assert len(first.attrs["epoch_losses"]) == 2
    # a different learning rate gives a different student
    other = DistillationTrial(
        spec, assets, hparams.model_copy(update={"learning_rate": 1e-4}), CPU
    ).run()
    assert other.sigma != first.sigma


def test_recorded_figures_are_consistent(spec: StudySpec, assets: StudyAssets) -> None:
    hparams = trial_hyperparameters(spec, {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1})
    result = DistillationTrial(spec, assets, hparams, CPU).run()
    a = result.attrs
    assert a["sigma"] == a["train_sigma"] == result.sigma
    assert a["accuracy_drop"] == pytest.approx(
        a["teacher_dev_accuracy"] - a["student_dev_accuracy"]
    )
    assert a["train_n_total"] == 160 and 0 < a["train_n_kept"] <= 160
    assert a["dev_n_total"] == 64
    assert a["train_mean_abs_delta"] <= a["train_rms_delta"]
    for key in ("teacher_train_ece", "student_train_ece", "teacher_dev_ece", "student_dev_ece"):
        assert 0 <= a[key] <= 1
    assert a["wall_time_s"] > 0


def test_evaluation_does_not_depend_on_batch_size(assets: StudyAssets, spec: StudySpec) -> None:
    teacher = load_teacher(str(assets.folder / "teacher"), 2)
    one = predict_logits(teacher, assets.dev, 1, CPU, assets.pad_id)
    many = predict_logits(teacher, assets.dev, 64, CPU, assets.pad_id)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(many, assets.teacher_logits_dev, rtol=1e-4, atol=1e-5)
