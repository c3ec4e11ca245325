"""GLUE data: local GLUE-format folders (every header variant in the wild) and the hub."""

from __future__ import annotations

import csv
import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from kdsearch.service.errors import KdsearchError, first_line
from kdsearch.service.spec import DataSpec

logger = logging.getLogger(__name__)

# SST-2 train rows can be long; the csv module's default field limit is 128 KiB.
csv.field_size_limit(sys.maxsize)

# Column names per task: (first text, second text or None, label), each with the aliases
# seen in GLUE's raw TSVs and in Hugging Face `glue` exports.
_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None, tuple[str, ...]]] = {
    "sst2": (("sentence", "text"), None, ("label",)),
    "cola": (("sentence",), None, ("label",)),
    "mrpc": (("#1 String", "sentence1"), ("#2 String", "sentence2"), ("Quality", "label")),
    "qqp": (("question1",), ("question2",), ("is_duplicate", "label")),
    "qnli": (("question",), ("sentence",), ("label",)),
    "rte": (("sentence1",), ("sentence2",), ("label",)),
}
# GLUE's string labels; ids follow GLUE and the Hugging Face `glue` dataset.
_STRING_LABELS = {"entailment": 0, "not_entailment": 1}
_HUB_SPLITS = {"train": "train", "dev": "validation"}
NUM_LABELS = 2  # every supported task is binary


@dataclass(frozen=True)
class Split:
    """One split of a GLUE task, in file order (sigma joins rows by position)."""

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


def _pick(header: list[str], names: tuple[str, ...], path: Path) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise KdsearchError(
        f"{path}: none of the columns {list(names)} in header {header}; "
        "give a GLUE-format file for this task"
    )


def _label(value: str, path: Path, line: int) -> int:
    value = value.strip()
    if value in _STRING_LABELS:
        return _STRING_LABELS[value]
    if value in ("0", "1"):
        return int(value)
    raise KdsearchError(f"{path}, line {line}: label {value!r} is not 0, 1 or a GLUE label name")


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
    first_cols, second_cols, label_cols = _COLUMNS[task]
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
        labels.append(_label(row[y_idx], path, line))
    return Split(text_a, text_b if b_idx is not None else None, labels)


def _load_hub_split(task: str, split: str) -> Split:
    import datasets  # heavy, and only needed with internet access

    try:
        rows = datasets.load_dataset("nyu-mll/glue", task, split=_HUB_SPLITS[split])
    except Exception as exc:
        raise KdsearchError(
            f"cannot load GLUE {task!r} from the Hugging Face hub ({exc}); "
            "check the network or use data.source: local with a GLUE folder"
        ) from None
    first_cols, second_cols, _ = _COLUMNS[task]
    text_a = list(rows[first_cols[-1]])
    text_b = list(rows[second_cols[-1]]) if second_cols else None
    return Split(text_a, text_b, [int(y) for y in rows["label"]])


def load_split(data: DataSpec, task: str, split: str) -> Split:
    """The train or dev split, with the spec's row limit applied."""
    limit = data.train_limit if split == "train" else data.dev_limit
    if data.source == "hub":
        loaded = _load_hub_split(task, split)
    else:
        loaded = read_glue_tsv(Path(data.path or "") / f"{split}.tsv", task)
    loaded = loaded.head(limit)
    logger.info("loaded %s %s: %d rows", task, split, len(loaded))
    return loaded


def data_fingerprint(data: DataSpec, task: str) -> str:
    """Identifies the data a study reads: file contents for local folders."""
    h = hashlib.sha256(f"{task}:{data.source}:{data.train_limit}:{data.dev_limit}".encode())
    if data.source == "local":
        for split in ("train.tsv", "dev.tsv"):
            h.update((Path(data.path or "") / split).read_bytes())
    return h.hexdigest()[:16]
