"""``kdsearch score``: every confidence figure of a (teacher, student) pair of prediction files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdsearch.service.errors import KdsearchError
from kdsearch.workers.metrics import (
    agreement_rate,
    confidence_stats,
    expected_calibration_error,
    mean_kl,
    task_metrics,
)
from kdsearch.workers.predictions import Predictions, read_predictions

# Probabilities written as float32 softmax outputs sum to 1 within ~1e-7.
SUM_TOLERANCE = 1e-4


def _check_pair(teacher: Predictions, student: Predictions, t_path: Path, s_path: Path) -> None:
    if len(teacher.labels) != len(student.labels):
        raise KdsearchError(
            f"{t_path} has {len(teacher.labels)} rows but {s_path} has {len(student.labels)}; "
            "both files must hold the same split in the same order"
        )
    if teacher.probs.shape[1] != student.probs.shape[1]:
        raise KdsearchError(
            f"{t_path} has {teacher.probs.shape[1]} classes but {s_path} has "
            f"{student.probs.shape[1]}; score predictions of the same task"
        )
    mismatch = np.flatnonzero(teacher.labels != student.labels)
    if mismatch.size:
        row = int(mismatch[0])
        raise KdsearchError(
            f"labels differ in {mismatch.size} rows (first: data row {row + 1}, label "
            f"{teacher.labels[row]} in {t_path}, {student.labels[row]} in {s_path}); "
            "both files must hold the same split in the same order"
        )
    for path, preds in ((t_path, teacher), (s_path, student)):
        sums = preds.probs.sum(1)
        bad = np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE)
        if bad.size:
            row = int(bad[0])
            raise KdsearchError(
                f"{path}: probabilities of data row {row + 1} sum to {sums[row]:.6f}, not 1 "
                f"(tolerance {SUM_TOLERANCE}; {bad.size} such rows); write softmax outputs"
            )


def score_files(teacher_path: Path, student_path: Path, task: str | None = None) -> dict[str, Any]:
    teacher = read_predictions(teacher_path)
    student = read_predictions(student_path)
    _check_pair(teacher, student, teacher_path, student_path)
    stats = confidence_stats(teacher.probs, student.probs, teacher.labels)
    out: dict[str, Any] = {**stats.as_dict()}
    out["agreement_rate"] = agreement_rate(teacher.probs, student.probs)
    out["mean_kl_teacher_student"] = mean_kl(teacher.probs, student.probs)
    for who, preds in (("teacher", teacher), ("student", student)):
        out[f"{who}_ece"] = expected_calibration_error(preds.probs, preds.labels)
        for name, value in task_metrics(task or "", preds.probs, preds.labels).items():
            out[f"{who}_{name}"] = value
    # The teacher's accuracy on these rows minus the student's: the study's objective
    # accuracy_drop is measured on dev against the study's reference instead.
    out["accuracy_drop_teacher"] = out["teacher_accuracy"] - out["student_accuracy"]
    return out
