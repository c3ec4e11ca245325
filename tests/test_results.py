"""What users see: trial artifacts and the study note, `kdsearch report`, `kdsearch export`,
progress output. One small study, run once by a real worker on PostgreSQL."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna_dashboard import get_note
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdsearch.service.loading import load_spec
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach, load_stored_spec
from kdsearch.service.summary import summarize_study
from kdsearch.workers.predictions import read_predictions
from kdsearch.workers.progress import Progress
from kdsearch.workers.worker import Worker, WorkerOptions
from tests.helpers import ROOT, assert_clean_failure, kdsearch, tiny_spec_text, write_spec

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, postgres_server_url, tiny_bert_dir) -> dict:
    """A 3-trial study; thresholds loose enough that some trial is feasible."""
    import sqlalchemy

    tmp = tmp_path_factory.mktemp("results")
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text('DROP DATABASE IF EXISTS "kdsearch_results"'))
        conn.execute(sqlalchemy.text('CREATE DATABASE "kdsearch_results"'))
    admin.dispose()
    url = sqlalchemy.engine.make_url(postgres_server_url).set(database="kdsearch_results")
    url = url.render_as_string(hide_password=False)
    data = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    text = tiny_spec_text("results", tiny_bert_dir, data).replace(
        "n_trials: 3", "n_trials: 3\nthresholds: {sigma_max: 0.5, accuracy_drop_max: 0.5}"
    )
    spec = load_spec(write_spec(tmp / "r.yaml", text))
    create_or_attach(open_storage(url), spec)
    assert Worker(WorkerOptions(url, "results", str(tmp / "artifacts"), threads=1)).run() == 0
    return {"url": url, "artifacts": tmp / "artifacts", "tmp": tmp}


def test_every_trial_has_its_predictions_and_figures(finished: dict) -> None:
    study = optuna.load_study(study_name="results", storage=finished["url"])
    store = FileSystemArtifactStore(str(finished["artifacts"] / "optuna"))
    teacher = {"teacher_train.csv", "teacher_dev.csv"}
    teacher_ids = {m.filename: m.artifact_id for m in get_all_artifact_meta(study)}
    assert set(teacher_ids) == teacher
    for trial in study.trials:
        ids = trial.user_attrs["artifacts"]
        assert set(ids) == {
            "student_train.csv", "student_dev.csv", "teacher_train.csv", "teacher_dev.csv",
            "confidence_delta_histogram.png", "confidence_scatter.png", "reliability_diagram.png",
            "probe_curve.png",
        }  # fmt: skip
        # The teacher's files are study artifacts, uploaded once; the rest are the trial's.
        metas = get_all_artifact_meta(trial, storage=study._storage)
        assert {m.filename for m in metas} == set(ids) - teacher
        assert {k: ids[k] for k in teacher} == teacher_ids
        for name in (
            "confidence_delta_histogram.png",
            "reliability_diagram.png",
            "probe_curve.png",
        ):
            path = finished["tmp"] / f"{trial.number}-{name}"
            download_artifact(artifact_store=store, artifact_id=ids[name], file_path=str(path))
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_study_note_names_the_answer_and_the_baseline(finished: dict) -> None:
    study = optuna.load_study(study_name="results", storage=finished["url"])
    note = get_note(study)
    baseline = study.trials[0]
    assert note.startswith("# results")
    assert f"**baseline** (the paper's defaults): sigma {baseline.values[0]:.4f}" in note
    summary = summarize_study(study, load_stored_spec(open_storage(finished["url"]), "results"))
    assert summary.answer is not None
    assert f"**answer**: `{summary.answer.config}` (best candidate, not confirmed)" in note
    assert "trials: 3 complete, 0 pruned, 0 failed, 0 running" in note  # after the last
    assert "Optuna's *Best Trials* is the trial-level Pareto front" in note


def test_report_table_and_files(finished: dict) -> None:
    out = finished["tmp"] / "report"
    result = kdsearch(
        "report", "--study", "results", "--format", "json", "--out", str(out),
        "--storage", finished["url"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    study = optuna.load_study(study_name="results", storage=finished["url"])
    assert row["baseline"]["sigma_mean"] == study.trials[0].values[0]  # numbers, not text
    feasible = [t for t in study.trials if t.values[0] <= 0.5 and t.values[1] <= 0.5]
    best = min(feasible, key=lambda t: t.values)
    assert (row["answer_trial"], row["answer_sigma"]) == (best.number, best.values[0])
    assert row["answer_confirmed"] is False  # one seed each: a candidate, not confirmed
    assert row["n_complete"] == 3 and row["n_failed"] == 0
    assert row["n_configurations"] == 3 and row["n_feasible_configurations"] == len(feasible)
    assert row["cpu_hours"] > 0 and row["gpu_hours"] == 0
    assert (out / "report.json").is_file()
    assert (out / "results-pareto.png").read_bytes()[:8] == PNG
    md = kdsearch("report", "--study", "results", "--storage", finished["url"]).stdout
    header = md.splitlines()[0]
    assert header.startswith("| study | task | student | teacher dev acc | baseline sigma_train |")
    assert header.count("seeds") == 2 and "baseline seeds" in header and "answer seeds" in header
    csv_text = kdsearch(
        "report", "--study", "results", "--format", "csv", "--storage", finished["url"]
    ).stdout
    import csv as csv_module

    (csv_row,) = list(csv_module.DictReader(io.StringIO(csv_text)))
    assert csv_row["answer_config"] == row["answer"]["config"]
    unknown = kdsearch(
        "report", "--study", "results", "--study", "nope", "--storage", finished["url"]
    )
    assert_clean_failure(unknown, "study 'nope' does not exist")


def test_export_best_student_loads_and_reproduces(finished: dict) -> None:
    out = finished["tmp"] / "student"
    result = kdsearch(
        "export", "--study", "results", "--out", str(out), "--storage", finished["url"],
        "--artifacts", str(finished["artifacts"]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "kdsearch_card.json").read_text())
    study = optuna.load_study(study_name="results", storage=finished["url"])
    trial = study.trials[card["trial"]]
    assert card["recorded"]["sigma"] == trial.values[0]
    # The worker ran with 1 thread, the export with all cores: float sums may round
    # differently, nothing more.
    assert card["reproduced"]["sigma"] == pytest.approx(trial.values[0], abs=1e-6)
    assert card["reproduced_within_tolerance"] is True
    # A plain Hugging Face folder that predicts what the trial recorded.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}  # GLUE SST-2's names
    tokenizer = AutoTokenizer.from_pretrained(out)
    store = FileSystemArtifactStore(str(finished["artifacts"] / "optuna"))
    dev_csv = finished["tmp"] / "exported-dev.csv"
    download_artifact(
        artifact_store=store, artifact_id=trial.user_attrs["artifacts"]["student_dev.csv"],
        file_path=str(dev_csv),
    )  # fmt: skip
    first_dev = (Path(__file__).parent / "fixtures/glue/SST-2/dev.tsv").read_text().splitlines()[1]
    with torch.inference_mode():
        enc = tokenizer(
            first_dev.split("\t")[0].strip(), truncation=True, max_length=32, return_tensors="pt"
        )
        probs = torch.softmax(model(**enc).logits, -1).numpy()[0]
    np.testing.assert_allclose(probs, read_predictions(dev_csv).probs[0], atol=1e-5)
    again = kdsearch(
        "export", "--study", "results", "--out", str(out), "--storage", finished["url"]
    )
    assert_clean_failure(again, "is not empty")
    missing = kdsearch(
        "export", "--study", "results", "--trial", "99", "--out", str(finished["tmp"] / "x"),
        "--storage", finished["url"],
    )  # fmt: skip
    assert_clean_failure(missing, "trial 99 of 'results' does not exist")


def test_progress_logs_about_ten_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kdsearch.workers.progress")
    progress = Progress(100, "distillation", stream=io.StringIO())  # not a terminal
    for step in range(100):
        due = progress.due()
        progress.advance(step // 50 + 1, 2, 0.5 if due else None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[-1].startswith("progress label=distillation step=100/100 epoch=2/2 loss=0.500000")
    assert "eta_s=0.0" in lines[-1]


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1400,1100",
]  # fmt: skip
SCREENSHOTS = ROOT / "test-output"


def _page_text(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page as Chromium renders it (after the dashboard's JavaScript ran), as text."""
    args = [CHROMIUM or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    dom = subprocess.run(
        [*args, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _dashboard(url: str, cwd: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``kdsearch dashboard`` started in ``cwd`` (no KDSEARCH_* settings), once it serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDSEARCH_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "kdsearch", "dashboard", "--port", str(port), "--storage", url,
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(f"{base}/api/studies", timeout=2).close()
            return server, base
        except OSError:
            time.sleep(0.2)
    server.kill()
    pytest.fail(f"the dashboard did not start: {server.communicate()[0]}")


def _stop(server: subprocess.Popen) -> str:
    server.terminate()
    return server.communicate(timeout=10)[0]


def test_the_dashboard_marks_the_answer_report_names(finished: dict) -> None:
    """The dashboard's trials carry ``kdsearch:answer`` exactly on the answer's seeds, in
    a listing and in a single trial, and the mark is never stored."""
    from kdsearch.service.dashboard import DashboardStorage
    from kdsearch.service.record import TrialAttr

    storage = open_storage(finished["url"])
    study = optuna.load_study(study_name="results", storage=storage)
    summary = summarize_study(study, load_stored_spec(storage, "results"))
    assert summary.answer is not None
    shown = open_storage(finished["url"], create=False, kind=DashboardStorage)
    marked = {
        t.number: t.user_attrs[TrialAttr.ANSWER]
        for t in shown.get_all_trials(study._study_id)
        if TrialAttr.ANSWER in t.user_attrs
    }
    assert marked == dict.fromkeys(summary.answer.trials, "best candidate (not confirmed)")
    one = shown.get_trial(study.trials[summary.answer.trials[0]]._trial_id)
    assert one.user_attrs[TrialAttr.ANSWER] == "best candidate (not confirmed)"
    fresh = open_storage(finished["url"], create=False, kind=DashboardStorage)  # no listing yet
    other = next(t for t in study.trials if t.number not in summary.answer.trials)
    assert TrialAttr.ANSWER not in fresh.get_trial(other._trial_id).user_attrs
    assert TrialAttr.ANSWER in fresh.get_trial(one._trial_id).user_attrs
    # never written: Optuna's own reads do not see it
    assert all(TrialAttr.ANSWER not in t.user_attrs for t in study.get_trials())


def test_dashboard_started_elsewhere_warns_about_unreadable_artifacts(
    finished: dict, tmp_path: Path
) -> None:
    server, base = _dashboard(finished["url"], tmp_path, "--artifacts", str(tmp_path / "gone"))
    try:
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
            assert len(json.loads(r.read())["study_summaries"]) == 1  # it serves the studies
    finally:
        log = _stop(server)
    assert f"artifact folder {tmp_path / 'gone'} does not exist" in log, log


def _set_keyed_constraint(url: str, trial_number: int, value: float) -> float:
    """Set trial ``trial_number``'s ``constraints:sigma`` (finished trials take no writes
    through Optuna); returns the value it had."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    select = (
        "SELECT a.value_json FROM trial_system_attributes a JOIN trials t ON t.trial_id = "
        "a.trial_id WHERE t.number = :n AND a.key = 'constraints:sigma'"
    )
    update = (
        "UPDATE trial_system_attributes SET value_json = :v FROM trials t WHERE t.trial_id = "
        "trial_system_attributes.trial_id AND t.number = :n AND "
        "trial_system_attributes.key = 'constraints:sigma'"
    )
    with engine.begin() as conn:
        old = json.loads(conn.execute(sqlalchemy.text(select), {"n": trial_number}).scalar_one())
        conn.execute(sqlalchemy.text(update), {"n": trial_number, "v": json.dumps(value)})
    engine.dispose()
    return old


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_dashboard_in_a_real_browser(finished: dict, tmp_path: Path) -> None:
    # Started from another folder, without --artifacts: the study's recorded location.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # One trial made infeasible through its keyed (Optuna 5) constraint: the dashboard,
    # which reads the list format, must still mark it.
    old = _set_keyed_constraint(finished["url"], 2, 0.25)
    server, base = _dashboard(finished["url"], elsewhere)
    try:
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
            (summary,) = json.loads(r.read())["study_summaries"]
        study_id = summary["study_id"]
        # Through the dashboard's API: metric names, constraints, artifacts.
        with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=10) as r:
            detail = json.loads(r.read())
        assert detail["objective_names"] == ["sigma", "accuracy_drop"]
        for trial in detail["trials"]:
            # kdsearch records them through the trial (constraints:sigma, ...); the
            # dashboard reads them in the list it knows
            assert len(trial["constraints"]) == 2
            names = {a["filename"] for a in trial["artifacts"]}
            assert {"confidence_delta_histogram.png", "student_train.csv"} <= names
        assert detail["trials"][2]["constraints"][0] == pytest.approx(0.25)
        assert detail["note"]["body"].startswith("# results")

        # Through the page, rendered by Chromium.
        SCREENSHOTS.mkdir(exist_ok=True)
        shot = SCREENSHOTS / "dashboard-study.png"
        text = _page_text(f"{base}/dashboard/studies/{study_id}", tmp_path / "p1", shot)
        for expected in ("Pareto Front", "Objective X: sigma", "Objective Y: accuracy_drop"):
            assert expected in text, text[:2000]
        # the timeline's legend: complete trials, and the one marked infeasible
        assert "Complete Infeasible" in text, text[:3000]
        assert shot.read_bytes()[:8] == PNG
        trial_page = _page_text(
            f"{base}/dashboard/studies/{study_id}/trials?numbers=0", tmp_path / "p2"
        )
        for expected in ("Artifacts", "confidence_delta_histogram.png", "reliability_diagram.png"):
            assert expected in trial_page, trial_page[:2000]
        assert "probe_history" in trial_page  # per-epoch metrics, as a user attr

        # A trial's figure, served byte for byte from the artifacts the study recorded...
        trial = detail["trials"][0]
        (meta,) = [a for a in trial["artifacts"] if a["filename"] == "reliability_diagram.png"]
        url = f"{base}/artifacts/{study_id}/{trial['trial_id']}/{meta['artifact_id']}"
        with urllib.request.urlopen(url, timeout=10) as r:
            served = r.read()
        stored = finished["artifacts"] / "optuna" / meta["artifact_id"]
        assert served == stored.read_bytes() and served[:8] == PNG
        # ...and decoded by the browser as an image (naturalWidth > 0), not its alt text.
        probe = tmp_path / "image.html"
        probe.write_text(
            f'<html><body><img src="{url}" alt="missing" '
            "onload=\"document.body.setAttribute('data-width', this.naturalWidth)\" "
            "onerror=\"document.body.setAttribute('data-width', 'error')\"></body></html>"
        )
        args = [CHROMIUM or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p3'}"]
        dom = subprocess.run(
            [*args, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
        ).stdout
        width = re.search(r'data-width="([^"]+)"', dom)
        assert width is not None and width.group(1) == "500", dom  # 5 in x 100 dpi
    finally:
        _stop(server)
        _set_keyed_constraint(finished["url"], 2, old)
