"""Per-trial figures, saved as PNG and uploaded as trial artifacts (optuna-dashboard
shows them): the confidence-difference histogram, the teacher-vs-student confidence
scatter, the reliability diagrams of both models and the probe curve.

Drawn on plain ``Figure`` objects (no pyplot state: safe from a thread, nothing to close)
with fixed margins and fast PNG compression: a trial's figures are on the path between
its last computation and its completion, so they are kept cheap (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kdsearch.service.record import ProbePoint
from kdsearch.workers.metrics import both_correct, calibration_bins, kept_deltas


@dataclass(frozen=True)
class Marks:
    """What the confidence histogram marks: the trial's sigma and kappa, and the class
    names of a study with more than two classes."""

    sigma: float
    sigma_max: float
    class_names: tuple[str, ...] | None = None


def delta_histogram(
    teacher: np.ndarray, student: np.ndarray, labels: np.ndarray, marks: Marks, path: Path
) -> None:
    """delta = p0_T - p0_S over the inputs both models get right, with the trial's
    ``sigma`` (computed from the same deltas) and kappa marked. With more than two
    classes: one histogram of p_c differences per class, each with its sigma (the
    objective is the largest)."""
    if teacher.shape[1] > 2:
        _per_class_histogram((teacher, student, labels), marks, path)
        return
    sigma, sigma_max = marks.sigma, marks.sigma_max
    delta = kept_deltas(teacher, student, labels)  # (K,)
    fig, ax = _figure((6, 4))
    ax.hist(delta, bins=60, color="#4c72b0", histtype="stepfilled")
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


def _per_class_histogram(
    probs: tuple[np.ndarray, np.ndarray, np.ndarray], marks: Marks, path: Path
) -> None:
    teacher, student, labels = probs
    sigma, sigma_max, class_names = marks.sigma, marks.sigma_max, marks.class_names
    keep = both_correct(teacher, student, labels)
    deltas = np.asarray(teacher, np.float64)[keep] - np.asarray(student, np.float64)[keep]
    names = class_names or tuple(f"class {c}" for c in range(deltas.shape[1]))
    fig, ax = _figure((6, 4))
    for c, name in enumerate(names):  # deltas: (K, C)
        ax.hist(deltas[:, c], bins=40, alpha=0.5, histtype="stepfilled",
                label=f"p({name}): sigma {np.std(deltas[:, c]):.4f}")  # fmt: skip
    ax.set_xlabel("delta = p_c teacher - p_c student (both correct)")
    ax.set_ylabel("inputs")
    ax.set_title(
        f"sigma = {sigma:.4f}, the largest of the classes' (kappa = {sigma_max}), "
        f"n = {deltas.shape[0]}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def confidence_scatter(
    teacher: np.ndarray, student: np.ndarray, labels: np.ndarray, path: Path
) -> None:
    keep = both_correct(teacher, student, labels)
    fig, ax = _figure((5, 5))
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
    fig, ax = _figure((5, 5))
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


def probe_curve(
    probes: list[ProbePoint], sigma_max: float, accuracy_drop_max: float, path: Path
) -> None:
    """The trial's probes: sigma (on the probe rows of train) and the accuracy drop (dev)
    against epochs, each with its threshold: what the pruner saw."""
    epochs = [p.epoch for p in probes]
    fig, (top, bottom) = _figure((6, 5), rows=2)
    top.plot(epochs, [p.sigma for p in probes], marker="o", color="#4c72b0", label="sigma")
    top.axhline(sigma_max, color="#c44e52", ls="--", label=f"kappa = {sigma_max}")
    top.set_ylabel("sigma (probe rows)")
    top.legend()
    drops = [p.accuracy_drop for p in probes]
    bottom.plot(epochs, drops, marker="o", color="#dd8452", label="accuracy drop")
    bottom.axhline(accuracy_drop_max, color="#c44e52", ls="--", label=f"max = {accuracy_drop_max}")
    bottom.set_xlabel("epochs of training")
    bottom.set_ylabel("accuracy drop (dev)")
    bottom.legend()
    top.set_title("probes during training")
    _save(fig, path)


def _figure(size: tuple[float, float], rows: int = 1) -> tuple[Figure, Any]:
    """A figure with fixed margins (computing a tight layout costs as much as drawing)."""
    fig = Figure(figsize=size, dpi=100)
    axes = fig.subplots(rows, 1, sharex=rows > 1)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.91, hspace=0.25)
    return fig, axes


def _save(fig: Figure, path: Path) -> None:
    # zlib level 1: a slightly larger file, a third of the encoding time
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
