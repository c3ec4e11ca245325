"""Study lifecycle on both storage backends: creation, attach, baseline, budget, feasibility."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.service.errors import KdsearchError
from kdsearch.service.record import StudyAttr, TrialAttr, TrialOutcome, TrialRecord
from kdsearch.service.spec import StudySpec, load_spec
from kdsearch.service.storage import open_storage
from kdsearch.service.study import (
    METRIC_NAMES,
    Claim,
    build_sampler,
    claim_trial,
    create_or_attach,
    halted_reason,
    load_stored_spec,
    trial_hyperparameters,
    unhalt,
    worker_seed,
)
from tests.helpers import tiny_spec_text, write_spec


def outcome(sigma: float, drop: float, accuracy: float = 0.8) -> TrialOutcome:
    """A finished trial's figures, made up around its objectives."""
    figures = {name: 0.0 for name in TrialOutcome.REQUIRED}
    lists = ("epoch_losses", "train_sigma_per_class", "dev_sigma_per_class")
    figures.update({name: [0.0] for name in lists})
    figures.update(sigma=sigma, accuracy_drop=drop, student_dev_accuracy=accuracy)
    return TrialOutcome(**figures)


@pytest.fixture()
def spec(tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path) -> StudySpec:
    text = tiny_spec_text("s1", tiny_bert_dir, fixture_glue / "SST-2", n_trials=3)
    return load_spec(write_spec(tmp_path / "s1.yaml", text))


def test_create_stores_spec_metric_names_and_one_baseline(
    storage_url: str, spec: StudySpec
) -> None:
    storage = open_storage(storage_url)
    assert create_or_attach(storage, spec) is True
    assert create_or_attach(storage, spec) is False  # same spec: attach, nothing added
    study = optuna.load_study(study_name="s1", storage=storage)
    assert study.metric_names == METRIC_NAMES
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert study.user_attrs[StudyAttr.SPEC] == spec.to_json_dict()
    assert load_stored_spec(storage, "s1") == spec
    waiting = study.get_trials(states=[TrialState.WAITING])
    assert len(study.trials) == 1 and len(waiting) == 1
    # an enqueued trial keeps its values as fixed params until a worker claims it
    assert waiting[0].system_attrs["fixed_params"] == {
        "learning_rate": 1e-3, "batch_size": 32, "epochs": 1,
    }  # fmt: skip
    assert waiting[0].user_attrs[TrialAttr.BASELINE] is True


def test_concurrent_creates_enqueue_the_baseline_once(pg_url: str, spec: StudySpec) -> None:
    def create(_: int) -> bool:
        return create_or_attach(open_storage(pg_url), spec)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(create, range(4)))
    assert sorted(results) == [False, False, False, True]
    assert len(optuna.load_study(study_name="s1", storage=pg_url).trials) == 1


def test_create_with_a_different_spec_is_refused_and_names_the_difference(
    storage_url: str, spec: StudySpec
) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    changed = spec.model_copy(update={"n_trials": 9, "seed": 1})
    with pytest.raises(KdsearchError) as info:
        create_or_attach(storage, changed)
    message = str(info.value)
    assert "n_trials: stored 3, given 9" in message
    assert "seed: stored 7, given 1" in message
    assert (
        optuna.load_study(study_name="s1", storage=storage).user_attrs[StudyAttr.SPEC]["n_trials"]
        == 3
    )


def test_unknown_study_lists_the_existing_ones(storage_url: str, spec: StudySpec) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    with pytest.raises(KdsearchError, match=r"study 'nope' does not exist .*studies there: s1"):
        load_stored_spec(storage, "nope")


def test_claim_trial_enforces_the_global_budget(storage_url: str, spec: StudySpec) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    # Two "workers" with their own samplers share one budget of 3.
    studies = [
        optuna.load_study(
            study_name="s1", storage=storage, sampler=build_sampler(spec, worker_seed(spec, w))
        )
        for w in ("a", "b")
    ]
    first = claim_trial(studies[0], spec, storage)
    assert isinstance(first, optuna.Trial) and first.number == 0
    assert first.params == {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1}  # baseline
    second = claim_trial(studies[1], spec, storage)
    third = claim_trial(studies[0], spec, storage)
    assert isinstance(second, optuna.Trial) and isinstance(third, optuna.Trial)
    # 3 running: no slot, but a running trial may still fail -> wait
    assert claim_trial(studies[1], spec, storage) is Claim.WAIT
    studies[0].tell(first, [0.04, 0.0])
    studies[1].tell(second, state=TrialState.FAIL)
    # A failed trial frees its slot; finished ones do not.
    fourth = claim_trial(studies[1], spec, storage)
    assert isinstance(fourth, optuna.Trial) and fourth.number == 3
    assert claim_trial(studies[0], spec, storage) is Claim.WAIT
    for trial in (third, fourth):
        studies[0].tell(trial, [0.1, 0.1])
    assert claim_trial(studies[0], spec, storage) is Claim.DONE


def test_samplers_differ_per_worker_but_are_rebuilt_from_the_spec(spec: StudySpec) -> None:
    assert worker_seed(spec, "host:1") == worker_seed(spec, "host:1")
    assert worker_seed(spec, "host:1") != worker_seed(spec, "host:2")
    sampler = build_sampler(spec, 0)
    assert isinstance(sampler, optuna.samplers.TPESampler)


def test_constraints_mark_feasibility(storage_url: str, spec: StudySpec) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    study = optuna.load_study(study_name="s1", storage=storage, sampler=build_sampler(spec, 0))
    outcomes = []
    for sigma, drop in [(0.03, 0.005), (0.08, 0.0), (0.01, 0.02)]:
        trial = claim_trial(study, spec, storage)
        assert isinstance(trial, optuna.Trial)
        trial.set_user_attr("sigma", sigma)
        trial.set_user_attr("accuracy_drop", drop)
        study.tell(trial, [sigma, drop])
        outcomes.append(TrialRecord.of(study.trials[trial.number]).feasible)
    assert outcomes == [True, False, False]
    assert study.trials[1].system_attrs["constraints"] == pytest.approx([0.03, -0.01])
    # best_trials keeps only feasible Pareto-optimal trials
    assert [t.number for t in study.best_trials] == [0]


def test_trial_hyperparameters_merge_searched_values_over_defaults(spec: StudySpec) -> None:
    hp = trial_hyperparameters(spec, {"learning_rate": 1e-3, "batch_size": 16, "epochs": 2})
    assert (hp.learning_rate, hp.batch_size, hp.epochs) == (1e-3, 16, 2)
    assert (hp.weight_decay, hp.temperature, hp.warmup_proportion) == (1e-4, 1.0, 0.1)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_every_sampler_records_feasibility(tmp_path: Path, spec: StudySpec, sampler: str) -> None:
    spec = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"name": sampler})})
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    create_or_attach(storage, spec)
    study = optuna.load_study(study_name="s1", storage=storage, sampler=build_sampler(spec, 0))
    for sigma in (0.01, 0.2):
        trial = claim_trial(study, spec, storage)
        assert isinstance(trial, optuna.Trial)
        trial.set_user_attr("sigma", sigma)
        trial.set_user_attr("accuracy_drop", 0.0)
        study.tell(trial, [sigma, 0.0])
    assert [TrialRecord.of(t).feasible for t in study.trials] == [True, False]


def test_with_the_baseline_as_reference_nothing_else_runs_before_it(
    storage_url: str, spec: StudySpec
) -> None:
    thresholds = spec.thresholds.model_copy(update={"accuracy_reference": "baseline"})
    spec = spec.model_copy(update={"thresholds": thresholds})
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    studies = [
        optuna.load_study(study_name="s1", storage=storage, sampler=build_sampler(spec, i))
        for i in range(2)
    ]
    baseline = claim_trial(studies[0], spec, storage)
    assert isinstance(baseline, optuna.Trial) and baseline.number == 0
    assert claim_trial(studies[1], spec, storage) is Claim.WAIT  # the baseline is running
    studies[0].tell(baseline, state=TrialState.FAIL)  # failed, not re-queued: study halted
    assert claim_trial(studies[1], spec, storage) is Claim.HALTED
    assert "the baseline (trial 0" in (halted_reason(storage, "s1") or "")
    # re-queued (as a retry would be): it runs first, then the others may start
    studies[0].enqueue_trial(baseline.params, user_attrs={TrialAttr.BASELINE: True})
    assert unhalt(storage, "s1")
    rerun = claim_trial(studies[1], spec, storage)
    assert isinstance(rerun, optuna.Trial) and rerun.user_attrs[TrialAttr.BASELINE]
    assert claim_trial(studies[0], spec, storage) is Claim.WAIT
    for key, value in outcome(0.04, 0.0).attrs().items():
        rerun.set_user_attr(key, value)
    studies[1].tell(rerun, [0.04, 0.0])
    assert isinstance(claim_trial(studies[0], spec, storage), optuna.Trial)


def test_a_study_created_before_a_key_existed_still_attaches(
    storage_url: str, spec: StudySpec
) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    study = optuna.load_study(study_name="s1", storage=storage)
    older = spec.to_json_dict()
    del older["replicates"]  # as stored by a version without seed replicates
    study.set_user_attr(StudyAttr.SPEC, older)
    assert create_or_attach(storage, spec) is False  # attached: defaults fill the new key
