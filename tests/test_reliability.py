"""Never lose a trial: real worker processes on real PostgreSQL, killed, stopped, cut off.

Three workers finish exactly the budget, each queued trial once; kill -9 mid-trial: the
trial is failed as stale and its re-run completes; a PostgreSQL restart under two workers
loses nothing; SIGTERM leaves no RUNNING trial and exits 0; resume; a pruned trial keeps
its probes, an infeasible finished trial is marked; a raising trial is retried.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.errors import FailureStreak
from kdsearch.service.loading import load_spec
from kdsearch.service.record import FailureKind, StudyAttr, SystemAttr, TrialAttr, TrialRecord
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach
from kdsearch.workers.worker import Worker, WorkerOptions
from tests.helpers import (
    KDSEARCH,
    PrivatePostgres,
    finish,
    kdsearch,
    start_worker,
    stored_trials,
    tiny_spec_text,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.slow


def make_study(
    url: str,
    tmp_path: Path,
    tiny_bert_dir: Path,
    fixture_glue: Path,
    name: str,
    n_trials: str = "3",
    grace: str = "4",
    pruning: str = "none",
    **edits: str,
) -> StudySpec:
    """The tiny study, with ``old=new`` text edits applied to its YAML."""
    data = fixture_glue / "SST-2"
    text = tiny_spec_text(
        name, tiny_bert_dir, data, int(n_trials), pruning=pruning, grace=int(grace)
    )
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    spec = load_spec(write_spec(tmp_path / f"{name}.yaml", text))
    create_or_attach(open_storage(url), spec)
    return spec


def epochs(default: int, low: int, high: int) -> dict[str, str]:
    """YAML edits: the baseline's epochs and the searched epoch range."""
    return {
        "epochs: 1\nn_trials": f"epochs: {default}\nn_trials",
        "epochs: {type: int, low: 1, high: 2}": f"epochs: {{type: int, low: {low}, high: {high}}}",
    }


# A slow baseline (many epochs on the tiny model) so there is time to kill it mid-trial.
SLOW = epochs(30, 1, 30)


def trials(url: str, name: str) -> list[FrozenTrial]:
    return stored_trials(url, name)


def training(url: str, name: str, number: int = 0) -> bool:
    """Trial ``number`` is RUNNING and has finished at least one epoch."""
    ts = trials(url, name)
    return (
        len(ts) > number
        and ts[number].state == TrialState.RUNNING
        and bool(ts[number].user_attrs.get(TrialAttr.PROBES))
    )


def worker_in_first_trial(
    url: str, tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path, name: str, n_trials: str
) -> subprocess.Popen:
    """A worker on a new study of slow trials, returned once its first trial trains."""
    make_study(url, tmp_path, tiny_bert_dir, fixture_glue, name, n_trials=n_trials, **SLOW)
    worker = start_worker(url, name, tmp_path / "art")
    wait_for(lambda: training(url, name), what="trial 0 to train")
    return worker


def test_three_workers_run_exactly_the_budget(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "three", n_trials="6")
    study = optuna.load_study(study_name="three", storage=pg_url)
    queued = [{"learning_rate": lr, "batch_size": 16, "epochs": 1} for lr in (2e-3, 3e-3)]
    for params in queued:
        study.enqueue_trial(params)
    workers = [start_worker(pg_url, "three", tmp_path / "art") for _ in range(3)]
    finish(workers)
    done = trials(pg_url, "three")
    assert [t.state for t in done] == [TrialState.COMPLETE] * 6
    runs = [t.params for t in done]
    for params in [*queued, {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1}]:
        assert runs.count(params) == 1, (params, runs)
    assert len({t.user_attrs["worker_pid"] for t in done}) >= 2  # the work was shared


def test_kill_9_mid_trial_is_retried_with_the_same_hyperparameters(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    victim = worker_in_first_trial(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "killed", "2")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert trials(pg_url, "killed")[0].state == TrialState.RUNNING  # nobody told the study
    # Past the 4 s grace period the trial is stale for sure, so the rescuer's first claim
    # re-queues it (before that, it would rightly sample a new trial first).
    time.sleep(5)
    rescuer = start_worker(pg_url, "killed", tmp_path / "art")
    finish([rescuer])
    ts = trials(pg_url, "killed")
    assert ts[0].state == TrialState.FAIL
    retry = ts[1]
    assert retry.user_attrs[TrialAttr.RETRY_REASON] == "worker died (heartbeat stale)"
    assert retry.state == TrialState.COMPLETE and retry.params == ts[0].params
    assert (retry.user_attrs[TrialAttr.RETRY_OF], retry.user_attrs[TrialAttr.ATTEMPT]) == (0, 1)
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2  # the budget, exactly
    assert len(ts) == 3


def test_postgres_restart_loses_nothing(tmp_path, tiny_bert_dir, fixture_glue) -> None:
    server = PrivatePostgres()
    try:
        url = server.url
        edits = epochs(12, 10, 12)
        make_study(
            url, tmp_path, tiny_bert_dir, fixture_glue, "restart", n_trials="4", grace="20", **edits
        )
        workers = [start_worker(url, "restart", tmp_path / "art") for _ in range(2)]
        wait_for(
            lambda: training(url, "restart", 0) and training(url, "restart", 1), what="2 trials"
        )
        server.stop()
        time.sleep(4)  # both workers hit the dead database meanwhile
        server.start()
        logs = finish(workers)
        assert any("storage unreachable" in log or "heartbeat failed" in log for log in logs), logs
        ts = trials(url, "restart")
        assert sum(t.state == TrialState.COMPLETE for t in ts) == 4
        assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in ts)
        # any trial failed by the outage was re-run with the same hyperparameters
        for failed in (t for t in ts if t.state == TrialState.FAIL):
            assert any(t.user_attrs.get(TrialAttr.RETRY_OF) == failed.number for t in ts)
    finally:
        server.destroy()


def test_sigterm_requeues_and_a_new_worker_resumes(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    worker = worker_in_first_trial(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "stopped", "3")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert time.monotonic() - sent < 10
    ts = trials(pg_url, "stopped")
    assert TrialState.RUNNING not in [t.state for t in ts]
    assert ts[0].state == TrialState.FAIL and "stopped" in ts[0].user_attrs["error"]
    assert ts[1].state == TrialState.WAITING
    assert ts[1].system_attrs[SystemAttr.FIXED_PARAMS] == ts[0].params
    assert ts[1].user_attrs[TrialAttr.ATTEMPT] == 0  # a stop does not use up a retry

    # resume: a new worker continues the stopped study to its global budget
    finish([start_worker(pg_url, "stopped", tmp_path / "art")])
    ts = trials(pg_url, "stopped")
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and ts[1].state == TrialState.COMPLETE
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # nothing repeated
    # a finished study: one more worker finds nothing to do
    finish([start_worker(pg_url, "stopped", tmp_path / "art")])
    assert len(trials(pg_url, "stopped")) == len(ts)


@pytest.mark.parametrize(
    ("probe_every_steps", "probed_at"),
    [
        ("null", [1, 2]),  # after each epoch: stopped after epoch 2
        # 160 rows in batches of 32: 5 steps per epoch; probes at steps 4, 5 (epoch end)
        # and 8, where it is stopped, 3/5 into epoch 2
        ("4", [0.8, 1.0, 1.6]),
    ],
)
def test_pruned_trial_keeps_its_probes_and_infeasible_trials_are_marked(
    tmp_path, storage_url, tiny_bert_dir, fixture_glue, probe_every_steps, probed_at
) -> None:
    edits = {
        **epochs(1, 1, 3),
        "probe_size: 64}": "probe_size: 64, sigma_tolerance: 0, accuracy_drop_tolerance: 0, "
        f"probe_every_steps: {probe_every_steps}}}",
        "n_trials: 2": "n_trials: 2\nthresholds: {sigma_max: 1.0e-9, accuracy_drop_max: 0}",
    }
    make_study(
        storage_url,
        tmp_path,
        tiny_bert_dir,
        fixture_glue,
        "pruned",
        "2",
        pruning="threshold",
        **edits,
    )
    optuna.load_study(study_name="pruned", storage=storage_url).enqueue_trial(
        {"learning_rate": 1e-3, "batch_size": 32, "epochs": 3}
    )
    options = WorkerOptions(storage_url, "pruned", str(tmp_path / "art"), threads=1)
    assert Worker(options).run() == 0
    # The baseline (every other trial's point of comparison) is never pruned, even over
    # the thresholds; the queued trial is.
    finished, pruned = trials(storage_url, "pruned")
    assert finished.user_attrs[TrialAttr.ROLE] == "baseline"
    assert pruned.state == TrialState.PRUNED and pruned.values is None
    assert pruned.user_attrs["pruned_by"] == "threshold"
    assert [p["epoch"] for p in pruned.user_attrs[TrialAttr.PROBES]] == pytest.approx(probed_at)
    assert TrialRecord.of(pruned).feasible is False  # judged by its last probe
    assert finished.state == TrialState.COMPLETE and TrialRecord.of(finished).feasible is False
    assert finished.constraints["sigma"] == pytest.approx(finished.values[0] - 1e-9)
    # 1 epoch in batches of 32: 5 steps; with probes every 4 steps: 0.8, then 1.0
    finished_at = [1] if probe_every_steps == "null" else [0.8, 1.0]
    assert [p["epoch"] for p in finished.user_attrs[TrialAttr.PROBES]] == pytest.approx(finished_at)
    assert optuna.load_study(study_name="pruned", storage=storage_url).best_trials == []


def test_raising_trial_is_retried_then_failed_and_the_worker_goes_on(
    tmp_path, storage_url, tiny_bert_dir, fixture_glue
) -> None:
    edits = {"max_retries: 2": "max_retries: 1"}
    make_study(storage_url, tmp_path, tiny_bert_dir, fixture_glue, "raises", "2", **edits)
    # An enqueued value outside the schema: the trial's code raises (a data error).
    broken = {"learning_rate": 5.0, "batch_size": 16, "epochs": 1}
    optuna.load_study(study_name="raises", storage=storage_url).enqueue_trial(broken)
    options = WorkerOptions(storage_url, "raises", str(tmp_path / "art"), threads=1)
    assert Worker(options).run() == 0
    ts = trials(storage_url, "raises")
    states = [t.state for t in ts]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    first, retry = ts[1], ts[2]
    assert first.user_attrs["error"].startswith("ValidationError: 1 validation error")
    assert "learning_rate" in first.user_attrs["error"]
    assert retry.params == first.params and retry.user_attrs[TrialAttr.RETRY_OF] == 1
    assert retry.user_attrs[TrialAttr.ATTEMPT] == 1  # max_retries reached: not re-queued again
    assert retry.user_attrs["error"] == first.user_attrs["error"]


def paused_at(point: str, tmp_path: Path, seconds: int = 120) -> dict[str, str]:
    """Environment that pauses a worker at fault point ``point`` (service/faults.py)."""
    return {
        "KDSEARCH_FAULT": f"{point}:pause={seconds}",
        "KDSEARCH_FAULT_REACHED": str(tmp_path / f"reached-{point}"),
    }


def reached(tmp_path: Path, point: str) -> bool:
    return (tmp_path / f"reached-{point}").exists()


@pytest.mark.parametrize("point", ["in-claim", "after-claim"])
def test_a_worker_killed_during_or_right_after_its_claim_loses_nothing(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue, point
) -> None:
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "claimkill", n_trials="2")
    victim = start_worker(pg_url, "claimkill", tmp_path / "art", **paused_at(point, tmp_path))
    wait_for(lambda: reached(tmp_path, point), what=f"the worker to reach {point}")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (claimed,) = trials(pg_url, "claimkill")
    if point == "in-claim":
        # Killed inside the claim's transaction: the server rolled it back, the baseline
        # is queued as if nobody had touched it.
        assert claimed.state == TrialState.WAITING
        finish([start_worker(pg_url, "claimkill", tmp_path / "art")])
        ts = trials(pg_url, "claimkill")
        assert [t.state for t in ts] == [TrialState.COMPLETE] * 2
        return
    assert claimed.state == TrialState.RUNNING  # the baseline, held by a dead worker
    # Another worker fails it as stale (no heartbeat at all, or one that stopped), re-runs
    # it with the same hyperparameters and finishes exactly the budget.
    finish([start_worker(pg_url, "claimkill", tmp_path / "art")])
    ts = trials(pg_url, "claimkill")
    assert ts[0].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2
    assert TrialState.RUNNING not in [t.state for t in ts]
    rerun = next(t for t in ts if t.user_attrs.get(TrialAttr.RETRY_OF) == 0)
    assert rerun.state == TrialState.COMPLETE
    assert rerun.params == ts[0].system_attrs[SystemAttr.FIXED_PARAMS]
    assert rerun.user_attrs[TrialAttr.RETRY_REASON] == "worker died (heartbeat stale)"
    assert rerun.user_attrs[TrialAttr.ROLE] == "baseline"  # still the baseline


def test_a_database_outage_during_the_claim_leaves_no_orphan(
    tmp_path, tiny_bert_dir, fixture_glue
) -> None:
    server = PrivatePostgres()
    try:
        url = server.url
        make_study(url, tmp_path, tiny_bert_dir, fixture_glue, "claimcut", n_trials="2")
        worker = start_worker(
            url, "claimcut", tmp_path / "art", **paused_at("after-claim", tmp_path, 3)
        )
        wait_for(lambda: reached(tmp_path, "after-claim"), what="the worker to reach after-claim")
        server.stop()  # the sampling, right after the pause, meets no database
        time.sleep(6)
        server.start()
        logs = finish([worker])
        assert "storage unreachable while claiming a trial" in logs[0], logs[0]
        ts = trials(url, "claimcut")
        assert TrialState.RUNNING not in [t.state for t in ts]
        assert ts[0].state == TrialState.FAIL
        assert ts[0].user_attrs[TrialAttr.FAILURE] == FailureKind.CLAIM
        rerun = next(t for t in ts if t.user_attrs.get(TrialAttr.RETRY_OF) == 0)
        assert rerun.state == TrialState.COMPLETE and rerun.user_attrs[TrialAttr.ATTEMPT] == 0
        assert sum(t.state == TrialState.COMPLETE for t in ts) == 2
    finally:
        server.destroy()


def test_sigterm_during_start_up_exits_0(tmp_path, pg_url, tiny_bert_dir, fixture_glue) -> None:
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "early", n_trials="1")
    for delay in (0.3, 1.5):  # while importing; while connecting or building assets
        worker = start_worker(pg_url, "early", tmp_path / "art")
        time.sleep(delay)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, worker.communicate()[0]
    assert [t.state for t in trials(pg_url, "early")] == [TrialState.WAITING]
    leftovers = list((tmp_path / "art").rglob("*.tmp-*")) if (tmp_path / "art").exists() else []
    assert leftovers == []


def test_an_unusable_artifact_store_stops_the_worker_without_charging_the_trial(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "infra", n_trials="2")
    art = tmp_path / "art"
    worker = start_worker(pg_url, "infra", art, **paused_at("before-record", tmp_path, 5))
    wait_for(lambda: reached(tmp_path, "before-record"), what="the trial to finish training")
    shutil.rmtree(art / "optuna")
    (art / "optuna").write_text("not a folder any more")  # as a disk gone read-only would
    assert worker.wait(timeout=60) == 4
    log = worker.communicate()[0]
    assert "kdsearch: error: cannot write to the artifact store" in log, log
    first, queued = trials(pg_url, "infra")
    assert first.state == TrialState.FAIL
    assert first.user_attrs[TrialAttr.FAILURE] == FailureKind.INFRASTRUCTURE
    assert queued.state == TrialState.WAITING and queued.user_attrs[TrialAttr.ATTEMPT] == 0


def test_trials_failing_in_a_row_halt_the_study_until_unhalted(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    edits = {"max_retries: 2}": "max_retries: 0, max_failures_in_a_row: 2}"}
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "halts", "3", **edits)
    study = optuna.load_study(study_name="halts", storage=pg_url)
    for lr in (5.0, 6.0):  # values the schema refuses: the trial's code raises
        study.enqueue_trial({"learning_rate": lr, "batch_size": 16, "epochs": 1})
    options = WorkerOptions(pg_url, "halts", str(tmp_path / "art"), threads=1)
    with pytest.raises(FailureStreak, match=r"2 trials in a row failed \(trials 1..2"):
        Worker(options).run()
    # Every other worker stops at once too (exit 1), and status says why.
    result = kdsearch("worker", "--study", "halts", "--storage", pg_url, "--threads", "1")
    assert result.returncode == 1 and "is halted: 2 trials in a row failed" in result.stderr
    status = kdsearch("status", "--study", "halts", "--storage", pg_url)
    assert "HALTED: 2 trials in a row failed" in status.stdout
    assert "kdsearch study unhalt halts" in status.stdout
    unhalted = kdsearch("study", "unhalt", "halts", "--storage", pg_url)
    assert unhalted.returncode == 0 and "unhalted" in unhalted.stderr
    assert Worker(options).run() == 0  # the failures before the unhalt no longer count
    states = [t.state for t in trials(pg_url, "halts")]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 2


def test_the_storage_timeout_is_not_doubled(tmp_path, tiny_bert_dir, fixture_glue) -> None:
    server = PrivatePostgres()
    try:
        url = server.url
        make_study(url, tmp_path, tiny_bert_dir, fixture_glue, "timeout", n_trials="1", **SLOW)
        worker = start_worker(url, "timeout", tmp_path / "art", "--storage-timeout", "6")
        wait_for(lambda: training(url, "timeout"), what="trial 0 to train")
        server.stop()
        stopped = time.monotonic()
        assert worker.wait(timeout=60) == 3
        # One timeout (6 s) from the next storage call (within an epoch), not two.
        assert time.monotonic() - stopped < 11, worker.communicate()[0]
        assert "the storage was unreachable for" in worker.communicate()[0]
    finally:
        server.destroy()


def no_traceback(logs: list[str]) -> None:
    for log in logs:
        assert "Traceback" not in log, log


def test_an_outage_longer_than_the_grace_fails_no_live_trial(
    tmp_path, tiny_bert_dir, fixture_glue
) -> None:
    # Two workers train while PostgreSQL is down for twice the grace period: their
    # heartbeats cannot reach it, so none of their trials may be failed as stale after
    # the restart; the workers wait, reconnect and finish exactly the budget.
    server = PrivatePostgres()
    try:
        url = server.url
        make_study(
            url, tmp_path, tiny_bert_dir, fixture_glue, "outage", n_trials="3", grace="8",
            **epochs(14, 12, 14),
        )  # fmt: skip
        workers = [start_worker(url, "outage", tmp_path / "art") for _ in range(2)]
        wait_for(lambda: training(url, "outage", 0) and training(url, "outage", 1), what="2 trials")
        server.stop()
        time.sleep(16)
        server.start()
        logs = finish(workers)
        no_traceback(logs)
        ts = trials(url, "outage")
        assert [t.state for t in ts] == [TrialState.COMPLETE] * 3  # no FAIL, no retry
        assert not any(t.user_attrs.get(TrialAttr.RETRY_OF) is not None for t in ts)
    finally:
        server.destroy()


def test_a_paused_worker_abandons_its_settled_trial_and_goes_on(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    # kill -STOP past the grace: the other worker rightly fails the silent trial as stale
    # and re-runs it. The paused worker, continued, abandons it with one log line (no
    # second report, no crash) and goes on claiming.
    make_study(
        pg_url, tmp_path, tiny_bert_dir, fixture_glue, "paused", n_trials="4", grace="6",
        **epochs(14, 1, 14),
    )  # fmt: skip
    paused = start_worker(pg_url, "paused", tmp_path / "art")
    wait_for(lambda: training(pg_url, "paused", 0), what="trial 0 to train")
    paused.send_signal(signal.SIGSTOP)
    other = start_worker(pg_url, "paused", tmp_path / "art")
    wait_for(
        lambda: trials(pg_url, "paused")[0].state == TrialState.FAIL,
        timeout=120,
        what="the silent trial to be failed as stale",
    )
    paused.send_signal(signal.SIGCONT)
    logs = finish([paused, other])
    no_traceback(logs)
    assert "trial 0: abandoned" in logs[0], logs[0]
    ts = trials(pg_url, "paused")
    assert ts[0].state == TrialState.FAIL
    rerun = next(t for t in ts if t.user_attrs.get(TrialAttr.RETRY_OF) == 0)
    assert rerun.state == TrialState.COMPLETE
    counted = [t for t in ts if t.state != TrialState.FAIL]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)


def test_a_frozen_lock_holder_loses_the_lock_and_nobody_claims_twice(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    # A worker frozen inside its claim's transaction (holding the study's advisory lock)
    # for longer than $KDSEARCH_LOCK_HOLD_S (5 s here, 30 by default): the server ends its
    # session, the lock is released, the other worker goes on; the frozen one, woken,
    # finds its claim rolled back and claims again. The budget is exact and no trial is
    # taken twice.
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "frozen", n_trials="3")
    hold = {"KDSEARCH_LOCK_HOLD_S": "5"}
    env = {
        "KDSEARCH_FAULT": "in-claim@2:pause=25",
        "KDSEARCH_FAULT_REACHED": str(tmp_path / "reached"),
        **hold,
    }
    frozen = start_worker(pg_url, "frozen", tmp_path / "art", **env)
    wait_for(lambda: (tmp_path / "reached").exists(), what="the second claim")
    start = time.monotonic()
    other = start_worker(pg_url, "frozen", tmp_path / "art", **hold)
    wait_for(
        lambda: any(t.state == TrialState.COMPLETE for t in trials(pg_url, "frozen")[1:]),
        timeout=120,
        what="the other worker to finish a trial while the holder is frozen",
    )
    assert time.monotonic() - start < 25  # it did not wait for the holder to wake
    logs = finish([frozen, other])
    no_traceback(logs)
    ts = trials(pg_url, "frozen")
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 3
    assert len({t.params["learning_rate"] for t in ts}) == 3  # three distinct trials


def test_kill_9_during_create_leaves_nothing_and_the_next_create_works(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    text = tiny_spec_text("killed", tiny_bert_dir, fixture_glue / "SST-2")
    path = write_spec(tmp_path / "killed.yaml", text)
    env = {
        **os.environ,
        "KDSEARCH_FAULT": "in-create:pause=120",
        "KDSEARCH_FAULT_REACHED": str(tmp_path / "reached"),
    }
    create = subprocess.Popen(
        [*KDSEARCH, "study", "create", str(path), "--storage", pg_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    wait_for(lambda: (tmp_path / "reached").exists(), what="the create's transaction")
    create.send_signal(signal.SIGKILL)
    create.wait()
    assert "killed" not in optuna.get_all_study_names(storage=pg_url)  # all or nothing
    again = kdsearch("study", "create", str(path), "--storage", pg_url)
    assert again.returncode == 0, again.stderr
    (baseline,) = trials(pg_url, "killed")
    assert (
        baseline.state == TrialState.WAITING and baseline.user_attrs[TrialAttr.ROLE] == "baseline"
    )


def test_a_half_made_study_of_an_earlier_version_is_replaced(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    optuna.create_study(study_name="half", storage=pg_url)  # a row, no spec, no trial
    text = tiny_spec_text("half", tiny_bert_dir, fixture_glue / "SST-2")
    result = kdsearch("study", "create", str(write_spec(tmp_path / "half.yaml", text)),
                      "--storage", pg_url)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "left half-made" in result.stderr
    assert len(trials(pg_url, "half")) == 1


def test_a_full_disk_leaves_no_unreferenced_artifact(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    # "No space left on device" after the trial's first file is written: the worker
    # removes what it wrote, exits 4 naming the store, and the trial is not charged.
    make_study(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "full", n_trials="1")
    art = tmp_path / "art"
    # (the teacher's prediction files go through Optuna's upload_artifact; the trial's
    # files through store_files: its first write succeeds, the second finds the disk full)
    worker = start_worker(pg_url, "full", art, KDSEARCH_FAULT="in-store@1:raise=enospc")
    assert worker.wait(timeout=120) == 4
    log = worker.communicate()[0]
    assert "cannot write to the artifact store" in log and "No space left on device" in log
    no_traceback([log])
    study = optuna.load_study(study_name="full", storage=pg_url)
    referenced = {
        json.loads(meta)["artifact_id"] if isinstance(meta, str) else meta["artifact_id"]
        for attrs in [
            study._storage.get_study_system_attrs(study._study_id),
            *(t.system_attrs for t in study.trials),
        ]
        for key, meta in attrs.items()
        if key.startswith("artifacts:")
    }
    on_disk = {p.name for p in (art / "optuna").rglob("*") if p.is_file()}
    assert on_disk <= referenced | {"LOCATION"}, on_disk - referenced
    first, queued = study.trials
    assert first.state == TrialState.FAIL
    assert queued.state == TrialState.WAITING and queued.user_attrs[TrialAttr.ATTEMPT] == 0


def test_a_degenerate_trial_is_pruned_with_its_figures_never_retried(
    tmp_path, tiny_bert_dir, fixture_glue
) -> None:
    # sigma is undefined when no train row is right for both teacher and student. Made so
    # by construction: the tiny teacher fine-tuned once, then used as is, with train
    # labels flipped from its own predictions: it is right on no train row and every
    # trial is degenerate. That is the configuration's result, not a failure: PRUNED with
    # its figures, never failed, retried or counted towards a halt.
    import torch

    from kdsearch.workers.assets import prepare_assets
    from kdsearch.workers.cache import AssetCache

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(fixture_glue / "SST-2" / "dev.tsv", data / "dev.tsv")
    rows = (fixture_glue / "SST-2" / "train.tsv").read_text().splitlines()[:161]
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    first = load_spec(
        write_spec(tmp_path / "first.yaml", tiny_spec_text("first", tiny_bert_dir, data))
    )
    assets = prepare_assets(first, AssetCache(tmp_path / "probe"), torch.device("cpu"))
    predicted = assets.teacher_logits_train.argmax(dim=-1).tolist()  # (160,)
    assert len(predicted) == 160 and len(set(predicted)) == 2
    flipped = [
        f"{r.rsplit(chr(9), 1)[0]}\t{1 - p}" for r, p in zip(rows[1:], predicted, strict=True)
    ]
    (data / "train.tsv").write_text("\n".join([rows[0], *flipped]) + "\n")
    text = tiny_spec_text("flat", Path(assets.teacher), data, n_trials=2)
    text = "\n".join(line for line in text.splitlines() if "finetune:" not in line) + "\n"
    write_spec(tmp_path / "flat.yaml", text)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    create_or_attach(open_storage(url), load_spec(tmp_path / "flat.yaml"))
    worker = Worker(WorkerOptions(url, "flat", str(tmp_path / "art"), threads=1))
    assert worker.run() == 0
    done = [TrialRecord.of(t) for t in trials(url, "flat")]
    assert len(done) == 2  # the budget, and nothing else: no retry
    for r in done:
        assert r.state == TrialState.PRUNED and r.degenerate and r.failure is None
        assert r.outcome is not None and r.outcome.train_n_kept == 0
        assert r.outcome.teacher_train_accuracy == 0.0
        assert r.feasible is False  # undefined sigma is never feasible
    study = optuna.load_study(study_name="flat", storage=url)
    assert study.user_attrs.get(StudyAttr.HALTED) is None
