"""The GLUE reader on real rows in every header variant (committed from ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdsearch.service.errors import KdsearchError
from kdsearch.service.spec import DataSpec
from kdsearch.workers.data import load_split, read_glue_tsv


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


def test_row_limits(fixture_glue: Path) -> None:
    data = DataSpec(path=str(fixture_glue / "SST-2"), train_limit=10, dev_limit=5)
    assert len(load_split(data, "sst2", "train")) == 10
    assert len(load_split(data, "sst2", "dev")) == 5


def test_wrong_format_names_the_columns(fixture_glue: Path) -> None:
    with pytest.raises(KdsearchError, match=r"none of the columns \['question1'\]"):
        read_glue_tsv(fixture_glue / "SST-2" / "dev.tsv", "qqp")
