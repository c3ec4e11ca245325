"""Task data: GLUE's TSVs in every header variant (real rows, committed from ../shared/data),
GLUE in the hub's layout, and users' own files and datasets through `datasets`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from kdsearch.service.errors import KdsearchError
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.spec import StudySpec
from kdsearch.workers.data import (
    GLUE_LABELS,
    HUB_COLUMNS,
    load_task_data,
    read_glue_tsv,
)
from tests.helpers import glue_hub_folder


def test_sst2_text_header(fixture_glue: Path) -> None:
    split = read_glue_tsv(fixture_glue / "SST-2" / "dev.tsv", "sst2")
    assert len(split) == 100 and split.text_b is None
    assert split.text_a[0] == "it 's a charming and often affecting journey ."
    assert split.labels[:2] == [1, 0]


def test_mrpc_bom_and_quotes(fixture_glue: Path) -> None:
    split = read_glue_tsv(fixture_glue / "MRPC" / "dev.tsv", "mrpc")
    assert len(split) == 20
    # The BOM does not hide the "Quality" column; a stray quote opens no quoted field.
    assert split.labels[0] == 1
    assert split.text_b is not None and split.text_b[0].startswith('"The foodservice pie business')


def test_rte_hub_export_format(fixture_glue: Path) -> None:
    split = read_glue_tsv(fixture_glue / "RTE" / "train.tsv", "rte")
    assert len(split) == 20 and split.text_b is not None
    assert set(split.labels) <= {0, 1}


def test_qnli_string_labels(fixture_glue: Path) -> None:
    split = read_glue_tsv(fixture_glue / "QNLI" / "dev.tsv", "qnli")
    raw = (fixture_glue / "QNLI" / "dev.tsv").read_text().splitlines()[1].split("\t")[-1]
    assert raw == "entailment" and split.labels[0] == 0
    assert split.text_a[0] == "What came into force after the new constitution was herald?"


def test_qqp_is_duplicate_column(fixture_glue: Path) -> None:
    split = read_glue_tsv(fixture_glue / "QQP" / "dev.tsv", "qqp")
    assert len(split) == 9 and split.labels.count(1) == 4


def test_cola_headerless_glue_format(tmp_path: Path) -> None:
    # GLUE's CoLA files have no header (no CoLA copy is available here: hand-made rows).
    path = tmp_path / "train.tsv"
    path.write_text(
        "gj04\t1\t\tOur friends won't buy this analysis.\nclc95\t0\t*\tThey drank the pub.\n"
    )
    split = read_glue_tsv(path, "cola")
    assert split.text_a == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert split.labels == [1, 0]


def test_wrong_format_names_the_columns(fixture_glue: Path) -> None:
    with pytest.raises(KdsearchError, match=r"none of the columns \['question1'\]"):
        read_glue_tsv(fixture_glue / "SST-2" / "dev.tsv", "qqp")


def _load(spec: StudySpec) -> Any:
    return load_task_data(spec.data, spec.task)


def _spec(task: str, data: dict, tiny_bert_dir: Path) -> StudySpec:
    raw = {
        "name": "d",
        "task": task,
        "data": data,
        "teacher": {"model": str(tiny_bert_dir)},
        "student": {"teacher_layers": 1},
        "n_trials": 1,
    }
    return spec_from_dict(raw, source="test")


def test_row_limits(fixture_glue: Path, tiny_bert_dir: Path) -> None:
    data = {"path": str(fixture_glue / "SST-2"), "train_limit": 10, "dev_limit": 5}
    loaded = _load(_spec("sst2", data, tiny_bert_dir))
    assert (len(loaded.train), len(loaded.dev)) == (10, 5)
    assert loaded.label_names == ("negative", "positive") and loaded.num_labels == 2


@pytest.fixture(scope="module")
def hub_glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return glue_hub_folder(tmp_path_factory.mktemp("hub"))


@pytest.mark.parametrize("task", list(HUB_COLUMNS))
def test_glue_in_the_hubs_layout_loads_for_every_task(
    task: str, hub_glue: Path, fixture_glue: Path, tiny_bert_dir: Path
) -> None:
    # GLUE's own column names (sst2/cola "sentence", qnli "question"/"sentence", ...), the
    # config named after the task, the validation split as dev: as nyu-mll/glue on the hub.
    spec = _spec(task, {"source": "hub", "dataset": str(hub_glue)}, tiny_bert_dir)
    loaded = load_task_data(spec.data, spec.task)
    assert loaded.label_names == GLUE_LABELS[task]
    assert (loaded.train.text_b is None) == (HUB_COLUMNS[task][1] is None)
    folder = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI", "qqp": "QQP"}
    if task in folder:  # the same rows as GLUE's TSV, through the hub's layout
        tsv = read_glue_tsv(fixture_glue / folder[task] / "dev.tsv", task)
        assert (loaded.dev.text_a, loaded.dev.labels) == (tsv.text_a, tsv.labels)


def test_save_to_disk_folders_load_with_their_split_names(
    tmp_path: Path, hub_glue: Path, tiny_bert_dir: Path
) -> None:
    glue = datasets.load_dataset(str(hub_glue), "rte")
    glue.save_to_disk(str(tmp_path / "rte"))
    data = {"source": "disk", "path": str(tmp_path / "rte")}
    loaded = _load(_spec("rte", data, tiny_bert_dir))
    assert len(loaded.train) == 20 and loaded.train.text_b is not None
    bad = {**data, "dev_split": "test"}
    with pytest.raises(KdsearchError, match=r"has no split 'test' \(it has train, validation\)"):
        _load(_spec("rte", bad, tiny_bert_dir))


# Users' own data: a three-class intent set in each file format.
ROWS = [
    ("my card was charged twice", "billing"),
    ("the app crashes when I log in", "bug"),
    ("how do I export my data", "question"),
    ("refund the duplicate payment please", "billing"),
    ("error 500 on the settings page", "bug"),
    ("can I change my username", "question"),
]


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(f"body{sep}intent\n" + "".join(f"{t}{sep}{y}\n" for t, y in rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": t, "intent": y}) + "\n" for t, y in rows))
    else:
        table = datasets.Dataset.from_dict({"body": [t for t, _ in rows],
                                            "intent": [y for _, y in rows]})  # fmt: skip
        table.to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_users_files_with_a_column_map_and_label_names(
    suffix: str, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    data = {
        "source": "files",
        "train": _write(tmp_path / f"train{suffix}", ROWS),
        "dev": _write(tmp_path / f"dev{suffix}", ROWS[:3]),
        "columns": {"text": "body", "label": "intent"},
        "labels": ["billing", "bug", "question"],
    }
    loaded = _load(_spec("classification", data, tiny_bert_dir))
    assert loaded.num_labels == 3
    assert loaded.train.labels == [0, 1, 2, 0, 1, 2] and loaded.dev.labels == [0, 1, 2]
    assert loaded.train.text_a[0] == "my card was charged twice"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"columns": {"text": "text", "label": "intent"}},
            r"no column 'text' \(columns: body, intent\)",
        ),
        (
            {"labels": ["billing", "bug"]},
            r"train.csv, row 3: label 'question' is not one of the 2 classes",
        ),
        ({"labels": None}, "the label column holds names; list them in id order in data.labels"),
        ({"dev_rows": [("a new kind of request", "praise")]}, "label 'praise' is not one of"),
        (
            {"train_rows": ROWS[:2], "dev_rows": ROWS[:3]},
            "dev holds class 'question', which no train row has",
        ),
        ({"train_rows": []}, "has a header but no rows"),
    ],
)
def test_users_data_problems_name_file_row_and_fix(
    change: dict, message: str, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    train_rows = change.pop("train_rows", ROWS)
    dev_rows = change.pop("dev_rows", ROWS[:3])
    data = {
        "source": "files",
        "train": _write(tmp_path / "train.csv", train_rows),
        "dev": _write(tmp_path / "dev.csv", dev_rows),
        "columns": {"text": "body", "label": "intent"},
        "labels": ["billing", "bug", "question"],
        **change,
    }
    with pytest.raises(KdsearchError, match=message):
        _load(_spec("classification", data, tiny_bert_dir))


def test_integer_labels_need_no_names(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = [(t, str(i % 3)) for i, (t, _) in enumerate(ROWS)]
    data = {
        "source": "files",
        "train": _write(tmp_path / "train.jsonl", rows),
        "dev": _write(tmp_path / "dev.jsonl", rows),
        "columns": {"text": "body", "label": "intent"},
    }
    loaded = _load(_spec("classification", data, tiny_bert_dir))
    assert loaded.label_names == ("0", "1", "2")


def test_an_augmented_train_file_is_read_beside_the_split(
    fixture_glue: Path, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    # TinyBERT's train_aug.tsv has the task's GLUE columns; sigma stays on train.tsv.
    augmented = tmp_path / "train_aug.tsv"
    augmented.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\na fine movie\t1\n")
    data = {"path": str(fixture_glue / "SST-2"), "train_augmented": str(augmented)}
    loaded = _load(_spec("sst2", data, tiny_bert_dir))
    assert loaded.train_augmented is not None and loaded.train_augmented.labels == [1, 0, 1]
    assert len(loaded.train) == 200
