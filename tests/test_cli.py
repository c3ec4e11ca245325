"""The CLI as users run it (a real process): bad input exits 2 with one clear message,
no traceback, nothing written; passwords never printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from kdsearch.service.storage import open_storage, study_names

from tests.conftest import ROOT, tiny_spec_text, write_spec

KDSEARCH = [sys.executable, "-m", "kdsearch"]


def kdsearch(
    *args: str, cwd: Path | None = None, env_storage: str | None = None
) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "KDSEARCH_STORAGE"}
    if env_storage:
        env["KDSEARCH_STORAGE"] = env_storage
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [*KDSEARCH, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=120
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture()
def spec_file(tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path) -> Path:
    return write_spec(
        tmp_path / "cli.yaml", tiny_spec_text("cli", tiny_bert_dir, fixture_glue / "SST-2")
    )


def test_bad_spec_writes_nothing(tmp_path: Path, spec_file: Path, pg_url: str) -> None:
    bad = (
        spec_file.read_text()
        .replace("task: sst2", "task: sst3")
        .replace("n_trials: 3", "n_trials: -1")
    )
    write_spec(spec_file, bad)
    result = kdsearch("study", "create", str(spec_file), "--storage", pg_url)
    assert_clean_failure(
        result, "2 problems in the study spec", "task: 'sst3' is not allowed", "n_trials: got -1"
    )
    assert study_names(open_storage(pg_url)) == []
    # The SQLite default is not even created.
    result = kdsearch("study", "create", str(spec_file), cwd=tmp_path)
    assert_clean_failure(result, "task: 'sst3'")
    assert not (tmp_path / "kdsearch.db").exists()


def test_create_attach_refuse_and_status(spec_file: Path, pg_url: str) -> None:
    created = kdsearch("study", "create", str(spec_file), env_storage=pg_url)
    assert created.returncode == 0, created.stderr
    assert "created study 'cli'" in created.stderr
    attached = kdsearch("study", "create", str(spec_file), "--storage", pg_url)
    assert attached.returncode == 0 and "attached to existing study 'cli'" in attached.stderr
    write_spec(spec_file, spec_file.read_text().replace("seed: 7", "seed: 8"))
    refused = kdsearch("study", "create", str(spec_file), "--storage", pg_url)
    assert_clean_failure(refused, "exists with a different spec", "seed: stored 7, given 8")
    assert len(optuna.load_study(study_name="cli", storage=pg_url).trials) == 1

    status = kdsearch("status", "--study", "cli", "--storage", pg_url)
    assert status.returncode == 0, status.stderr
    header, _, row = status.stdout.splitlines()
    assert header.split() == [
        "trial", "state", "baseline", "learning_rate", "batch_size", "epochs",
        "sigma", "accuracy_drop", "feasible", "host", "elapsed_s",
    ]  # fmt: skip
    assert row.split()[:3] == ["0", "WAITING", "yes"]
    rows = json.loads(
        kdsearch("status", "--study", "cli", "--format", "json", "--storage", pg_url).stdout
    )
    assert rows[0]["state"] == "WAITING" and rows[0]["sigma"] is None


def test_unknown_study(pg_url: str) -> None:
    for command in (("status", "--study", "nope"), ("worker", "--study", "nope")):
        result = kdsearch(*command, "--storage", pg_url)
        assert_clean_failure(result, "study 'nope' does not exist", "kdsearch study create")


def test_unreachable_database_never_prints_the_password() -> None:
    url = "postgresql+psycopg2://kd:s3cr3t-pw@127.0.0.1:1/kd"
    result = kdsearch("status", "--study", "x", "--storage", url)
    assert_clean_failure(
        result, "cannot reach the storage 'postgresql+psycopg2://kd:***@127.0.0.1:1/kd'"
    )
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_not_a_database_url() -> None:
    result = kdsearch("status", "--study", "x", "--storage", "not a url")
    assert_clean_failure(result, "is not a database URL")


def test_the_service_side_never_imports_torch() -> None:
    # Every module of the study side, and the package's own API, found by walking it.
    code = (
        "import importlib, pkgutil, sys, kdsearch, kdsearch.service as s; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(s.__path__, s.__name__ + '.')]; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr
