"""Per-example predictions in the paper authors' CSV format: ``pred,p0,p1[,...],label``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdsearch.service.errors import KdsearchError, first_line


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
    """Read a prediction file; refuse anything that is not one (missing, not UTF-8,
    malformed rows, probabilities outside [0, 1] or not finite, rows that contradict their
    own columns), naming the row."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a FIFO (would block), /dev/zero
        raise KdsearchError(f"{path}: not a regular file; give a pred,p0,p1,label CSV file")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise KdsearchError(
            f"{path}: not UTF-8 text (byte {exc.start}); give a pred,p0,p1,label CSV"
        ) from None
    except OSError as exc:
        raise KdsearchError(f"{path}: cannot be read ({first_line(exc)})") from None
    if not rows:
        raise KdsearchError(f"{path}: empty file; expected a header pred,p0,p1,...,label")
    header = rows[0]
    prob_cols = [i for i, name in enumerate(header) if name.startswith("p") and name[1:].isdigit()]
    if "label" not in header or len(prob_cols) < 2:
        raise KdsearchError(f"{path}: header {header} must be pred,p0,p1[,...],label")
    if len(rows) == 1:
        raise KdsearchError(f"{path}: has a header but no rows; give the split's predictions")
    label_col = header.index("label")
    for row, fields in enumerate(rows[1:], 1):
        if len(fields) != len(header):
            raise KdsearchError(
                f"{path}: data row {row} has {len(fields)} fields but the header has "
                f"{len(header)} ({','.join(header)}); write one value per column"
            )
    try:
        probs = np.array([[float(r[i]) for i in prob_cols] for r in rows[1:]], dtype=np.float64)
        labels = np.array([int(r[label_col]) for r in rows[1:]])
    except (ValueError, IndexError) as exc:
        raise KdsearchError(f"{path}: malformed row ({exc}); every row needs numbers") from None
    probs = probs.reshape(-1, len(prob_cols))
    bad = np.flatnonzero(~np.isfinite(probs).all(1) | (probs < 0).any(1) | (probs > 1).any(1))
    if bad.size:
        row = int(bad[0])
        raise KdsearchError(
            f"{path}: data row {row + 1} has probabilities {probs[row].tolist()}, not numbers in "
            f"[0, 1] ({bad.size} such rows); write softmax outputs"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= probs.shape[1]))
    if bad.size:
        raise KdsearchError(
            f"{path}: data row {int(bad[0]) + 1} has label {int(labels[bad[0]])}, but the file "
            f"has {probs.shape[1]} probability columns (labels 0..{probs.shape[1] - 1})"
        )
    if "pred" in header:
        pred_col = header.index("pred")
        try:
            preds = np.array([int(r[pred_col]) for r in rows[1:]])
        except ValueError as exc:
            raise KdsearchError(f"{path}: malformed pred ({exc}); pred is a class id") from None
        inside = (preds >= 0) & (preds < probs.shape[1])
        chosen = probs[np.arange(len(probs)), np.where(inside, preds, 0)]
        # pred must be a most probable class (ties allowed): else the columns disagree
        bad = np.flatnonzero(~inside | (chosen < probs.max(1) - 1e-9))
        if bad.size:
            row = int(bad[0])
            raise KdsearchError(
                f"{path}: data row {row + 1} says pred {int(preds[row])} but its probabilities "
                f"are {probs[row].tolist()}; pred must be the most probable class"
            )
    return Predictions(probs, labels)
