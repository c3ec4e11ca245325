"""Seed replicates with real worker processes on real PostgreSQL: replicates share their
configuration and differ in seed, the budget is exact, a killed replicate is re-run with
its seed, racing establishes the noise on the baseline first."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.service.confirmation import answer
from kdsearch.service.loading import load_spec
from kdsearch.service.racing import aggregate
from kdsearch.service.record import TrialAttr, TrialRecord
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach
from kdsearch.service.trial_config import confirmation_seed, replicate_seed
from kdsearch.workers.worker import Worker, WorkerOptions
from tests.helpers import finish, start_worker, stored_trials, tiny_spec_text, wait_for, write_spec

pytestmark = pytest.mark.slow


def make(url: str, tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path, name: str,
         n_trials: int, replicates: str) -> None:  # fmt: skip
    text = tiny_spec_text(name, tiny_bert_dir, fixture_glue / "SST-2", n_trials=n_trials)
    text += f"replicates: {replicates}\n"
    create_or_attach(open_storage(url), load_spec(write_spec(tmp_path / f"{name}.yaml", text)))


def records(url: str, name: str) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in stored_trials(url, name)]


def test_two_workers_give_every_configuration_its_seeds_within_the_budget(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    make(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "all", 6,
         "{max_seeds: 2, strategy: all}")  # fmt: skip
    finish([start_worker(pg_url, "all", tmp_path / "art") for _ in range(2)])
    done = records(pg_url, "all")
    assert [r.state for r in done] == [TrialState.COMPLETE] * 6  # the budget, exactly
    by_config: dict[str, list[TrialRecord]] = defaultdict(list)
    for r in done:
        by_config[r.config].append(r)  # type: ignore[index]
    assert len(by_config) == 3
    for replicates in by_config.values():
        assert len({tuple(sorted(r.params.items())) for r in replicates}) == 1  # same values
        assert sorted(r.seed for r in replicates) == sorted(replicate_seed(7, k) for k in (0, 1))
        assert sorted(r.replicate for r in replicates) == [0, 1]
        hyper = [r.hyperparameters for r in replicates]
        assert hyper[0] == hyper[1]
    # different seeds, different students (the head, dropout and the data order)
    assert all(len({r.sigma for r in reps}) == 2 for reps in by_config.values())


def test_racing_replicates_the_baseline_first_and_aggregates_by_configuration(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    make(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "race", 4, "{max_seeds: 3}")
    assert Worker(WorkerOptions(pg_url, "race", str(tmp_path / "art"), threads=1)).run() == 0
    done = records(pg_url, "race")
    assert [r.state for r in done] == [TrialState.COMPLETE] * 4
    # No noise estimate after one seed: the baseline gets its second seed before anything
    # else is sampled (one worker: the order is the queue's).
    assert [(r.baseline, r.replicate) for r in done[:2]] == [(True, 0), (True, 1)]
    assert done[1].params == done[0].params and done[1].seed != done[0].seed
    configs = aggregate(done, load_spec(tmp_path / "race.yaml"))
    baseline = next(c for c in configs if c.baseline)
    assert baseline.n >= 2 and baseline.sigma is not None  # bounds, from the pooled noise
    assert sum(c.n for c in configs) == 4


def test_a_killed_replicate_is_rerun_with_its_seed(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    make(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "kill", 3, "{max_seeds: 3}")
    env = {
        "KDSEARCH_FAULT": "after-claim@2:pause=120",  # after its second claim
        "KDSEARCH_FAULT_REACHED": str(tmp_path / "reached"),
    }
    victim = start_worker(pg_url, "kill", tmp_path / "art", **env)
    wait_for(lambda: (tmp_path / "reached").exists(), what="the second claim")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    held = records(pg_url, "kill")[1]
    assert held.state == TrialState.RUNNING and held.replicate == 1
    finish([start_worker(pg_url, "kill", tmp_path / "art")])
    done = records(pg_url, "kill")
    assert done[1].state == TrialState.FAIL
    rerun = next(r for r in done if r.retry_of == 1)
    assert rerun.state == TrialState.COMPLETE
    assert (rerun.replicate, rerun.seed, rerun.config) == (1, held.seed, held.config)
    assert rerun.seed == replicate_seed(7, 1)
    assert sum(r.state == TrialState.COMPLETE for r in done) == 3
    first = optuna.load_study(study_name="kill", storage=pg_url).trials[0]
    assert first.user_attrs[TrialAttr.SEED] == 7  # the baseline's first seed: the study's


def test_status_report_and_dataframe_show_configurations(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    import json

    import kdsearch
    from tests.helpers import kdsearch as cli

    make(pg_url, tmp_path, tiny_bert_dir, fixture_glue, "shown", 3, "{max_seeds: 2, strategy: all}")
    study = kdsearch.load_study("shown", storage=pg_url)
    study.run_worker(threads=1)
    table = cli("status", "--study", "shown", "--storage", pg_url).stdout
    assert table.startswith("configurations (search seeds: mean ± sd [confidence bounds];")
    assert "trials:" in table
    rows = json.loads(
        cli("status", "--study", "shown", "--configurations", "--format", "json",
            "--storage", pg_url).stdout
    )  # fmt: skip
    frame = study.configurations_dataframe()
    assert len(rows) == len(frame) == 2  # 3 trials: the baseline twice, one more config once
    baseline = frame[frame.baseline].iloc[0]
    assert baseline.seeds == 2
    done = [r for r in study.records() if r.baseline]
    sigmas = [r.sigma for r in done]
    assert baseline.sigma_mean == pytest.approx(sum(sigmas) / 2)
    assert baseline.sigma_sd == pytest.approx(abs(sigmas[0] - sigmas[1]) / 2**0.5)
    assert rows[0]["verdict"] == baseline.verdict
    # numbers, as the dataframe has them (not "0.0437 ± 0.0005 [...]" strings)
    assert rows[0]["sigma_mean"] == pytest.approx(baseline.sigma_mean)
    assert isinstance(rows[0]["sigma_sd"], float) and isinstance(rows[0]["seeds"], int)
    (summary,) = json.loads(
        cli("report", "--study", "shown", "--format", "json", "--storage", pg_url).stdout
    )
    assert summary["baseline"]["seeds"] == 2
    assert summary["baseline"]["sigma_mean"] == pytest.approx(baseline.sigma_mean)
    assert len(summary["configurations"]) == 2


def test_two_workers_confirm_on_held_out_seeds_and_a_killed_one_is_rerun_with_its_seed(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    # Thresholds every trained student meets: the search's pick is a candidate, and its
    # held-out seeds confirm it. 6 trials, 2 held-out seeds x 2 candidates reserved: the
    # search gets 2 (the baseline and one sample), then the candidate's 2 held-out seeds.
    text = tiny_spec_text("held", tiny_bert_dir, fixture_glue / "SST-2", n_trials=6)
    text += "thresholds: {sigma_max: 1.0, accuracy_drop_max: 1.0}\n"
    text += "replicates: {confirm_seeds: 2, confirm_candidates: 2, confirm_precision: 1.0}\n"
    spec = load_spec(write_spec(tmp_path / "held.yaml", text))
    create_or_attach(open_storage(pg_url), spec)
    env = {
        "KDSEARCH_FAULT": "after-claim@3:pause=120",  # its third claim: a held-out seed
        "KDSEARCH_FAULT_REACHED": str(tmp_path / "reached"),
    }
    victim = start_worker(pg_url, "held", tmp_path / "art", **env)
    wait_for(lambda: (tmp_path / "reached").exists(), what="the third claim")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    held = records(pg_url, "held")
    killed = next(r for r in held if r.state == TrialState.RUNNING)
    assert killed.confirmation and killed.seed == confirmation_seed(7, killed.replicate)
    finish([start_worker(pg_url, "held", tmp_path / "art") for _ in range(2)])
    done = records(pg_url, "held")
    counted = [r for r in done if r.state != TrialState.FAIL]
    assert len(counted) <= 6  # the budget stays exact (the kill's slot is its re-run's)
    rerun = next(r for r in done if r.retry_of == killed.number)
    assert rerun.state == TrialState.COMPLETE and rerun.confirmation
    assert (rerun.config, rerun.replicate, rerun.seed) == (
        killed.config,
        killed.replicate,
        killed.seed,
    )
    held_out = [r for r in done if r.confirmation and r.state == TrialState.COMPLETE]
    assert len(held_out) == 2 and len({r.config for r in held_out}) == 1
    search_seeds = {r.seed for r in done if not r.confirmation}
    assert not search_seeds & {r.seed for r in held_out}
    judged = aggregate(done, spec)
    found = answer(judged, spec)
    assert found is not None and found.confirmed
    assert sorted(found.trials) == sorted(r.number for r in held_out)
    assert found.sigma == pytest.approx(sum(r.sigma for r in held_out) / 2)
    # confirmed: the study stopped early, with the second candidate's reserve unused
    assert len(counted) == 4


def test_two_workers_run_a_gp_study_on_postgres(
    tmp_path, pg_url, tiny_bert_dir, fixture_glue
) -> None:
    # GPSampler (constrained, two objectives) behind the claim: each trial's draw is seeded
    # by its number, the running trials of the other worker are pending for it.
    text = tiny_spec_text("gp", tiny_bert_dir, fixture_glue / "SST-2", n_trials=5)
    text = text.replace(
        "sampler: {name: tpe, n_startup_trials: 2}", "sampler: {name: gp, n_startup_trials: 2}"
    )
    text += "replicates: {max_seeds: 2}\n"
    spec = load_spec(write_spec(tmp_path / "gp.yaml", text))
    assert spec.sampler.name == "gp"
    create_or_attach(open_storage(pg_url), spec)
    logs = finish([start_worker(pg_url, "gp", tmp_path / "art") for _ in range(2)])
    assert not any("Traceback" in log for log in logs)
    done = records(pg_url, "gp")
    assert [r.state for r in done] == [TrialState.COMPLETE] * 5  # the budget, exactly
    sampled = [r for r in done if not r.baseline and r.replicate == 0]
    assert len(sampled) >= 2 and len({tuple(sorted(r.params.items())) for r in sampled}) == len(
        sampled
    )
    assert all(r.constraints is not None for r in done)  # feasibility through set_constraint
