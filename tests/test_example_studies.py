"""The shipped offline example on data that is not GLUE: three-class financial news
sentiment from CSV files with a column map, run end to end on the real MiniLM teacher."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import kdsearch
from kdsearch.service.loading import load_spec
from kdsearch.service.report import format_markdown
from kdsearch.service.summary import per_class_sigma, summarize_study
from tests.helpers import ROOT
from tests.helpers import kdsearch as run_cli

pytestmark = pytest.mark.slow
YAML = ROOT / "studies" / "financial-sentiment.yaml"
DATA = ROOT / "data" / "financial-phrasebank"


def test_the_shipped_splits_are_what_the_yaml_reads() -> None:
    spec = load_spec(YAML)
    assert (spec.task, spec.data.source, spec.data.labels) == (
        "classification", "files", ["negative", "neutral", "positive"],
    )  # fmt: skip
    for split, n in (("train", 151), ("dev", 50)):
        with (DATA / f"{split}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n
        assert {r["Sentiment"] for r in rows} == {"negative", "neutral", "positive"}
    # no text in both splits, none with two labels
    texts = {s: {r["Headline"] for r in csv.DictReader((DATA / f"{s}.csv").open())}
             for s in ("train", "dev")}  # fmt: skip
    assert not texts["train"] & texts["dev"]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> kdsearch.Study:
    tmp = tmp_path_factory.mktemp("example")
    spec = load_spec(YAML).model_copy(update={"n_trials": 3})
    study = kdsearch.create_study(
        spec, storage=f"sqlite:///{tmp / 'k.db'}", artifacts=str(tmp / "art")
    )
    study.run_worker()
    return study


def test_the_three_class_example_runs_end_to_end(example: kdsearch.Study) -> None:
    records = example.records()
    assert len(records) == 3 and {r.state.name for r in records} <= {"COMPLETE", "PRUNED"}
    baseline = records[0]
    assert baseline.baseline and baseline.state.name == "COMPLETE"
    o = baseline.outcome
    # 151 rows, 3 classes: the teacher learns the task well past the majority class (38%)
    assert o.teacher_dev_accuracy >= 0.55
    assert o.train_n_total == 151 and o.dev_n_total == 50
    # three classes: one sigma per class, the objective is the largest
    assert len(o.train_sigma_per_class) == 3
    assert o.sigma == max(o.train_sigma_per_class)
    assert baseline.values[0] == o.sigma
    # the figures a user sees: the per-class histogram and the report's per-class table
    assert "confidence_delta_histogram.png" in baseline.artifacts
    assert per_class_sigma([o], example.spec) == dict(
        zip(["negative", "neutral", "positive"], o.train_sigma_per_class, strict=True)
    )
    summary = summarize_study(example.optuna, example.spec)
    if summary.answer_sigma_per_class is not None:  # an answer, from its seeds
        assert list(summary.answer_sigma_per_class) == ["negative", "neutral", "positive"]
        assert "sigma per class" in format_markdown([summary])
        assert max(summary.answer_sigma_per_class.values()) == pytest.approx(summary.answer_sigma)
    # every outcome knows the majority class's accuracy, and flags a student below it
    assert o.majority_dev_accuracy == pytest.approx(19 / 50)
    assert o.below_majority == (o.student_dev_accuracy < 19 / 50)


def test_the_example_status_table(example: kdsearch.Study) -> None:
    out = run_cli("status", "--study", "financial-sentiment", "--storage", example.storage_url)
    assert out.returncode == 0, out.stderr
    header, _, *rows = out.stdout.splitlines()[:5]
    columns = header.split()
    assert columns[:6] == ["trial", "state", "role", "config", "replicate", "seed"]
    assert "learning_rate" in header and "temperature" in header
    assert rows[0].split()[:3] == ["0", "COMPLETE", "baseline"]
    sigma = float(rows[0].split()[columns.index("sigma")])
    assert sigma == pytest.approx(example.records()[0].sigma, abs=1e-6)
    assert np.isfinite(sigma)


def test_the_exported_student_carries_the_declared_label_names(
    example: kdsearch.Study, tmp_path: Path
) -> None:
    """A user who loads the export with transformers sees the study's class names, not
    LABEL_0..2."""
    from transformers import AutoConfig

    out = tmp_path / "student"
    # the artifacts are found where the study recorded them
    result = run_cli(
        "export", "--study", "financial-sentiment", "--trial", "0", "--out", str(out),
        "--storage", example.storage_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
