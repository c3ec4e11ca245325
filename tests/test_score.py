"""``kdsearch score`` on the paper authors' files, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdsearch.workers.score import score_files
from tests.helpers import assert_clean_failure, kdsearch
from tests.test_metrics import GOLDEN, REFERENCE


@pytest.mark.parametrize(("task", "split", "expected", "kept", "total"), GOLDEN)
def test_score_cli_reproduces_the_reference_values(
    task: str, split: str, expected: float, kept: int, total: int
) -> None:
    result = kdsearch(
        "score", "--format", "json",
        "--teacher", str(REFERENCE / task / f"{split}_teacher.csv"),
        "--student", str(REFERENCE / task / f"{split}_s6l.csv"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["sigma"] == pytest.approx(expected, abs=5e-7)
    assert (figures["n_kept"], figures["n_total"]) == (kept, total)


def test_score_matches_the_papers_train_figures() -> None:
    # paper.md sec. 2-3: train accuracy and ECE (%) of teacher and S6L, to their rounding.
    rte = score_files(REFERENCE / "RTE" / "train_teacher.csv", REFERENCE / "RTE" / "train_s6l.csv")
    assert round(rte["teacher_accuracy"] * 100, 2) == 94.82
    assert round(rte["student_accuracy"] * 100, 2) == 87.43
    assert round(rte["teacher_ece"] * 100, 1) == 22.1
    assert round(rte["student_ece"] * 100, 1) == 19.6
    mrpc = score_files(
        REFERENCE / "MRPC" / "train_teacher.csv", REFERENCE / "MRPC" / "train_s6l.csv", "mrpc"
    )
    assert round(mrpc["teacher_ece"] * 100, 1) == 2.4
    assert round(mrpc["student_ece"] * 100, 1) == 2.7
    assert round(mrpc["student_accuracy"] * 100, 2) == 80.26
    assert 0 < mrpc["student_f1"] < 1
    assert 0 < mrpc["agreement_rate"] < 1 and mrpc["mean_kl_teacher_student"] > 0


def test_score_table_output() -> None:
    result = kdsearch(
        "score",
        "--teacher", str(REFERENCE / "SST-2" / "eval_teacher.csv"),
        "--student", str(REFERENCE / "SST-2" / "eval_s6l.csv"),
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout.splitlines()[0].split() == ["sigma", "0.068105"]


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("pred,p0,p1,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("student_rows", "message"),
    [
        (["0,0.9,0.1,0"], "has 2 rows but"),
        (["0,0.9,0.1,0", "1,0.2,0.8,0"], "labels differ in 1 rows (first: data row 2"),
        (["0,0.9,0.1,0", "1,0.2,0.7,1"], "probabilities of data row 2 sum to 0.900000, not 1"),
        (["0,0.9,0.1,0", "1,x,0.8,1"], "malformed row"),
    ],
)
def test_mismatched_files_are_refused(
    tmp_path: Path, student_rows: list[str], message: str
) -> None:
    teacher = _write(tmp_path / "t.csv", ["0,0.8,0.2,0", "1,0.3,0.7,1"])
    student = _write(tmp_path / "s.csv", student_rows)
    result = kdsearch("score", "--teacher", str(teacher), "--student", str(student))
    assert_clean_failure(result, message)
