"""Confidence metrics against the paper authors' files and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from kdsearch.workers.metrics import (
    confidence_stats,
    expected_calibration_error,
    f1_binary,
    matthews_corrcoef,
    sigma,
    task_metrics,
)
from kdsearch.workers.predictions import read_predictions, write_predictions
from tests.helpers import FIXTURES

REFERENCE = FIXTURES / "reference_predictions"

# (task, split, sigma, inputs kept, all inputs): reference_predictions/README.md
GOLDEN = [
    ("SST-2", "eval", 0.068105, 795, 872),
    ("RTE", "train", 0.075877, 2163, 2490),
    ("RTE", "eval", 0.102029, 165, 277),
    ("MRPC", "train", 0.060420, 2845, 3668),
    ("MRPC", "eval", 0.073974, 314, 408),
]


@pytest.mark.parametrize(("task", "split", "expected", "kept", "total"), GOLDEN)
def test_sigma_matches_the_papers_files(
    task: str, split: str, expected: float, kept: int, total: int
) -> None:
    teacher = read_predictions(REFERENCE / task / f"{split}_teacher.csv")
    student = read_predictions(REFERENCE / task / f"{split}_s6l.csv")
    stats = confidence_stats(teacher.probs, student.probs, teacher.labels)
    # The README gives 6 decimals: agreement to 1e-6 means rounding to the same value.
    assert stats.sigma == pytest.approx(expected, abs=5e-7 + 1e-12)
    assert (stats.n_kept, stats.n_total) == (kept, total)


def test_sigma_rte_p0_versus_predicted_class() -> None:
    # paper.md sec. 1.2: RTE S6L gives 0.0759 (p0 version) and 0.0534 (predicted class).
    teacher = read_predictions(REFERENCE / "RTE" / "train_teacher.csv")
    student = read_predictions(REFERENCE / "RTE" / "train_s6l.csv")
    stats = confidence_stats(teacher.probs, student.probs, teacher.labels)
    assert round(stats.sigma, 4) == 0.0759
    assert round(stats.sigma_predicted_class, 4) == 0.0534


def test_sigma_hand_computed() -> None:
    teacher = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    student = np.array([[0.8, 0.2], [0.4, 0.6], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    # Row 2: the student predicts 1, so only rows 0, 1, 3 are kept.
    # delta = [0.1, -0.2, 0.05]; mean = -0.05/3; population std:
    d = np.array([0.1, -0.2, 0.05])
    expected = np.sqrt(np.mean((d - d.mean()) ** 2))
    assert expected == pytest.approx(0.131233, abs=1e-6)
    stats = confidence_stats(teacher, student, labels)
    assert stats.sigma == pytest.approx(expected, abs=1e-12)
    assert stats.n_kept == 3
    # predicted-class deltas: [0.1, 0.2, 0.05] -> std of those
    assert stats.sigma_predicted_class == pytest.approx(np.std([0.1, 0.2, 0.05]), abs=1e-12)
    assert stats.mean_abs_delta == pytest.approx(0.35 / 3)
    assert stats.rms_delta == pytest.approx(np.sqrt((0.01 + 0.04 + 0.0025) / 3))


def test_three_class_sigma_hand_computed_on_mnli_shaped_rows() -> None:
    # MNLI's labels: 0 entailment, 1 neutral, 2 contradiction. Row 3: the student predicts
    # neutral for a contradiction, so rows 0, 1, 2, 4 are kept.
    teacher = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]
    )
    student = np.array(
        [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.5, 0.2, 0.3]]
    )
    labels = np.array([0, 1, 2, 2, 0])
    # kept deltas, class by class (teacher - student):
    #   p_entailment:    [ 0.2, -0.1,  0.1,  0.1]  mean 0.075   std 0.10897
    #   p_neutral:       [-0.2,  0.2,  0.0,  0.1]  mean 0.025   std 0.14790
    #   p_contradiction: [ 0.0, -0.1, -0.1, -0.2]  mean -0.1    std 0.07071
    per_class = [
        np.sqrt(np.mean((np.array(d) - np.mean(d)) ** 2))
        for d in ([0.2, -0.1, 0.1, 0.1], [-0.2, 0.2, 0.0, 0.1], [0.0, -0.1, -0.1, -0.2])
    ]
    assert per_class == pytest.approx([0.108972, 0.147902, 0.070711], abs=1e-6)
    stats = confidence_stats(teacher, student, labels)
    assert stats.n_kept == 4 and stats.n_total == 5
    assert stats.sigma_per_class == pytest.approx(per_class, abs=1e-12)
    assert stats.sigma == pytest.approx(per_class[1], abs=1e-12)  # the worst class: neutral
    # predicted-class deltas: [0.2, 0.2, -0.1, 0.1]
    assert stats.sigma_predicted_class == pytest.approx(np.std([0.2, 0.2, -0.1, 0.1]))


def test_two_class_sigma_is_the_papers_for_both_classes() -> None:
    # p1 = 1 - p0, so both classes' sigma equal the paper's p0 value (and the objective).
    rng = np.random.default_rng(0)
    p0 = rng.uniform(0.05, 0.95, size=(2, 200))
    teacher, student = (np.stack([p, 1 - p], axis=1) for p in p0)
    labels = (p0[0] < 0.5).astype(int)
    stats = confidence_stats(teacher, student, labels)
    assert stats.sigma_per_class[0] == pytest.approx(stats.sigma_per_class[1], abs=1e-12)
    assert stats.sigma == stats.sigma_per_class[0]


def test_sigma_is_nan_when_no_input_is_kept() -> None:
    probs = np.array([[0.9, 0.1]])
    assert np.isnan(sigma(probs, probs, np.array([1])))


def test_ece_hand_computed() -> None:
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # bins: 0.95 -> (0.9,1.0]: acc 1, conf .95; 0.85 -> (0.8,0.9]: acc 0, conf .85;
    # 0.7 -> (0.6,0.7]: acc 1, conf .7; 0.55 -> (0.5,0.6]: acc 0, conf .55
    expected = (0.05 + 0.85 + 0.3 + 0.55) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_f1_and_mcc_hand_computed() -> None:
    # pred = [1, 1, 0, 0, 1], labels = [1, 0, 0, 1, 1]: tp 2, fp 1, fn 1, tn 1
    probs = np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1], [0.1, 0.9]])
    labels = np.array([1, 0, 0, 1, 1])
    assert f1_binary(probs, labels) == pytest.approx(4 / 6)
    assert matthews_corrcoef(probs, labels) == pytest.approx(
        (2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2)
    )
    assert set(task_metrics("mrpc", probs, labels)) == {"accuracy", "f1"}
    assert set(task_metrics("cola", probs, labels)) == {"accuracy", "mcc"}
    assert task_metrics("sst2", probs, labels) == {"accuracy": pytest.approx(0.6)}


def test_predictions_round_trip_keeps_sigma_exact(tmp_path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 2, size=50)
    write_predictions(tmp_path / "p.csv", probs, labels)
    back = read_predictions(tmp_path / "p.csv")
    np.testing.assert_array_equal(back.probs, probs)
    np.testing.assert_array_equal(back.labels, labels)
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "pred,p0,p1,label"
