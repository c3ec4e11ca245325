"""The CLI as users run it (a real process): bad input exits 2 with one ``kdsearch: error:``
line, no traceback, nothing written; every exit code; help texts; passwords never printed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from kdsearch import __version__
from kdsearch.cli import build_parser
from kdsearch.service.storage import open_storage, study_names
from tests.helpers import ROOT, assert_clean_failure, kdsearch, tiny_spec_text, write_spec


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
    assert result.stderr.startswith("kdsearch: error: ")
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
    header, _, row, _, answer, footer = status.stdout.splitlines()
    assert answer == "answer: none yet"
    assert footer == "artifacts: not recorded yet (no worker ran)"
    assert header.split() == [
        "trial", "state", "role", "config", "replicate", "seed", "learning_rate",
        "batch_size", "epochs", "sigma", "accuracy_drop", "feasible", "host", "elapsed_s",
    ]  # fmt: skip
    # The queued baseline shows its configuration, seed and the values it will run with.
    cells = row.split()
    assert cells[:3] == ["0", "WAITING", "baseline"] and cells[4:9] == [
        "0",
        "7",
        "0.001000",
        "32",
        "1",
    ]
    rows = json.loads(
        kdsearch("status", "--study", "cli", "--format", "json", "--storage", pg_url).stdout
    )
    assert rows[0]["state"] == "WAITING" and rows[0]["sigma"] is None
    assert (rows[0]["learning_rate"], rows[0]["batch_size"]) == (1e-3, 32)
    assert (rows[0]["role"], rows[0]["replicate"], rows[0]["seed"]) == ("baseline", 0, 7)
    assert rows[0]["config"] == cells[3]


def test_a_worker_with_another_artifact_location_is_refused(
    spec_file: Path, pg_url: str, tmp_path: Path
) -> None:
    recorded, other = tmp_path / "recorded", tmp_path / "other"
    created = kdsearch(
        "study", "create", str(spec_file), "--artifacts", str(recorded), "--storage", pg_url
    )
    assert created.returncode == 0, created.stderr
    refused = kdsearch(
        "worker", "--study", "cli", "--artifacts", str(other), "--storage", pg_url, timeout=300
    )
    assert_clean_failure(refused, repr(str(other)), repr(str(recorded)), "drop --artifacts")
    stored = optuna.load_study(study_name="cli", storage=pg_url)
    assert [t.state.name for t in stored.trials] == ["WAITING"]  # nothing claimed
    status = kdsearch("status", "--study", "cli", "--storage", pg_url)
    assert status.stdout.splitlines()[-1] == f"artifacts: {recorded}"


def test_unknown_study(pg_url: str, spec_file: Path) -> None:
    kdsearch("study", "create", str(spec_file), "--storage", pg_url)
    for command in (("status", "--study", "nope"), ("worker", "--study", "nope")):
        result = kdsearch(*command, "--storage", pg_url)
        assert_clean_failure(result, "study 'nope' does not exist", "kdsearch study create")


def test_unreachable_database_is_exit_3_for_every_command_and_hides_the_password() -> None:
    url = "postgresql+psycopg2://kd:s3cr3t-pw@127.0.0.1:1/kd"
    for command in (
        ("status", "--study", "x"),
        ("worker", "--study", "x"),
        ("study", "list"),
        ("report", "--study", "x"),
    ):
        result = kdsearch(*command, "--storage", url)
        assert_clean_failure(
            result, "cannot reach the storage 'postgresql+psycopg2://kd:***@127.0.0.1:1/kd'", code=3
        )
        assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_not_a_database_url() -> None:
    result = kdsearch("status", "--study", "x", "--storage", "not a url")
    assert_clean_failure(result, "is not a database URL")


def test_read_only_commands_write_nothing(tmp_path: Path, pg_url: str) -> None:
    # No SQLite file appears...
    for command in (("study", "list"), ("status", "--study", "x"), ("report", "--study", "x")):
        result = kdsearch(*command, cwd=tmp_path)
        assert result.returncode in (0, 2), result.stderr
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    # ...and an empty PostgreSQL database stays empty: `study list` lists nothing.
    listed = kdsearch("study", "list", "--storage", pg_url)
    assert (listed.returncode, listed.stdout) == (0, "")
    status = kdsearch("status", "--study", "x", "--storage", pg_url)
    assert_clean_failure(status, "holds no kdsearch study yet")
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url)
    with engine.connect() as conn:
        assert sqlalchemy.inspect(conn).get_table_names() == []
    engine.dispose()


def test_usage_errors_exit_2_and_name_the_option() -> None:
    result = kdsearch("worker", "--study", "s", "--threads", "-1")
    assert result.returncode == 2 and "--threads: -1 must be at least 1" in result.stderr
    result = kdsearch("worker", "--study", "s", "--gpu", "maybe")
    assert result.returncode == 2 and "invalid choice: 'maybe'" in result.stderr
    result = kdsearch("dashboard", "--port", "70000")
    assert result.returncode == 2 and "70000 is not a port" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_global_options_before_or_after_the_command(pg_url: str) -> None:
    result = kdsearch("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"kdsearch {__version__}")
    before = kdsearch("-v", "--storage", pg_url, "study", "list")
    after = kdsearch("study", "list", "-v", "--storage", pg_url)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, its parser) for every leaf command."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*path, name))


LEAVES = list(_commands(build_parser()))


def test_all_commands_are_checked() -> None:
    assert {" ".join(p) for p, _ in LEAVES} == {
        "study create", "study list", "study schema", "study unhalt", "study delete",
        "study relocate", "worker", "status", "report", "export", "predictions", "dashboard",
        "score", "augment",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "parser"), LEAVES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else ""
)
def test_every_option_has_help_and_every_command_an_example(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    for action in parser._actions:
        assert action.help, f"kdsearch {' '.join(path)} {action.option_strings or action.dest}"
    result = kdsearch(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert f"example:\n  kdsearch {' '.join(path)}" in result.stdout, result.stdout


def test_the_service_side_never_imports_torch() -> None:
    # Every module of the study side, and the package's own API, found by walking it.
    code = (
        "import importlib, pkgutil, sys, kdsearch, kdsearch.service as s; "
        "[importlib.import_module(m.name) "
        "for m in pkgutil.walk_packages(s.__path__, s.__name__ + '.')]; "
        "import kdsearch.cli; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr
