"""The compose file's services, run outside Docker against the test PostgreSQL: the
commands and flags it names must exist and work. Plus `docker-compose config` where the
client is installed (CI installs Debian's docker-compose)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml

from tests.helpers import ROOT, PrivatePostgres, kdsearch, tiny_spec_text, write_spec

COMPOSE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} substitution."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        if "?" in m.group(0):
            pytest.fail(f"{m.group(1)} is required by the compose file")
        return m.group(2) or ""

    return _VAR.sub(sub, value)


def service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def command(name: str, env: dict[str, str]) -> list[str]:
    return [interpolate(part, env) for part in service(name)["command"]]


def run_kdsearch(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kdsearch", *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture()
def env(tmp_path: Path, pg_url: str, tiny_bert_dir: Path, fixture_glue: Path) -> dict[str, str]:
    spec = write_spec(
        tmp_path / "c.yaml",
        tiny_spec_text("compose", tiny_bert_dir, fixture_glue / "SST-2", n_trials=1),
    )
    service_env = service("workers")["environment"]
    assert set(service_env) >= {"KDSEARCH_STORAGE", "KDSEARCH_ARTIFACTS"}
    return {
        "STUDY_FILE": str(spec),
        "STUDY_NAME": "compose",
        "POSTGRES_PASSWORD": "unused",
        "KDSEARCH_STORAGE": pg_url,  # stands in for the postgres service
        "KDSEARCH_ARTIFACTS": str(tmp_path / "artifacts"),
        "KDSEARCH_GPU_LOCK_DIR": str(tmp_path / "gpus"),
    }


def test_study_worker_and_dashboard_commands_run(env: dict[str, str], pg_url: str) -> None:
    # study: one-shot and idempotent
    for _ in range(2):
        result = run_kdsearch(command("study", env), env)
        assert result.returncode == 0, result.stderr
    # CPU workers run the study to its budget
    result = run_kdsearch([*command("workers-cpu", env), "--threads", "1"], env)
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="compose", storage=pg_url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"]
    # GPU workers: every flag parses; on a machine without GPUs the claim fails clearly
    result = run_kdsearch(command("workers", env), {**env, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "--gpu auto found no GPU" in result.stderr and "usage:" not in result.stderr

    # dashboard: serves the study through its API
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = command("dashboard", env)
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "kdsearch", *args], env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        body = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert body is not None, "dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["compose"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_compose_file_shape() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    devices = services["workers"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["count"] == "all"  # each replica claims its own GPU (workers/gpus.py)
    assert services["workers-cpu"]["profiles"] == ["cpu"]
    assert (
        services["workers"]["depends_on"]["study"]["condition"] == "service_completed_successfully"
    )
    assert "POSTGRES_PASSWORD:?" in COMPOSE.read_text()  # required from the environment
    assert services["workers"]["restart"] == "on-failure:3"  # restarts are bounded
    assert "healthcheck" in services["postgres"]
    # S3 credentials pass through from the environment when set; none is written here.
    for name in ("workers", "workers-cpu", "dashboard", "study"):
        environment = services[name]["environment"]
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert key in environment and environment[key] is None, (name, key)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"]])
def test_docker_compose_config_validates(profile: list[str]) -> None:
    env = {**os.environ, "POSTGRES_PASSWORD": "x"}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


PASSWORD = "p@ss/w%20rd:x"  # URL syntax inside: it must reach PostgreSQL unchanged


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_a_password_with_url_characters_reaches_postgres_unchanged(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "KDSEARCH_"))}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
        env={**env, "POSTGRES_PASSWORD": PASSWORD, "POSTGRES_HOST": "127.0.0.1"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("study", "workers", "dashboard"):
        environment = yaml.safe_load(result.stdout)["services"][name]["environment"]
        assert environment["PGPASSWORD"] == PASSWORD, name
        assert PASSWORD not in environment["KDSEARCH_STORAGE"], name
        assert environment["KDSEARCH_STORAGE"].startswith("postgresql+psycopg2://kdsearch@")
    # A real server that wants that password: the study service's command, with the
    # environment compose gives it, connects; without the password it is refused (exit 3).
    server = PrivatePostgres(password=PASSWORD, user="kdsearch")
    try:
        storage = f"postgresql+psycopg2://kdsearch@127.0.0.1:{server.port}/postgres"
        ok = kdsearch("study", "list", env={"KDSEARCH_STORAGE": storage, "PGPASSWORD": PASSWORD})
        assert ok.returncode == 0, ok.stderr
        refused = kdsearch("study", "list", env={"KDSEARCH_STORAGE": storage, "PGPASSWORD": "x"})
        assert refused.returncode == 3 and "password authentication failed" in refused.stderr
        assert PASSWORD not in refused.stderr
    finally:
        server.destroy()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_passes_an_s3_store_to_workers_and_dashboard() -> None:
    """With S3 set in the environment (or .env), the workers and the dashboard get the
    bucket and the credentials; without it, the shared volume and no AWS_* variable."""

    def resolved(extra: dict[str, str]) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KDSEARCH_"))}
        result = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "config"],
            capture_output=True, text=True, env={**env, "POSTGRES_PASSWORD": "x", **extra},
            cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["services"]

    s3 = {
        "KDSEARCH_ARTIFACTS": "s3://kd/team",
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    }
    services = resolved(s3)
    for name in ("workers", "dashboard"):
        environment = services[name]["environment"]
        assert {k: environment.get(k) for k in s3} == s3, name
        assert environment["XDG_CACHE_HOME"] == "/cache"
    environment = resolved({})["workers"]["environment"]
    assert environment["KDSEARCH_ARTIFACTS"] == "/artifacts"
    assert not [k for k, v in environment.items() if k.startswith("AWS_") and v is not None]
