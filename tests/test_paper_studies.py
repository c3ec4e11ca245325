"""A dry run of the paper's studies: each shipped ``studies/paper/*.yaml`` runs end to end
for a few steps, exactly as written except for what needs the network: its models become
tiny random BERTs in the same formats (a BERT-base-shaped teacher, TinyBERT-shaped
students without ``model_type`` and with a trained ``fit_dense``), its data GLUE rows in
the hub's layout, its sizes small."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import kdsearch
from kdsearch.service.errors import KdsearchError
from kdsearch.service.report import depth_png
from kdsearch.service.summary import read_records, summarize_study
from kdsearch.workers.models import forget_loaded, load_model
from tests.helpers import (
    COLA_STAND_INS,
    GLUE_FIXTURE_FOLDERS,
    ROOT,
    bert_teacher,
    glue_hub_folder,
    tinybert_checkpoint,
)

pytestmark = pytest.mark.slow

PAPER = sorted((ROOT / "studies" / "paper").glob("*.yaml"))
TEACHER_HIDDEN = 36  # 12 heads of 3, as BERT-base's 12 heads of 64


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand-ins")
    return {
        "teacher": bert_teacher(root / "teacher", hidden=TEACHER_HIDDEN),
        "4L": tinybert_checkpoint(root / "s4l", 4, 24, TEACHER_HIDDEN),
        "6L": tinybert_checkpoint(root / "s6l", 6, 48, TEACHER_HIDDEN),
        "glue": glue_hub_folder(root),
    }


def test_the_paper_studies_are_all_here() -> None:
    names = {p.stem for p in PAPER}
    tasks = ("sst2", "qqp", "qnli", "mrpc", "rte", "cola")
    assert {f"{t}-{s}" for t in tasks for s in ("s4l", "s6l")} <= names
    assert "rte-depth" in names  # the open question: depth between S4L and S6L


def test_a_tinybert_checkpoint_without_model_type_loads_as_bert(
    stand_ins: dict[str, Path],
) -> None:
    import torch

    model, _ = load_model(str(stand_ins["4L"]), "student", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    saved = torch.load(stand_ins["4L"] / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight,
        saved["bert.embeddings.word_embeddings.weight"],
    )
    # a config that is truly unknown is one clear message
    (stand_ins["4L"].parent / "odd").mkdir(exist_ok=True)
    (stand_ins["4L"].parent / "odd" / "config.json").write_text('{"layers": 3}')
    with pytest.raises(KdsearchError, match="must name a model_type"):
        load_model(str(stand_ins["4L"].parent / "odd"), "student", num_labels=2)


def _augmented_stand_in(task: str, folder: Path) -> Path:
    """A small train_aug.tsv in the task's GLUE format, where the shipped YAML names the
    file ``kdsearch augment`` writes (tests/test_augment.py runs the augmentation)."""
    path = folder / f"{task}-train_aug.tsv"
    if task == "cola":  # CoLA's TSVs have no header: source, label, original mark, sentence
        rows = [f"stand-in\t{label}\t\t{text}" for text, label in COLA_STAND_INS * 8]
        path.write_text("\n".join(rows) + "\n")
    else:
        fixture = ROOT / "tests" / "fixtures" / "glue" / GLUE_FIXTURE_FOLDERS[task] / "train.tsv"
        lines = fixture.read_text(encoding="utf-8-sig").splitlines()
        path.write_text("\n".join([lines[0], *lines[1:65] * 4][:65]) + "\n")
    return path


def _dry_run_spec(path: Path, stand_ins: dict[str, Path]) -> dict:
    raw = yaml.safe_load(path.read_text())
    if raw["data"].get("train_augmented"):
        raw["data"]["train_augmented"] = str(
            _augmented_stand_in(raw["task"], stand_ins["glue"].parent)
        )
    # What needs the network, swapped for stand-ins of the same shape; sizes shrunk.
    raw["teacher"]["model"] = str(stand_ins["teacher"])
    if "model" in raw["student"]:
        raw["student"]["model"] = str(stand_ins["4L" if "4L" in raw["student"]["model"] else "6L"])
    raw["data"] = {**raw["data"], "dataset": str(stand_ins["glue"]), "train_limit": 64,
                   "dev_limit": 12}  # fmt: skip
    # TinyBERT's batching skips an epoch's last, smaller batch: batches that fit the rows
    # (the smallest stand-in, QQP's, has 9 train rows)
    raw["stage1"].update(epochs=1, batch_size=8)
    raw["search_space"]["batch_size"] = {"type": "int", "low": 4, "high": 8}
    raw["defaults"]["batch_size"] = 8
    if "stage1_epochs" in raw["search_space"]:  # RTE's searched stage 1, shrunk alike
        raw["search_space"]["stage1_epochs"] = {"type": "int", "low": 1, "high": 2}
    raw["n_trials"] = 2
    # TinyBERT's batching pads every batch to max_seq_length: the stand-in rows fit 32,
    # and the teacher's forward at every step (dropout targets) is 16x cheaper than at 128
    raw["max_seq_length"] = 32
    raw["eval_batch_size"] = 16
    raw["training"]["eval_every_steps"] = 1  # TinyBERT's grid: after every step
    raw["reliability"] = {"heartbeat_interval_s": 1, "grace_period_s": 30}
    # Stand-in students may be pruned at any probe; the dry run wants every trial's end
    # (probes are still taken and recorded; tests/test_pruning.py covers the rules).
    raw["pruning"] = {**raw.get("pruning", {}), "rule": "none"}
    return raw


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_each_paper_study_runs_end_to_end(
    path: Path, stand_ins: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _dry_run_spec(path, stand_ins)
    # Two trials: the baseline and a sampled one (racing, as shipped, would give the
    # baseline its second seed first; tests/test_replicates.py covers racing).
    raw["replicates"] = {"max_seeds": 1}
    caplog.set_level("INFO")
    forget_loaded()  # the stand-in checkpoints are shared: read this study's from disk
    study = kdsearch.create_study(
        raw, storage=f"sqlite:///{tmp_path / 'k.db'}", artifacts=str(tmp_path / "art")
    )
    study.run_worker(threads=1)  # one sampled trial, the same every run (its number's seed)
    records = study.records()
    # a stand-in student may get no train row right that the teacher gets right (sigma
    # undefined): that trial ends PRUNED with its figures, as any degenerate one
    assert records[0].state.name == "COMPLETE", records[0].error
    assert records[1].state.name == "COMPLETE" or records[1].degenerate, records[1].error
    baseline, other = records
    assert baseline.baseline and baseline.hyperparameters is not None
    assert (baseline.hyperparameters["learning_rate"], baseline.hyperparameters["epochs"]) == (
        3e-5,
        3,
    )
    assert baseline.outcome is not None and other.outcome is not None
    # As the paper: accuracy against the default student (trial 0 against itself)...
    assert baseline.outcome.accuracy_drop == 0.0 == baseline.outcome.accuracy_drop_baseline
    assert other.outcome.accuracy_drop == pytest.approx(
        baseline.outcome.student_dev_accuracy - other.outcome.student_dev_accuracy
    )
    # ...and against the teacher, recorded too; the best dev evaluation was scored.
    assert other.outcome.accuracy_drop_teacher == pytest.approx(
        other.outcome.teacher_dev_accuracy - other.outcome.student_dev_accuracy
    )
    # TinyBERT keeps a checkpoint only when its metric beats 0: CoLA's MCC on stand-ins
    # may never, and then the final student is scored
    assert other.outcome.selected_epoch is not None or raw["task"] == "cola"
    assert len(other.probes) >= 2
    messages = " ".join(r.getMessage() for r in caplog.records)
    if "model" in raw["student"]:  # the TinyBERT checkpoint's trained fit_dense is used
        assert "config.json has no model_type; loading it as BERT" in messages
        assert "stage 1 starts from the checkpoint's trained fit_dense" in messages
    assert "stage 1, epoch 1/1" in messages
    if "teacher_layers" in raw["search_space"]:  # the depth study: its report section
        summary = summarize_study(study.optuna, study.spec)
        depths = {int(r.params.get("teacher_layers", 4)) for r in records}
        assert summary.by_depth is not None
        assert {row["depth"] for row in summary.by_depth} == depths
        depth_png(read_records(study.optuna), study.spec, tmp_path / "depth.png")
        assert (tmp_path / "depth.png").read_bytes()[:4] == b"\x89PNG"
