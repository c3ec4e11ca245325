"""The Kubernetes manifests (``deploy/kubernetes``): they render with kustomize, validate
against a pinned Kubernetes schema, hold no secret, and run the commands the CLI has:
the workers' Indexed Job requests one GPU per pod, reads the study and the storage from
the environment, and gives the worker's graceful stop its time."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, kdsearch

KUBERNETES = ROOT / "deploy" / "kubernetes"
# backoffLimitPerIndex and podFailurePolicy FailIndex: beta since 1.29, on by default
SCHEMA_VERSION = "1.30.0"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(folder: Path) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("overlay", [".", "external-db"])
def test_the_manifests_render_and_validate(overlay: str) -> None:
    import kubernetes_validate

    docs = render(KUBERNETES / overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)
    kinds = {kind for kind, _ in by_kind(docs)}
    assert {"Job", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert ("StatefulSet" in kinds) == (overlay == ".")  # the external database: no postgres
    if overlay == "external-db":
        (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
        assert config["data"]["POSTGRES_HOST"] == "db.example.internal"


def test_the_workers_job_runs_one_worker_per_gpu() -> None:
    docs = by_kind(render(KUBERNETES))
    job = docs[("Job", "kdsearch-workers")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 90  # a storage call's minute, then exit
    assert pod["securityContext"]["runAsNonRoot"] is True
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][:3] == ["worker", "--study", "$(STUDY_NAME)"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kdsearch-db",
        "key": "password",
    }
    assert env["KDSEARCH_STORAGE"]["value"].startswith("postgresql+psycopg2://$(POSTGRES_USER)@")
    config_name = worker["envFrom"][0]["configMapRef"]["name"]
    config = docs[("ConfigMap", config_name)]  # the generated name, hash included
    assert {"STUDY_NAME", "POSTGRES_HOST", "KDSEARCH_ARTIFACTS"} <= config["data"].keys()
    # the exit codes the failure policy names are the CLI's (service/errors.py)
    codes = spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]
    assert codes == [1, 2]
    # workers wait for the study Job's study; the study Job creates it from STUDY_FILE
    (wait,) = pod["initContainers"]
    assert "kdsearch status --study" in wait["command"][-1]
    study = docs[("Job", "kdsearch-study")]["spec"]["template"]["spec"]["containers"][0]
    assert study["args"] == ["study", "create", "$(STUDY_FILE)"]
    assert (ROOT / config["data"]["STUDY_FILE"]).is_file()  # in the image (COPY studies)


def test_every_flag_the_manifests_pass_exists() -> None:
    docs = render(KUBERNETES)
    commands = {}
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            if container["image"].startswith("kdsearch"):
                commands[container["args"][0]] = [
                    a for a in container["args"] if a.startswith("--")
                ]
    assert set(commands) == {"worker", "study", "dashboard"}
    for command, flags in commands.items():
        words = ["study", "create"] if command == "study" else [command]
        help_text = kdsearch(*words, "--help").stdout
        for flag in flags:
            assert flag in help_text, (command, flag)


def test_no_secret_is_written_in_the_manifests() -> None:
    for path in KUBERNETES.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?\w{6,}", text), path
