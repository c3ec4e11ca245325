"""Study lifecycle on both storage backends: creation, attach, baseline, budget, the claim's
trial config, feasibility through Optuna 5's constraint API, deletion, the bulk read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.service.claim import Claim, ClaimedTrial, StudyView, claim_trial
from kdsearch.service.errors import KdsearchError
from kdsearch.service.loading import load_spec
from kdsearch.service.record import (
    OBJECTIVES,
    StudyAttr,
    SystemAttr,
    TeacherFigures,
    TrialAttr,
    TrialOutcome,
    TrialRecord,
    placement_attrs,
    set_study_attr,
)
from kdsearch.service.recovery import halted_reason, unhalt
from kdsearch.service.sampler import (
    build_sampler,
    constraint_values,
    record_constraints,
    sampler_seed,
)
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach, delete_study, load_stored_spec
from kdsearch.service.trial_config import (
    Role,
    TrialConfig,
    config_id,
    replicate_seed,
    trial_hyperparameters,
)
from tests.helpers import tiny_spec_text, write_spec

TEACHER = TeacherFigures(dev_accuracy=0.8, train_accuracy=0.9, n_dev=64)


def outcome(sigma: float, drop: float, accuracy: float = 0.8) -> TrialOutcome:
    """A finished trial's figures, made up around its objectives."""
    figures = {name: 0.0 for name in TrialOutcome.REQUIRED}
    lists = ("epoch_losses", "train_sigma_per_class", "dev_sigma_per_class")
    figures.update({name: [0.0] for name in lists})
    figures.update(
        sigma=sigma, accuracy_drop=drop, student_dev_accuracy=accuracy,
        teacher_dev_accuracy=TEACHER.dev_accuracy, dev_n_total=64,
    )  # fmt: skip
    return TrialOutcome(**figures)


def finish(
    view: StudyView, claimed: ClaimedTrial, sigma: float, drop: float, spec: StudySpec
) -> None:
    """Settle a claimed trial as a worker would: outcome, constraints, values."""
    storage = view.study._storage._backend
    storage.set_trial_user_attrs(claimed.trial._trial_id, outcome(sigma, drop, 0.8 - drop).attrs())
    record_constraints(claimed.trial, constraint_values(sigma, drop, spec.thresholds))
    view.study.tell(claimed.trial, [sigma, drop])


@pytest.fixture()
def spec(tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path) -> StudySpec:
    text = tiny_spec_text("s1", tiny_bert_dir, fixture_glue / "SST-2", n_trials=3)
    return load_spec(write_spec(tmp_path / "s1.yaml", text))


def views(storage_url: str, spec: StudySpec, n: int = 1) -> list[StudyView]:
    """Workers' views of the study (each its own storage and Optuna cache)."""
    out = []
    for _ in range(n):
        storage = open_storage(storage_url)
        out.append(StudyView(optuna.load_study(study_name=spec.name, storage=storage)))
    set_study_attr(out[0].study, StudyAttr.TEACHER, TEACHER.as_dict())
    return out


def claim(view: StudyView, spec: StudySpec) -> ClaimedTrial | Claim:
    return claim_trial(view, spec, view.study._storage._backend, "fp32")


def test_create_stores_spec_metric_names_and_one_baseline(
    storage_url: str, spec: StudySpec
) -> None:
    storage = open_storage(storage_url)
    assert create_or_attach(storage, spec) is True
    assert create_or_attach(storage, spec) is False  # same spec: attach, nothing added
    study = optuna.load_study(study_name="s1", storage=storage)
    assert study.metric_names == list(OBJECTIVES)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert study.user_attrs[StudyAttr.SPEC] == spec.to_json_dict()
    assert load_stored_spec(storage, "s1") == spec
    waiting = study.get_trials(states=[TrialState.WAITING])
    assert len(study.trials) == 1 and len(waiting) == 1
    # an enqueued trial keeps its values as fixed params until a worker claims it
    params = {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1}
    assert waiting[0].system_attrs[SystemAttr.FIXED_PARAMS] == params
    assert waiting[0].user_attrs == placement_attrs(config_id(params), 0, 7, Role.BASELINE)


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
    other = spec.model_copy(update={"n_trials": 99})
    with pytest.raises(KdsearchError, match=r"n_trials: stored 3, given 99"):
        create_or_attach(storage, other)


def test_unknown_study_lists_the_existing_ones(storage_url: str, spec: StudySpec) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    with pytest.raises(KdsearchError, match=r"study 'nope' does not exist .*studies there: s1"):
        load_stored_spec(storage, "nope")


def test_claim_trial_enforces_the_global_budget_and_hands_down_the_config(
    storage_url: str, spec: StudySpec
) -> None:
    create_or_attach(open_storage(storage_url), spec)
    a, b = views(storage_url, spec, 2)  # two workers share one budget of 3
    first = claim(a, spec)
    assert isinstance(first, ClaimedTrial) and first.number == 0
    assert first.trial.params == {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1}
    # the claim resolved the config once and recorded it as it hands it down
    config = first.config
    assert config is not None and config.role == Role.BASELINE and config.seed == 7
    assert config.hyperparameters == trial_hyperparameters(spec, first.trial.params)
    assert config.reference.kind == "teacher" and config.reference.accuracy == 0.8
    assert config.protected and config.precision == "fp32"
    stored = a.study._storage._backend.get_trial(first.trial._trial_id)
    assert TrialConfig.from_attr(stored.user_attrs[TrialAttr.TRIAL_CONFIG]) == config
    second, third = claim(b, spec), claim(a, spec)
    assert isinstance(second, ClaimedTrial) and isinstance(third, ClaimedTrial)
    assert second.config is not None and second.config.role == Role.SEARCH
    assert not second.config.protected  # a new configuration's first seed can be pruned
    # 3 running: no slot, but a running trial may still fail -> wait
    assert claim(b, spec) is Claim.WAIT
    finish(a, first, 0.04, 0.0, spec)
    b.study.tell(second.trial, state=TrialState.FAIL)
    # A failed trial frees its slot; finished ones do not.
    fourth = claim(b, spec)
    assert isinstance(fourth, ClaimedTrial) and fourth.number == 3
    assert claim(a, spec) is Claim.WAIT
    for claimed in (third, fourth):
        finish(a, claimed, 0.1, 0.1, spec)
    assert claim(a, spec) is Claim.DONE


def test_the_sampler_seed_is_the_trial_numbers_so_one_worker_replays_a_study(
    spec: StudySpec,
) -> None:
    assert sampler_seed(spec, 3) == sampler_seed(spec, 3)  # every worker, every run
    assert sampler_seed(spec, 3) != sampler_seed(spec, 4)  # workers claim other numbers
    other = spec.model_copy(update={"seed": 8})
    assert sampler_seed(other, 3) != sampler_seed(spec, 3)
    assert isinstance(build_sampler(spec, 0), optuna.samplers.TPESampler)


def test_constraints_go_through_the_trial_and_mark_feasibility(
    storage_url: str, spec: StudySpec
) -> None:
    create_or_attach(open_storage(storage_url), spec)
    (view,) = views(storage_url, spec)
    outcomes = []
    for sigma, drop in [(0.03, 0.005), (0.08, 0.0), (0.01, 0.02)]:
        claimed = claim(view, spec)
        assert isinstance(claimed, ClaimedTrial)
        finish(view, claimed, sigma, drop, spec)
        outcomes.append(TrialRecord.of(view.study.trials[claimed.number]).feasible)
    assert outcomes == [True, False, False]
    system = view.study.trials[1].system_attrs
    # Optuna 5's keyed constraints, not the deprecated constraints_func's list
    assert SystemAttr.CONSTRAINTS not in system
    assert system["constraints:sigma"] == pytest.approx(0.03)
    assert system["constraints:accuracy_drop"] == pytest.approx(-0.01)
    assert view.study.trials[1].constraints == pytest.approx(
        {"sigma": 0.03, "accuracy_drop": -0.01}
    )
    # best_trials keeps only feasible Pareto-optimal trials
    assert [t.number for t in view.study.best_trials] == [0]


def test_trials_of_earlier_versions_are_read_with_their_listed_constraints(
    storage_url: str, spec: StudySpec
) -> None:
    create_or_attach(open_storage(storage_url), spec)
    study = optuna.load_study(study_name="s1", storage=storage_url)
    trial = study.ask()
    # as constraints_func wrote them, and without a role or trial config
    study._storage.set_trial_system_attr(trial._trial_id, SystemAttr.CONSTRAINTS, [0.01, -0.01])
    study._storage.set_trial_user_attr(trial._trial_id, TrialAttr.LEGACY_BASELINE, True)
    study.tell(trial, [0.06, 0.0])
    record = TrialRecord.of(study.trials[-1])
    assert record.constraints == (0.01, -0.01) and record.feasible is False
    assert record.baseline and record.trial_config is None


def test_trial_hyperparameters_merge_searched_values_over_defaults(spec: StudySpec) -> None:
    hp = trial_hyperparameters(spec, {"learning_rate": 1e-3, "batch_size": 16, "epochs": 2})
    assert (hp.learning_rate, hp.batch_size, hp.epochs) == (1e-3, 16, 2)
    assert (hp.weight_decay, hp.temperature, hp.warmup_proportion) == (1e-4, 1.0, 0.1)


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2", "random"])
def test_every_sampler_records_feasibility_and_samples_in_range(
    tmp_path: Path, spec: StudySpec, sampler: str
) -> None:
    spec = spec.model_copy(
        update={"sampler": spec.sampler.model_copy(update={"name": sampler, "n_startup_trials": 1})}
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_attach(open_storage(url), spec)
    (view,) = views(url, spec)
    for sigma in (0.01, 0.2, 0.03):
        claimed = claim(view, spec)
        assert isinstance(claimed, ClaimedTrial)
        lr = claimed.trial.params["learning_rate"]
        assert 1e-5 <= lr <= 1e-2
        finish(view, claimed, sigma, 0.0, spec)
    assert [TrialRecord.of(t).feasible for t in view.study.trials] == [True, False, True]


def test_with_the_baseline_as_reference_nothing_else_runs_before_it(
    storage_url: str, spec: StudySpec
) -> None:
    thresholds = spec.thresholds.model_copy(update={"accuracy_reference": "baseline"})
    spec = spec.model_copy(update={"thresholds": thresholds})
    create_or_attach(open_storage(storage_url), spec)
    a, b = views(storage_url, spec, 2)
    baseline = claim(a, spec)
    assert isinstance(baseline, ClaimedTrial) and baseline.number == 0
    assert baseline.config is not None and baseline.config.is_baseline_reference
    assert claim(b, spec) is Claim.WAIT  # the baseline is running
    a.study.tell(baseline.trial, state=TrialState.FAIL)  # failed, not re-queued: halted
    assert claim(b, spec) is Claim.HALTED
    assert "the baseline (trial 0" in (halted_reason(a.study._storage, "s1") or "")
    # re-queued (as a retry would be): it runs first, then the others may start
    params = baseline.trial.params
    a.study.enqueue_trial(
        params, user_attrs=placement_attrs(config_id(params), 0, 7, Role.BASELINE)
    )
    assert unhalt(a.study._storage._backend, "s1")
    rerun = claim(b, spec)
    assert isinstance(rerun, ClaimedTrial) and rerun.config is not None
    assert rerun.config.role == Role.BASELINE
    assert claim(a, spec) is Claim.WAIT
    finish(b, rerun, 0.04, 0.0, spec)
    nxt = claim(a, spec)
    assert isinstance(nxt, ClaimedTrial) and nxt.config is not None
    # measured against the baseline's mean dev accuracy over its seeds (one so far)
    assert (nxt.config.reference.kind, nxt.config.reference.accuracy) == ("baseline", 0.8)
    assert nxt.config.baseline_accuracy == 0.8


def test_a_study_created_before_a_key_existed_still_attaches(
    storage_url: str, spec: StudySpec
) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    study = optuna.load_study(study_name="s1", storage=storage)
    older = spec.to_json_dict()
    del older["replicates"]  # as stored by a version without seed replicates
    study.set_user_attr(StudyAttr.SPEC, older)
    assert create_or_attach(storage, spec) is False
    assert load_stored_spec(storage, "s1") == spec


def test_delete_removes_the_study_and_a_new_create_makes_it_afresh(
    storage_url: str, spec: StudySpec
) -> None:
    storage = open_storage(storage_url)
    create_or_attach(storage, spec)
    assert delete_study(storage, "s1") == 1
    with pytest.raises(KdsearchError, match="does not exist"):
        load_stored_spec(storage, "s1")
    assert create_or_attach(storage, spec) is True


def test_replicate_seeds_are_those_of_the_study(spec: StudySpec) -> None:
    assert replicate_seed(spec.seed, 0) == spec.seed


def _trial(number: int) -> optuna.trial.FrozenTrial:
    """A trial with a bit of everything Optuna stores (params, values, both kinds of
    attributes), finished or not."""
    from optuna.distributions import FloatDistribution, IntDistribution

    state = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)[number % 3]
    return optuna.trial.create_trial(
        state=state,
        params={"lr": 10.0 ** -(1 + number % 4), "epochs": 1 + number % 5},
        distributions={
            "lr": FloatDistribution(1e-5, 1.0, log=True),
            "epochs": IntDistribution(1, 5),
        },
        values=[0.01 * number, -0.5] if state == TrialState.COMPLETE else None,
        user_attrs={"kdsearch:outcome": {"sigma": 0.01 * number, "list": [number]}, "n": number},
        system_attrs={"constraints": [0.1, -0.2]} if number % 2 else {},
    )


def _as_compared(trials: list[optuna.trial.FrozenTrial]) -> list[tuple]:
    return [
        (t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
         t.datetime_start, t.datetime_complete)
        for t in trials
    ]  # fmt: skip


@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_the_bulk_read_gives_what_optuna_reads(storage_url: str) -> None:
    """`read_study` (status, report, the note) against Optuna's own read, past the size
    where it filters by subquery instead of a list of ids (500 trials)."""
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name="bulk", storage=storage, directions=["minimize"] * 2)
    study.add_trials([_trial(n) for n in range(510)])
    running = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)})
    running.set_user_attr("kdsearch:config", "abc")
    expected = optuna.load_study(study_name="bulk", storage=storage).get_trials(deepcopy=False)
    got = storage.read_study(study._study_id)
    assert len(got) == 511 and got[-1].state == TrialState.RUNNING
    assert _as_compared(got) == _as_compared(expected)


def test_the_two_connections_of_a_large_read_see_one_snapshot(pg_url: str) -> None:
    """A worker that writes while `status` reads (a new trial, an attribute of a running
    one) is seen by neither of the read's two connections: no trial without its
    attributes, no attribute without its trial."""
    from kdsearch.service.storage import _snapshot_pair, read_trials

    storage = open_storage(pg_url)
    study = optuna.create_study(study_name="snap", storage=storage, directions=["minimize"] * 2)
    study.add_trials([_trial(n) for n in range(3)])
    running = study.ask()
    before = _as_compared(storage.read_study(study._study_id))
    with _snapshot_pair(storage.engine) as (conn, side):
        worker = optuna.load_study(study_name="snap", storage=open_storage(pg_url))
        worker.add_trial(_trial(3))
        worker._storage.set_trial_user_attr(running._trial_id, "kdsearch:outcome", {"late": 1})
        got = read_trials(conn, study._study_id, side=side)
    assert _as_compared(got) == before
    after = storage.read_study(study._study_id)
    assert len(after) == 5 and after[3].user_attrs["kdsearch:outcome"] == {"late": 1}
