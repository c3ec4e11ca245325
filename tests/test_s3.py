"""An S3-compatible artifact store: workers on machines that share no filesystem.

The store is a real S3 HTTP endpoint on a local port (moto's standalone server, see
``s3_server`` in conftest); locks are real PostgreSQL advisory locks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import boto3
import optuna
import pytest
from optuna.artifacts import download_artifact, upload_artifact
from optuna.trial import TrialState

from kdsearch.service.artifacts import (
    MANIFEST,
    ArtifactLocation,
    S3Bucket,
    explicit_artifacts,
    open_artifact_store,
    resolve_artifacts,
    resolve_cache_dir,
)
from kdsearch.service.errors import KdsearchError
from kdsearch.service.loading import load_spec
from kdsearch.service.record import StudyAttr
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach
from kdsearch.workers.cache import AssetCache, open_asset_cache
from kdsearch.workers.metrics import confidence_stats
from kdsearch.workers.predictions import read_predictions
from tests.helpers import ROOT, tiny_spec_text, write_spec


def test_locations_resolve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KDSEARCH_ARTIFACTS", raising=False)
    monkeypatch.delenv("KDSEARCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert resolve_artifacts(None) == ArtifactLocation(folder=tmp_path / "kdsearch-artifacts")
    s3 = resolve_artifacts("s3://team-bucket/kd/run1/")
    assert (s3.bucket, s3.prefix, str(s3)) == ("team-bucket", "kd/run1", "s3://team-bucket/kd/run1")
    assert s3.key("optuna", "abc") == "kd/run1/optuna/abc"
    assert resolve_artifacts("s3://b").key("cache", "x") == "cache/x"
    assert explicit_artifacts(None) is None  # nothing named: the study's, else the default
    monkeypatch.setenv("KDSEARCH_ARTIFACTS", "s3://from-env")
    assert resolve_artifacts(explicit_artifacts(None)).bucket == "from-env"
    assert explicit_artifacts("rel") == "rel"  # the flag wins over the environment
    assert resolve_artifacts("rel") == ArtifactLocation(folder=tmp_path / "rel")
    # The assets cache: beside a folder location (shared with it), local for S3.
    assert resolve_cache_dir(ArtifactLocation(folder=tmp_path / "a"), None) == tmp_path / "a/cache"
    assert resolve_cache_dir(s3, None) == tmp_path / "xdg" / "kdsearch"
    monkeypatch.setenv("KDSEARCH_CACHE", str(tmp_path / "c"))
    assert resolve_cache_dir(s3, None) == tmp_path / "c"
    assert resolve_cache_dir(s3, tmp_path / "flag") == tmp_path / "flag"
    for bad in ("s3://", "s3:///prefix", "gs://bucket/x", "https://host/b"):
        with pytest.raises(KdsearchError, match=r"neither a folder nor s3://BUCKET\[/PREFIX\]"):
            resolve_artifacts(bad)


def _keys(bucket: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_trial_artifacts_live_under_the_prefix(s3_env: dict[str, str], tmp_path: Path) -> None:
    bucket = s3_env["KDSEARCH_TEST_BUCKET"]
    store = open_artifact_store(resolve_artifacts(f"s3://{bucket}/team/a"))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    trial = study.ask()
    (tmp_path / "preds.csv").write_text("pred,p0,p1,label\n0,0.9,0.1,0\n")
    artifact_id = upload_artifact(
        artifact_store=store, file_path=str(tmp_path / "preds.csv"), study_or_trial=trial
    )
    assert _keys(bucket) == [f"team/a/optuna/{artifact_id}"]
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(tmp_path / "b"))
    assert (tmp_path / "b").read_text() == "pred,p0,p1,label\n0,0.9,0.1,0\n"
    store.remove(artifact_id)
    assert _keys(bucket) == []


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_assets_are_built_once_and_fetched_on_other_machines(
    s3_env: dict[str, str], pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three "machines" (own local cache folders, no shared filesystem) start together:
    one builds under the database lock and publishes; the others wait, then fetch."""
    location = resolve_artifacts(f"s3://{s3_env['KDSEARCH_TEST_BUCKET']}/p")
    storage = open_storage(pg_url)
    builds: list[str] = []

    def build(tmp: Path) -> None:
        builds.append(threading.current_thread().name)
        time.sleep(1.0)  # long enough for the others to be waiting on the lock
        (tmp / "teacher").mkdir()
        (tmp / "teacher" / "config.json").write_text('{"layers": 2}')
        (tmp / "assets.pt").write_bytes(os.urandom(300_000))  # differs on every build

    folders: dict[str, Path] = {}
    start = threading.Barrier(3)

    def machine(name: str) -> None:
        cache = open_asset_cache(location, tmp_path / name, storage)
        start.wait()
        folders[name] = cache.folder("sst2-0123", "study assets", build)

    caplog.set_level("INFO")
    threads = [threading.Thread(target=machine, args=(f"m{i}",), name=f"m{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(builds) == 1, builds
    contents = [_folder_bytes(folders[f"m{i}"]) for i in range(3)]
    assert contents[0] == contents[1] == contents[2]
    # the files, and each machine's record of them (checked whenever it opens the folder)
    assert set(contents[0]) == {"teacher/config.json", "assets.pt", "MANIFEST.json"}
    assert sum("fetching study assets from S3" in r.message for r in caplog.records) == 2
    manifest = json.loads(
        boto3.client("s3")
        .get_object(Bucket=location.bucket, Key=f"p/cache/sst2-0123/{MANIFEST}")["Body"]
        .read()
    )
    digest = hashlib.sha256(contents[0]["assets.pt"]).hexdigest()
    assert manifest["files"]["assets.pt"] == {"size": 300_000, "sha256": digest}
    # A machine that already has its copy uses it without touching S3 or building.
    again = open_asset_cache(location, tmp_path / "m0", storage).folder("sst2-0123", "x", build)
    assert again == folders["m0"] and len(builds) == 1


def test_lost_lock_still_leaves_one_published_copy(s3_env: dict[str, str], tmp_path: Path) -> None:
    """If two machines build at once (the lock died with a database restart), the first
    manifest wins and the second machine uses the first machine's files, not its own."""
    location = resolve_artifacts(f"s3://{s3_env['KDSEARCH_TEST_BUCKET']}")
    bucket = S3Bucket(location)
    no_lock = lambda name: nullcontext()  # noqa: E731

    def build_while_another_machine_publishes(tmp: Path) -> None:
        other = tmp_path / "other-build"
        other.mkdir()
        (other / "assets.pt").write_bytes(b"first machine")
        assert bucket.publish(other, "sst2-x")
        (tmp / "assets.pt").write_bytes(b"second machine")

    cache = AssetCache(tmp_path / "second", bucket, no_lock)
    folder = cache.folder("sst2-x", "study assets", build_while_another_machine_publishes)
    assert (folder / "assets.pt").read_bytes() == b"first machine"
    assert not bucket.publish(folder, "sst2-x")  # published already: nothing overwritten


def test_corrupted_object_is_refused(s3_env: dict[str, str], tmp_path: Path) -> None:
    bucket_name = s3_env["KDSEARCH_TEST_BUCKET"]
    bucket = S3Bucket(resolve_artifacts(f"s3://{bucket_name}/p"))
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "assets.pt").write_bytes(b"good")
    assert bucket.publish(tmp_path / "built", "sst2-y")
    (build_key,) = [k for k in _keys(bucket_name) if k.endswith("/assets.pt")]
    boto3.client("s3").upload_fileobj(io.BytesIO(b"bad!"), bucket_name, build_key)
    with pytest.raises(KdsearchError, match="does not match its manifest"):
        bucket.fetch("sst2-y", tmp_path / "fetched")


def _kdsearch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdsearch", *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip


@pytest.fixture()
def s3_study(
    tmp_path: Path, pg_url: str, tiny_bert_dir: Path, fixture_glue: Path
) -> tuple[str, Path]:
    text = tiny_spec_text("s3", tiny_bert_dir, fixture_glue / "SST-2")
    create_or_attach(open_storage(pg_url), load_spec(write_spec(tmp_path / "s3.yaml", text)))
    return pg_url, tmp_path


def test_bad_store_is_one_clear_message(s3_env: dict[str, str], s3_study: tuple[str, Path]) -> None:
    pg_url, tmp_path = s3_study
    worker = ("worker", "--study", "s3", "--storage", pg_url, "--cache-dir", str(tmp_path / "c"))
    cases = {
        "s3://no-such-bucket/x": ({}, "cannot reach the artifact store 's3://no-such-bucket/x'"),
        f"s3://{s3_env['KDSEARCH_TEST_BUCKET']}": (
            # one attempt: botocore's default retries only make the same message slower
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_MAX_ATTEMPTS": "1"},
            "Could not connect to the endpoint URL",
        ),
        "gs://bucket": ({}, "neither a folder nor s3://BUCKET[/PREFIX]"),
    }
    for location, (env, message) in cases.items():
        result = _kdsearch(*worker, "--artifacts", location, env=env)
        # an unreachable store is exit 4; a location that is no location at all, bad input
        assert result.returncode == (2 if location.startswith("gs:") else 4), result.stderr
        assert "Traceback" not in result.stderr and message in result.stderr, result.stderr
        assert "AWS_ENDPOINT_URL" in result.stderr or "gs://" in location
    # Nothing was claimed or written to the study, not even the artifact location.
    study = optuna.load_study(study_name="s3", storage=pg_url)
    assert [t.state for t in study.trials] == [TrialState.WAITING]  # the enqueued baseline
    assert StudyAttr.ARTIFACTS not in study.user_attrs
    # boto3 missing: the fix is named.
    code = (
        "import sys; sys.modules['boto3'] = None; from kdsearch.cli import main; "
        f"sys.exit(main(['worker', '--study', 's3', '--storage', {pg_url!r}, "
        "'--artifacts', 's3://b']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 2 and "pip install 'kdsearch[s3]'" in result.stderr, result.stderr


@pytest.mark.slow
def test_workers_without_a_shared_filesystem_run_one_study(
    s3_env: dict[str, str], s3_study: tuple[str, Path]
) -> None:
    """Two workers, each with its own cache folder (as on two machines), a PostgreSQL
    study and an S3 bucket: the budget is met, the teacher is prepared once, every trial
    distils from the same teacher bytes, and the dashboard serves artifacts from S3."""
    pg_url, tmp_path = s3_study
    bucket = s3_env["KDSEARCH_TEST_BUCKET"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDSEARCH_STORAGE": pg_url}
    env["KDSEARCH_ARTIFACTS"] = f"s3://{bucket}/team"
    command = [sys.executable, "-m", "kdsearch", "worker", "--study", "s3", "--threads", "1"]
    workers = [
        subprocess.Popen(
            [*command, "--cache-dir", str(tmp_path / f"machine{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)
    assert sum("preparing study assets" in log for log in logs) == 1, logs
    assert sum("fetching study assets from S3" in log for log in logs) == 1, logs
    (assets,) = {p.name for p in (tmp_path / "machine0").iterdir() if p.is_dir()}
    local = [_folder_bytes(tmp_path / f"machine{i}" / assets) for i in range(2)]
    assert local[0] == local[1] and "assets.safetensors" in local[0]

    study = optuna.load_study(study_name="s3", storage=pg_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(key.startswith("team/") for key in _keys(bucket))
    store = open_artifact_store(resolve_artifacts(f"s3://{bucket}/team"))
    teacher_bytes = set()
    for trial in study.trials:
        files = {}
        for name in ("teacher_train.csv", "student_train.csv"):
            files[name] = tmp_path / f"t{trial.number}-{name}"
            download_artifact(
                artifact_store=store,
                artifact_id=trial.user_attrs["artifacts"][name],
                file_path=str(files[name]),
            )
        teacher_bytes.add(files["teacher_train.csv"].read_bytes())
        teacher = read_predictions(files["teacher_train.csv"])
        student = read_predictions(files["student_train.csv"])
        stats = confidence_stats(teacher.probs, student.probs, teacher.labels)
        assert stats.sigma == pytest.approx(trial.values[0], abs=1e-12)
    assert len(teacher_bytes) == 1

    # The dashboard reads the same bucket.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "kdsearch", "dashboard", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    trial = study.trials[0]
    artifact_id = trial.user_attrs["artifacts"]["student_train.csv"]
    url = f"http://127.0.0.1:{port}/artifacts/{study._study_id}/{trial._trial_id}/{artifact_id}"
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    served = response.read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"the dashboard did not serve {url}")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    assert served == (tmp_path / "t0-student_train.csv").read_bytes()

    # A third machine exports a student: it fetches the assets and reproduces the trial.
    export = ("export", "--study", "s3", "--trial", "1", "--out", str(tmp_path / "student"))
    result = _kdsearch(*export, "--cache-dir", str(tmp_path / "machine2"), env=env)
    assert result.returncode == 0, result.stderr
    assert "fetching study assets from S3" in result.stderr
    card = json.loads((tmp_path / "student" / "kdsearch_card.json").read_text())
    assert card["reproduced_within_tolerance"] and card["trial"] == 1
