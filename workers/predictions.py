"""Per-example predictions in the paper authors' CSV format: ``pred,p0,p1[,...],label``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdsearch.service.errors import KdsearchError


@dataclass(frozen=True)
class Predictions:
    probs: np.ndarray  # (N, C) softmax probabilities at T = 1
    labels: np.ndarray  # (N,)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


def write_predictions(path: Path, probs: np.ndarray, labels: np.ndarray) -> None:
    n_classes = probs.shape[1]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pred", *[f"p{c}" for c in range(n_classes)], "label"])
        for row, label in zip(probs, labels, strict=True):
            # repr-precision floats: a re-read file reproduces sigma exactly.
            writer.writerow([int(row.argmax()), *[repr(float(p)) for p in row], int(label)])


def read_predictions(path: Path) -> Predictions:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise KdsearchError(f"{path}: empty file; expected a header pred,p0,p1,...,label")
    header = rows[0]
    prob_cols = [i for i, name in enumerate(header) if name.startswith("p") and name[1:].isdigit()]
    if "label" not in header or len(prob_cols) < 2:
        raise KdsearchError(f"{path}: header {header} must be pred,p0,p1[,...],label")
    label_col = header.index("label")
    try:
        probs = np.array([[float(r[i]) for i in prob_cols] for r in rows[1:]], dtype=np.float64)
        labels = np.array([int(r[label_col]) for r in rows[1:]])
    except (ValueError, IndexError) as exc:
        raise KdsearchError(f"{path}: malformed row ({exc}); every row needs numbers") from None
    return Predictions(probs.reshape(-1, len(prob_cols)), labels)
