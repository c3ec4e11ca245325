"""Test helpers (not fixtures): a private PostgreSQL server, study specs, CLI and worker
processes."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster in a temp folder (also used to test restarts).

    With ``password``, TCP connections need it (scram-sha-256) as role ``user``."""

    def __init__(self, password: str | None = None, user: str = "postgres") -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.fail(
                "no PostgreSQL server binaries (initdb) found: install postgresql or set "
                "KDSEARCH_TEST_DATABASE_URL to a server where tests may create databases"
            )
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="kdsearch-pg-"))
        self.port = free_port()
        # initdb refuses to run as root: run the server as the postgres user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, user=self.user)
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = self.dir / "pw"
            pwfile.write_text(password + "\n")
            if self.user:
                shutil.chown(pwfile, user=self.user)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.dir / "data"), *auth, "-U", user)
        self.start()

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.dir / "data"), "-o", options, "-l",
            str(self.dir / "log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # stopped already
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_spec_text(
    name: str,
    model_dir: Path,
    data_dir: Path,
    n_trials: int = 3,
    extra: str = "",
    pruning: str = "none",
    grace: int = 4,
) -> str:
    """A complete, quick study spec on the tiny BERT and committed SST-2 rows."""
    return f"""\
name: {name}
task: sst2
data:
  source: local
  path: {data_dir}
  train_limit: 160
  dev_limit: 64
teacher:
  model: {model_dir}
  finetune: {{epochs: 5, learning_rate: 5.0e-3, batch_size: 16}}
student:
  teacher_layers: 1
max_seq_length: 32
search_space:
  learning_rate: {{type: float, low: 1.0e-5, high: 1.0e-2, log: true}}
  batch_size: {{type: categorical, choices: [16, 32]}}
  epochs: {{type: int, low: 1, high: 2}}
defaults:
  learning_rate: 1.0e-3
  batch_size: 32
  epochs: 1
n_trials: {n_trials}
seed: 7
sampler: {{name: tpe, n_startup_trials: 2}}
pruning: {{rule: {pruning}, probe_size: 64}}
reliability: {{heartbeat_interval_s: 1, grace_period_s: {grace}, max_retries: 2}}
{extra}"""


KDSEARCH = [sys.executable, "-m", "kdsearch"]


def kdsearch(
    *args: str,
    cwd: Path | None = None,
    env_storage: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run the CLI as users do (a real process), without the caller's KDSEARCH_* settings."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("KDSEARCH_")}
    if env_storage:
        full["KDSEARCH_STORAGE"] = env_storage
    full.update(env or {})
    return subprocess.run(
        [*KDSEARCH, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=full,
        timeout=timeout,
    )  # fmt: skip


def assert_clean_failure(
    result: subprocess.CompletedProcess, *fragments: str, code: int = 2
) -> None:
    """The CLI's contract for bad input: one ``kdsearch: error:`` message, the exit code,
    no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "kdsearch: error: " in result.stderr or "usage:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def start_worker(
    url: str, study: str, artifacts: Path, *extra: str, **env: str
) -> subprocess.Popen:
    """A worker process (one CPU thread) on ``study``; its output is read with ``finish``."""
    full = {**os.environ, **env}
    return subprocess.Popen(
        [*KDSEARCH, "worker", "--study", study, "--storage", url,
         "--artifacts", str(artifacts), "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full,
    )  # fmt: skip


def finish(workers: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for worker processes; every one must exit 0. Returns their logs."""
    logs = [w.communicate(timeout=timeout)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * len(workers), "\n\n".join(logs)
    return logs


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
