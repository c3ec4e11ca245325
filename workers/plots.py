"""Per-trial figures, saved as PNG and uploaded as trial artifacts (optuna-dashboard
shows them): the confidence-difference histogram, the teacher-vs-student confidence
scatter and the reliability diagrams of both models."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt
import numpy as np

from kdsearch.workers.metrics import both_correct, calibration_bins, kept_deltas


def delta_histogram(
    teacher: np.ndarray,
    student: np.ndarray,
    labels: np.ndarray,
    sigma: float,
    sigma_max: float,
    path: Path,
) -> None:
    """delta = p0_T - p0_S over the inputs both models get right, with the trial's
    ``sigma`` (computed from the same deltas) and kappa marked."""
    delta = kept_deltas(teacher, student, labels)  # (K,)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(delta, bins=60, color="#4c72b0")
    mean = float(delta.mean()) if delta.size else 0.0
    for sign in (-1, 1):
        ax.axvline(
            mean + sign * sigma,
            color="#c44e52",
            ls="--",
            label="mean ± sigma" if sign > 0 else None,
        )
        ax.axvline(
            mean + sign * sigma_max,
            color="#55a868",
            ls=":",
            label="mean ± kappa" if sign > 0 else None,
        )
    ax.set_xlabel("delta = p0 teacher - p0 student (both correct)")
    ax.set_ylabel("inputs")
    ax.set_title(f"sigma = {sigma:.4f} (kappa = {sigma_max}), n = {delta.size}")
    ax.legend()
    _save(fig, path)


def confidence_scatter(
    teacher: np.ndarray, student: np.ndarray, labels: np.ndarray, path: Path
) -> None:
    keep = both_correct(teacher, student, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(
        teacher[~keep, 0], student[~keep, 0], s=4, alpha=0.4, c="#999999", label="not both correct"
    )
    ax.scatter(
        teacher[keep, 0], student[keep, 0], s=4, alpha=0.4, c="#4c72b0", label="both correct"
    )
    ax.plot([0, 1], [0, 1], color="#c44e52", lw=1)
    ax.set_xlabel("teacher p0")
    ax.set_ylabel("student p0")
    ax.set_title("confidence, teacher vs student")
    ax.legend(loc="upper left")
    _save(fig, path)


def reliability_diagram(
    teacher: np.ndarray, student: np.ndarray, labels: np.ndarray, path: Path
) -> None:
    """Accuracy per confidence bin (10 equal-width bins on the predicted class)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, 11)
    for probs, name, color in ((teacher, "teacher", "#4c72b0"), (student, "student", "#dd8452")):
        bins = calibration_bins(probs, labels)  # the bins ECE is computed on
        ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", color=color, label=name)
    ax.plot(edges, edges, color="#999999", ls="--", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence (predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
