"""The demo study is reproducible: the shipped `studies/demo-sst2.yaml`, on a smaller
budget (the suite's few real SST-2 rows, shorter sequences, fewer and shorter trials),
run twice with one worker each on the same machine, gives the same configurations,
seeds, figures and answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import kdsearch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _small_demo(name: str) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "studies" / "demo-sst2.yaml").read_text())
    raw["name"] = name
    # the suite's SST-2 rows (tests/fixtures: real rows, a small dev split)
    raw["data"].update(path=str(ROOT / "tests" / "fixtures" / "glue" / "SST-2"))
    raw["teacher"]["finetune"]["epochs"] = 1
    raw["max_seq_length"] = 32
    raw["n_trials"] = 4
    raw["defaults"]["epochs"] = 1  # short trials: reproducibility does not need long ones
    raw["search_space"]["epochs"] = {"type": "int", "low": 1, "high": 2}
    raw["pruning"] = {"rule": "none"}
    raw["sampler"]["n_startup_trials"] = 2
    raw["replicates"].update(max_seeds=2, confirm_seeds=0)
    return raw


def _table(study: kdsearch.Study) -> list[tuple[Any, ...]]:
    """The configuration table, as `status --configurations` shows it, in numbers."""
    return [
        (c["config"], c["seeds"], c["verdict"], c["sigma_mean"], c["drop_mean"], c["trials"])
        for c in (row.flat() for row in study.summary().configurations)
    ]


def test_the_demo_gives_the_same_configurations_and_figures_twice(tmp_path: Path) -> None:
    tables, answers = [], []
    for name in ("demo-a", "demo-b"):
        study = kdsearch.create_study(
            _small_demo(name),
            storage=f"sqlite:///{tmp_path / 'demo.db'}",
            artifacts=str(tmp_path / "art"),
        )
        study.run_worker(threads=2, cache_dir=tmp_path / "cache")
        tables.append(_table(study))
        answers.append(study.answer())
    assert len(tables[0]) >= 2  # the baseline and a sampled configuration
    assert tables[0] == tables[1]
    assert answers[0] == answers[1]
