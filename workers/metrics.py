"""Confidence and task metrics on per-example probabilities (NumPy only, no torch).

All functions take teacher/student probabilities of shape (N, C) at temperature 1 and
labels of shape (N,), rows joined by position as the paper's authors did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ConfidenceStats:
    """The paper's sigma and its companions, over the inputs both models get right.

    For C classes, ``sigma_per_class[c]`` is the population std of p_c_teacher -
    p_c_student over those inputs, and ``sigma`` their maximum: the class whose confidence
    is preserved worst. For two classes p_1 = 1 - p_0, so both per-class values are the
    paper's sigma, and ``sigma`` is computed exactly as the authors did (on p_0).
    ``mean_abs_delta`` and ``rms_delta`` are of that class's delta (p_0 for two classes)."""

    sigma: float
    """Population std of delta = p0_teacher - p0_student (arXiv 2401.11365, sec. 1.3);
    for more than two classes, the largest per-class value."""
    sigma_per_class: list[float]
    sigma_predicted_class: float
    """Same, with the predicted-class probability instead of p0 (sign-free variant)."""
    mean_abs_delta: float
    rms_delta: float
    n_kept: int
    n_total: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def both_correct(
    teacher_probs: np.ndarray, student_probs: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Boolean mask (N,): rows where teacher and student both predict the label."""
    return (teacher_probs.argmax(1) == labels) & (student_probs.argmax(1) == labels)


def kept_deltas(
    teacher_probs: np.ndarray,
    student_probs: np.ndarray,
    labels: np.ndarray,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """(K,) delta = p0_teacher - p0_student (float64) over the K inputs both models get
    right (``keep``, when the caller has the mask already): the values sigma is the
    population std of."""
    teacher_probs = np.asarray(teacher_probs, dtype=np.float64)
    student_probs = np.asarray(student_probs, dtype=np.float64)
    if keep is None:
        keep = both_correct(teacher_probs, student_probs, np.asarray(labels))
    return teacher_probs[keep, 0] - student_probs[keep, 0]


def confidence_stats(
    teacher_probs: np.ndarray, student_probs: np.ndarray, labels: np.ndarray
) -> ConfidenceStats:
    teacher_probs = np.asarray(teacher_probs, dtype=np.float64)
    student_probs = np.asarray(student_probs, dtype=np.float64)
    labels = np.asarray(labels)
    keep = both_correct(teacher_probs, student_probs, labels)
    n_classes = teacher_probs.shape[1]
    if not keep.any():
        nan = float("nan")
        return ConfidenceStats(nan, [nan] * n_classes, nan, nan, nan, 0, len(labels))
    deltas = teacher_probs[keep] - student_probs[keep]  # (K, C)
    # (C,), ddof=0 as np.std in the authors' metrics.py; column by column, so that the
    # objective below is bit for bit one of these
    per_class = np.array([np.std(deltas[:, c]) for c in range(n_classes)])
    # Two classes: the paper's p0 value, exactly; more: the worst-preserved class.
    worst = 0 if n_classes == 2 else int(np.argmax(per_class))
    delta = deltas[:, worst]  # (K,)
    predicted = labels[keep]  # both models predict the label on kept rows
    delta_pred = (
        teacher_probs[keep, predicted] - student_probs[keep, predicted]
    )  # (K,): |delta_pred| == |delta| for binary tasks, the sign differs
    return ConfidenceStats(
        sigma=float(np.std(delta)),
        sigma_per_class=[float(x) for x in per_class],
        sigma_predicted_class=float(np.std(delta_pred)),
        mean_abs_delta=float(np.mean(np.abs(delta))),
        rms_delta=float(np.sqrt(np.mean(delta**2))),
        n_kept=int(keep.sum()),
        n_total=len(labels),
    )


def sigma(teacher_probs: np.ndarray, student_probs: np.ndarray, labels: np.ndarray) -> float:
    """The paper's statistic: population std of p0 differences on both-correct inputs."""
    return confidence_stats(teacher_probs, student_probs, labels).sigma


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(labels)))


def majority_accuracy(labels: np.ndarray) -> float:
    """The accuracy of always answering the most common class of ``labels``."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


def f1_binary(probs: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 (GLUE's convention for MRPC and QQP)."""
    pred = np.asarray(probs).argmax(1)
    labels = np.asarray(labels)
    tp = float(np.sum((pred == 1) & (labels == 1)))
    fp = float(np.sum((pred == 1) & (labels == 0)))
    fn = float(np.sum((pred == 0) & (labels == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(probs: np.ndarray, labels: np.ndarray) -> float:
    """MCC for binary labels (GLUE's CoLA metric); 0 when undefined."""
    pred = np.asarray(probs).argmax(1)
    labels = np.asarray(labels)
    tp = float(np.sum((pred == 1) & (labels == 1)))
    tn = float(np.sum((pred == 0) & (labels == 0)))
    fp = float(np.sum((pred == 1) & (labels == 0)))
    fn = float(np.sum((pred == 0) & (labels == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def calibration_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 10
) -> list[tuple[float, float, float]]:
    """(mean confidence, accuracy, share of inputs) of each non-empty equal-width bin of
    the predicted class's confidence."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(labels)
    # Bin i holds confidences in (i/n, (i+1)/n]; confidence 0 cannot occur for argmax.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    masks = (bins == b for b in range(n_bins))
    return [
        (float(confidence[m].mean()), float(correct[m].mean()), float(m.mean()))
        for m in masks
        if m.any()
    ]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width bins on the predicted class's confidence."""
    return float(
        sum(share * abs(acc - conf) for conf, acc, share in calibration_bins(probs, labels, n_bins))
    )


def task_metrics(task: str, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy everywhere (as in the paper), plus GLUE's own metric where it differs."""
    out = {"accuracy": accuracy(probs, labels)}
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(probs, labels)
    if task == "cola":
        out["mcc"] = matthews_corrcoef(probs, labels)
    return out


def selection_metric(task: str, probs: np.ndarray, labels: np.ndarray) -> float:
    """What TinyBERT keeps the best checkpoint by: dev accuracy, MCC for CoLA."""
    if task == "cola":
        return matthews_corrcoef(probs, labels)
    return accuracy(probs, labels)


def agreement_rate(teacher_probs: np.ndarray, student_probs: np.ndarray) -> float:
    """Fraction of inputs where both models predict the same class."""
    return float(
        np.mean(np.asarray(teacher_probs).argmax(1) == np.asarray(student_probs).argmax(1))
    )


def mean_kl(teacher_probs: np.ndarray, student_probs: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over inputs of KL(teacher || student), in nats (probabilities clipped at eps)."""
    p = np.clip(np.asarray(teacher_probs, dtype=np.float64), eps, 1.0)
    q = np.clip(np.asarray(student_probs, dtype=np.float64), eps, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
