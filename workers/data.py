"""Task data: the train and dev splits (and an augmented train file) as texts and class ids.

GLUE tasks are presets: their columns in GLUE's TSVs (every header variant in the wild)
and on the hub (``nyu-mll/glue``), and their labels. Any other text-classification data
(``task: classification``) names its columns. Local GLUE folders and TinyBERT's augmented
TSVs are read with GLUE's rules (quoting off: GLUE texts hold stray quotes); everything
else goes through ``datasets`` (CSV, TSV, JSON Lines, Parquet files, ``save_to_disk``
folders, hub datasets and folders in the hub's layout), with its caching.

Torch-free: ``kdsearch study create`` reads the data with this module before storing a
study (``workers/preflight.py``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdsearch.service.errors import KdsearchError, first_line
from kdsearch.service.spec import DataSpec

logger = logging.getLogger(__name__)

# SST-2 train rows can be long; the csv module's default field limit is 128 KiB.
csv.field_size_limit(sys.maxsize)

# GLUE's TSV column names per task: (first text, second text or None, label), each with
# the aliases seen in GLUE's raw TSVs and in Hugging Face `glue` exports.
_TSV_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None, tuple[str, ...]]] = {
    "sst2": (("sentence", "text"), None, ("label",)),
    "cola": (("sentence",), None, ("label",)),
    "mrpc": (("#1 String", "sentence1"), ("#2 String", "sentence2"), ("Quality", "label")),
    "qqp": (("question1",), ("question2",), ("is_duplicate", "label")),
    "qnli": (("question",), ("sentence",), ("label",)),
    "rte": (("sentence1",), ("sentence2",), ("label",)),
}
# GLUE on the hub (nyu-mll/glue): (text, text pair) column names; labels are in `label`.
HUB_COLUMNS: dict[str, tuple[str, str | None]] = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
# Class names in id order, as the hub's `glue` dataset names them.
GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
}
GLUE_HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class Split:
    """One split, in file order (sigma joins rows by position)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, limit: int | None) -> Split:
        if limit is None or limit >= len(self):
            return self
        return Split(
            self.text_a[:limit],
            None if self.text_b is None else self.text_b[:limit],
            self.labels[:limit],
        )


@dataclass(frozen=True)
class TaskData:
    train: Split
    dev: Split
    train_augmented: Split | None  # distilled on instead of train when given
    label_names: tuple[str, ...]  # in id order

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------
# GLUE's TSVs


def _pick(header: list[str], names: tuple[str, ...], path: Path) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise KdsearchError(
        f"{path}: none of the columns {list(names)} in header {header}; "
        "give a GLUE-format file for this task"
    )


def _glue_label(value: str, task: str, path: Path, line: int) -> int:
    value = value.strip()
    if value in ("0", "1"):
        return int(value)
    if value in GLUE_LABELS[task]:
        return GLUE_LABELS[task].index(value)
    raise KdsearchError(
        f"{path}, line {line}: label {value!r} is not 0, 1 or a GLUE label name of {task} "
        f"({', '.join(GLUE_LABELS[task])}); fix the row"
    )


def read_glue_tsv(path: Path, task: str) -> Split:
    """Read one GLUE TSV: quoting off (GLUE texts contain stray quotes), BOM tolerated."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as exc:
        raise KdsearchError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise KdsearchError(f"{path}: cannot be read ({first_line(exc)})") from None
    if not rows:
        raise KdsearchError(f"{path}: the file is empty; give a GLUE TSV with a header")
    first_cols, second_cols, label_cols = _TSV_COLUMNS[task]
    if task == "cola" and len(rows[0]) == 4 and rows[0][1] in ("0", "1"):
        # GLUE's raw CoLA files have no header: source, label, original label, sentence.
        a_idx, b_idx, y_idx, body, start = 3, None, 1, rows, 1
    else:
        header = [h.strip() for h in rows[0]]
        a_idx = _pick(header, first_cols, path)
        b_idx = _pick(header, second_cols, path) if second_cols else None
        y_idx = _pick(header, label_cols, path)
        body, start = rows[1:], 2
    width = max(a_idx, b_idx or 0, y_idx) + 1
    text_a, text_b, labels = [], [], []
    for line, row in enumerate(body, start=start):
        if not row:
            continue
        if len(row) < width:
            raise KdsearchError(f"{path}, line {line}: {len(row)} columns, expected {width}")
        text_a.append(row[a_idx].strip())
        if b_idx is not None:
            text_b.append(row[b_idx].strip())
        labels.append(_glue_label(row[y_idx], task, path, line))
    return Split(text_a, text_b if b_idx is not None else None, labels)


# ---------------------------------------------------------------------------------------
# Everything else, through `datasets`


def _builder(path: str) -> tuple[str, dict[str, Any]]:
    """``datasets``' builder for a data file, by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        return "csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}  # as GLUE's TSVs
    if suffix == ".csv":
        return "csv", {}
    if suffix in (".jsonl", ".json"):
        return "json", {}
    return "parquet", {}


def _quiet_datasets() -> Any:
    """``datasets``, without its progress bars and info logs (ours say what is loaded)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _load_file(path: str) -> Any:
    datasets = _quiet_datasets()
    builder, options = _builder(path)
    if builder != "parquet":
        with open(path, "rb") as handle:  # datasets refuses an empty file with a riddle
            lines = sum(1 for line in handle if line.strip())
        if lines <= (1 if builder == "csv" else 0):
            raise KdsearchError(f"{path}: has a header but no rows; give the split's rows")
    try:
        return datasets.load_dataset(builder, data_files={"rows": path}, split="rows", **options)
    except Exception as exc:  # unreadable, malformed, not this format
        raise KdsearchError(f"{path}: cannot be read as {builder} ({first_line(exc)})") from None


def _load_dataset_split(data: DataSpec, task: str, split: str) -> Any:
    datasets = _quiet_datasets()

    if data.source == "disk":
        try:
            loaded = datasets.load_from_disk(data.path or "")
        except Exception as exc:
            raise KdsearchError(
                f"data.path {data.path!r}: not a folder save_to_disk wrote ({first_line(exc)})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KdsearchError(
                    f"data.path {data.path!r} has no split {split!r} (it has "
                    f"{', '.join(loaded)}); set data.train_split / data.dev_split"
                )
            return loaded[split]
        return loaded
    dataset = data.dataset or GLUE_HUB_DATASET
    config = data.config or (task if task in HUB_COLUMNS else None)
    try:
        return datasets.load_dataset(dataset, config, split=split, revision=data.revision)
    except Exception as exc:
        raise KdsearchError(
            f"cannot load split {split!r} of dataset {dataset!r} (config {config!r}): "
            f"{first_line(exc)}. Check the id, data.config and the split names, and network "
            "access (or use data.source: local / files / disk)"
        ) from None


def _columns(data: DataSpec, task: str, where: str) -> tuple[str, str | None, str]:
    if data.columns is not None:
        return data.columns.text, data.columns.text_pair, data.columns.label
    if data.source in ("hub", "disk") and task in HUB_COLUMNS:
        text, pair = HUB_COLUMNS[task]
        return text, pair, "label"
    if task in _TSV_COLUMNS:  # GLUE files: the TSV header names
        first, second, label = _TSV_COLUMNS[task]
        return first[0], second[0] if second else None, label[0]
    raise KdsearchError(f"{where}: data.columns is required; name the text and label columns")


def _to_split(rows: Any, data: DataSpec, task: str, where: str) -> tuple[Split, Any]:
    """(the split with raw labels, the label column's feature) from a ``datasets`` table."""
    text, pair, label = _columns(data, task, where)
    missing = [c for c in (text, pair, label) if c is not None and c not in rows.column_names]
    if missing:
        raise KdsearchError(
            f"{where}: no column {missing[0]!r} (columns: {', '.join(rows.column_names)}); "
            "set data.columns to the right names"
        )
    labels = list(rows[label])
    for row, value in enumerate(labels, start=1):
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise KdsearchError(
                f"{where}, row {row}: label {_shown(value)} is a {type(value).__name__}, not one "
                "class id or name; give each row one label"
            )
    split = Split(
        [str(t) for t in rows[text]],
        None if pair is None else [str(t) for t in rows[pair]],
        labels,
    )
    return split, rows.features[label]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:35] + "...'"


def _read(data: DataSpec, task: str, which: str) -> tuple[Split, Any, str]:
    """(split, label feature or None, a name for messages) of ``train``, ``dev`` or
    ``train_augmented``, labels still raw."""
    glue_tsv = task in _TSV_COLUMNS and data.columns is None
    if which == "train_augmented":
        path = data.train_augmented or ""
        if glue_tsv and path.lower().endswith(".tsv"):
            return read_glue_tsv(Path(path), task), None, path
        split, feature = _to_split(_load_file(path), data, task, path)
        return split, feature, path
    if data.source == "local":
        path = Path(data.path or "") / f"{which}.tsv"
        return read_glue_tsv(path, task), None, str(path)
    if data.source == "files":
        path = data.train if which == "train" else data.dev
        if glue_tsv and (path or "").lower().endswith(".tsv"):
            return read_glue_tsv(Path(path or ""), task), None, str(path)
        split, feature = _to_split(_load_file(path or ""), data, task, path or "")
        return split, feature, path or ""
    name = data.train_split if which == "train" else data.dev_split
    where = f"split {name!r} of {data.path or data.dataset or GLUE_HUB_DATASET}"
    split, feature = _to_split(_load_dataset_split(data, task, name), data, task, where)
    return split, feature, where


MAX_CLASSES = 1000  # as data.labels: more is a label column that is not one


def _label_names(
    data: DataSpec, task: str, features: Sequence[Any], splits: Sequence[Split]
) -> tuple[str, ...]:
    """Class names in id order: the spec's, else the GLUE preset's, else the data's own
    (a ClassLabel), else the ids seen (0..C-1, every one of them present)."""
    if data.labels is not None:
        return tuple(data.labels)
    if task in GLUE_LABELS:
        return GLUE_LABELS[task]
    for feature in features:
        if feature is not None and hasattr(feature, "names"):
            return tuple(feature.names)
    seen = {y for s in splits for y in s.labels}
    ids = {int(y) for y in seen if isinstance(y, int | str) and str(y).isdigit()}
    if not (seen and len(ids) == len(seen) and not any(isinstance(y, bool) for y in seen)):
        raise KdsearchError(
            "the label column holds names; list them in id order in data.labels (e.g. labels: "
            "[negative, neutral, positive])"
        )
    missing = sorted(set(range(max(ids) + 1)) - ids)
    if missing or len(ids) > MAX_CLASSES:
        stray = max(ids)
        raise KdsearchError(
            f"label ids must be 0..C-1, each present in the data, but id {stray} is there while "
            f"{len(missing)} id(s) below it never occur (first: {missing[0] if missing else '-'}); "
            "a stray label would make a class of its own: fix the rows with that label, or "
            "list the classes in data.labels"
        )
    return tuple(str(i) for i in range(max(ids) + 1))  # ids 0..C-1, no names


def _ids(split: Split, names: tuple[str, ...], where: str) -> Split:
    """Labels as ids 0..C-1 (names mapped through ``names``); a label outside them is an
    error naming its row."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for row, label in enumerate(split.labels, start=1):
        if isinstance(label, str) and label.strip() in index:
            out.append(index[label.strip()])
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
            out.append(label)
        elif (
            isinstance(label, str)
            and label.strip().lstrip("-").isdigit()
            and 0 <= int(label) < len(names)
        ):
            out.append(int(label))
        else:
            raise KdsearchError(
                f"{where}, row {row}: label {label!r} is not one of the {len(names)} classes "
                f"({', '.join(names)} or ids 0..{len(names) - 1}); fix the row or data.labels"
            )
    return Split(split.text_a, split.text_b, out)


def load_task_data(data: DataSpec, task: str) -> TaskData:
    """The study's splits, labels as class ids, row limits applied. Refuses empty splits,
    a train split of one class and dev labels that never occur in train (one message
    naming the file and row)."""
    read = {which: _read(data, task, which) for which in ("train", "dev")}
    if data.train_augmented is not None:
        read["train_augmented"] = _read(data, task, "train_augmented")
    names = _label_names(
        data, task, [f for _, f, _ in read.values()], [s for s, _, _ in read.values()]
    )
    splits = {which: _ids(split, names, where) for which, (split, _, where) in read.items()}
    train = splits["train"].head(data.train_limit)
    dev = splits["dev"].head(data.dev_limit)
    for which, split in (("train", train), ("dev", dev)):
        if len(split) == 0:
            raise KdsearchError(
                f"{read[which][2]}: has a header but no rows; a study needs {which} rows"
            )
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise KdsearchError(
            f"{read['train'][2]}: every train row is class {names[classes[0]]!r}; a classifier "
            "needs rows of two classes or more (check the label column and train_limit)"
        )
    unseen = sorted(set(dev.labels) - set(train.labels))
    if unseen:
        raise KdsearchError(
            f"{read['dev'][2]}: dev holds class {names[unseen[0]]!r}, which no train row has; "
            "train and dev must share their classes (check data.labels and the splits)"
        )
    logger.info(
        "loaded %s: %d train, %d dev rows, %d classes", task, len(train), len(dev), len(names)
    )
    return TaskData(train, dev, splits.get("train_augmented"), names)


def data_fingerprint(data: DataSpec, task: str) -> str:
    """Identifies the data a study reads: file contents for local files and folders, the
    dataset id, configuration and revision for the hub."""
    h = hashlib.sha256(repr((task, data.model_dump(mode="json"))).encode())
    files: list[Path] = []
    if data.source == "local":
        files = [Path(data.path or "") / "train.tsv", Path(data.path or "") / "dev.tsv"]
    elif data.source == "files":
        files = [Path(data.train or ""), Path(data.dev or "")]
    elif data.source == "disk":
        files = sorted(p for p in Path(data.path or "").rglob("*") if p.is_file())
    elif data.dataset is not None and Path(data.dataset).is_dir():  # hub layout, local
        files = sorted(p for p in Path(data.dataset).rglob("*") if p.is_file())
    if data.train_augmented is not None:
        files.append(Path(data.train_augmented))
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
