"""The SLURM recipe: a valid sbatch array script that runs a real worker with the storage
and the study passed through the environment, never on its command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.helpers import ROOT, kdsearch, tiny_spec_text, write_spec

SCRIPT = ROOT / "deploy" / "slurm" / "kdsearch-workers.sbatch"


def _run_script(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """The script as a compute node runs it: bash, with SLURM's variables set."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KDSEARCH_")}
    # the venv's kdsearch on PATH, as KDSEARCH_VENV or a module load would give it
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    base.update({"SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "1234", **env})
    return subprocess.run(
        ["bash", str(SCRIPT)], env=base, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_script_is_valid_bash_with_sbatch_directives() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    directives = re.findall(r"^#SBATCH (--[a-z-]+)(?:=(\S+))?$", text, flags=re.M)
    options = {name: value for name, value in directives}
    assert options["--array"] == "0-7" and options["--gres"] == "gpu:1"
    # SIGTERM to the batch shell two minutes before the limit: exec hands it to the worker
    assert options["--signal"] == "B:TERM@120" and "\nexec kdsearch worker " in text
    # every #SBATCH line sits before the first command (sbatch stops reading there)
    first_command = text.index("\nset -euo pipefail")
    assert all(m.start() < first_command for m in re.finditer(r"^#SBATCH", text, flags=re.M))
    # no secret, no storage URL in the file: they come from the environment
    assert "postgresql+psycopg2://kdsearch:$POSTGRES_PASSWORD" in text  # the usage example
    assert not re.search(r"(?i)password\s*=", text)


def test_the_script_runs_a_worker_from_the_environment(tmp_path: Path, tiny_bert_dir: Path) -> None:
    data = ROOT / "tests" / "fixtures" / "glue" / "SST-2"
    spec = write_spec(tmp_path / "s.yaml", tiny_spec_text("slurm", tiny_bert_dir, data, 1))
    storage = f"sqlite:///{tmp_path / 'k.db'}"
    assert kdsearch("study", "create", str(spec), "--storage", storage).returncode == 0
    env = {
        "KDSEARCH_STORAGE": storage,
        "KDSEARCH_STUDY": "slurm",
        "KDSEARCH_ARTIFACTS": str(tmp_path / "art"),
        "KDSEARCH_DEVICE": "cpu",  # this machine has no GPU
        "KDSEARCH_WORKER_ARGS": "--threads 1 --max-trials 1",
    }
    out = _run_script(env, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kdsearch worker: study slurm, array task 3" in out.stdout
    (trial,) = optuna.load_study(study_name="slurm", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert Path(tmp_path / "art").is_dir()  # KDSEARCH_ARTIFACTS reached the worker
    # a later array task finds the budget spent and exits 0 at once
    again = _run_script(env, tmp_path)
    assert again.returncode == 0 and "done, 1 of its budget of 1 trials used" in again.stderr


@pytest.mark.parametrize("missing", ["KDSEARCH_STORAGE", "KDSEARCH_STUDY"])
def test_the_script_refuses_to_start_without_storage_or_study(tmp_path: Path, missing: str) -> None:
    env = {"KDSEARCH_STORAGE": "sqlite:///x.db", "KDSEARCH_STUDY": "s"}
    del env[missing]
    out = _run_script(env, tmp_path)
    assert out.returncode != 0
    assert f"{missing}: export {missing}" in out.stderr
    assert not (tmp_path / "x.db").exists()
