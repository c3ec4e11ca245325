"""One trial in process: study assets, determinism, evaluation batching, recorded figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kdsearch.service.record import ProbePoint
from kdsearch.service.spec import StudySpec, TrainingSpec, load_spec
from kdsearch.workers.assets import AssetCache, StudyAssets, load_study_teacher, prepare_assets
from kdsearch.workers.inference import predict_logits
from kdsearch.workers.trial import build_trial
from tests.helpers import tiny_spec_text, write_spec

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
    majority = max(np.mean(assets.labels_train), 1 - np.mean(assets.labels_train))
    assert assets.teacher_train_accuracy > majority + 0.05


def test_same_trial_same_numbers(spec: StudySpec, assets: StudyAssets) -> None:
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 2}
    first = build_trial(spec, assets, params, CPU).run()
    second = build_trial(spec, assets, params, CPU).run()
    assert first.sigma == second.sigma
    assert first.accuracy_drop == second.accuracy_drop
    np.testing.assert_array_equal(first.student_probs_train, second.student_probs_train)
    assert first.outcome.epoch_losses == second.outcome.epoch_losses
    assert len(first.outcome.epoch_losses) == 2
    # a different learning rate gives a different student
    other = build_trial(spec, assets, {**params, "learning_rate": 1e-4}, CPU).run()
    assert other.sigma != first.sigma


def test_recorded_figures_are_consistent(spec: StudySpec, assets: StudyAssets) -> None:
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1}
    o = build_trial(spec, assets, params, CPU).run().outcome
    assert o.sigma == o.train_sigma
    assert o.accuracy_drop == pytest.approx(o.teacher_dev_accuracy - o.student_dev_accuracy)
    assert o.train_n_total == 160 and 0 < o.train_n_kept <= 160
    assert o.dev_n_total == 64
    assert o.train_mean_abs_delta <= o.train_rms_delta
    for ece in (o.teacher_train_ece, o.student_train_ece, o.teacher_dev_ece, o.student_dev_ece):
        assert 0 <= ece <= 1
    assert o.wall_time_s > 0
    assert o.teacher_dev_f1 is None and o.teacher_dev_mcc is None  # SST-2: accuracy only
    assert set(o.attrs()) <= o.KEYS and "teacher_dev_f1" not in o.attrs()


def test_evaluation_does_not_depend_on_batch_size(assets: StudyAssets, spec: StudySpec) -> None:
    teacher = load_study_teacher(spec, assets)
    dev, pad = assets.teacher_inputs.dev, assets.teacher_inputs.pad_id
    one = predict_logits(teacher, dev, 1, CPU, pad)
    many = predict_logits(teacher, dev, 64, CPU, pad)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(many, assets.teacher_logits_dev, rtol=1e-4, atol=1e-5)


def test_best_dev_selection_scores_the_best_evaluation(
    spec: StudySpec, assets: StudyAssets
) -> None:
    selecting = spec.model_copy(
        update={"training": TrainingSpec(selection="best_dev", eval_every_steps=3)}
    )
    points: list[ProbePoint] = []
    params = {"learning_rate": 5e-3, "batch_size": 16, "epochs": 2}
    result = build_trial(selecting, assets, params, CPU, on_probe=points.append).run()
    # 10 steps per epoch: evaluations at steps 3, 6, 9, 10 (epoch end), 12, 15, 18, 20
    assert [p.epoch for p in points] == pytest.approx([0.3, 0.6, 0.9, 1.0, 1.2, 1.5, 1.8, 2.0])
    o = result.outcome
    best = min(points, key=lambda p: (p.accuracy_drop, p.epoch))  # the first of the best
    assert o.selected_epoch == pytest.approx(best.epoch)
    assert o.student_dev_accuracy == pytest.approx(o.teacher_dev_accuracy - best.accuracy_drop)
    # the scored student is that one: its train figures are recomputed for it
    last = build_trial(spec, assets, params, CPU).run().outcome
    assert last.selected_epoch is None
    assert (o.selected_epoch == 2.0) == (o.student_train_accuracy == last.student_train_accuracy)


def test_bertadam_trains_the_student(spec: StudySpec, assets: StudyAssets) -> None:
    paper = spec.model_copy(update={"training": TrainingSpec(optimizer="bertadam")})
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 2}
    bert = build_trial(paper, assets, params, CPU).run().outcome
    adamw = build_trial(spec, assets, params, CPU).run().outcome
    assert bert.epoch_losses[1] < bert.epoch_losses[0]
    assert bert.sigma != adamw.sigma  # another optimizer, another student
