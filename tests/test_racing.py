"""Seed replicates and the confirmed answer on synthetic trials: intervals, the fitted
prior, verdicts, racing and the confirmation schedule against hand-computed values (pure
functions: no database). The numbers in the comments are computed by hand from the
formulas in ``service/racing.py`` and ``service/confirmation.py``."""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState
from scipy.optimize import brentq
from scipy.special import polygamma
from scipy.stats import t as student_t

from experiments.answer_reliability import TEACHER, run, synthetic_record
from kdsearch.service.confirmation import (
    Usage,
    answer,
    candidates,
    confirmation_of,
    plan,
)
from kdsearch.service.errors import SpecError
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.racing import (
    PRIOR_DF,
    SIGMA_SD_FLOOR,
    Judged,
    aggregate,
    fit_prior,
    seeds_to_queue,
)
from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import ReplicatesSpec, StudySpec
from kdsearch.service.trial_config import Role, confirmation_seed, replicate_seed

SPEC = {
    "name": "r",
    "task": "sst2",
    "data": {"source": "hub"},
    "teacher": {"model": "org/teacher"},
    "student": {"model": "org/student"},
    "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
    "n_trials": 50,
    "seed": 7,
}


def spec(n_trials: int = 50, reference: str = "teacher", **replicates: object) -> StudySpec:
    raw = {**SPEC, "n_trials": n_trials, "replicates": {"max_seeds": 3, **replicates}}
    raw["thresholds"] = {"accuracy_reference": reference}
    return spec_from_dict(raw, source="test")


class Study:
    """Trials of synthetic configurations, numbered as they are added."""

    def __init__(self) -> None:
        self.records: list[TrialRecord] = []
        self.counts: dict[tuple[str, bool], int] = {}

    def add(
        self,
        config: str,
        sigmas: list[float],
        accuracies: list[float] | None = None,
        role: Role = Role.SEARCH,
        state: TrialState = TrialState.COMPLETE,
    ) -> Study:
        accuracies = accuracies or [TEACHER] * len(sigmas)
        held_out = role == Role.CONFIRMATION
        for sigma, accuracy in zip(sigmas, accuracies, strict=True):
            k = self.counts.get((config, held_out), 0)
            self.counts[(config, held_out)] = k + 1
            seed = (confirmation_seed if held_out else replicate_seed)(7, k)
            done = state == TrialState.COMPLETE
            self.records.append(
                synthetic_record(
                    len(self.records), config, role, k, seed, state,
                    sigma if done else None, accuracy if done else None,
                )
            )  # fmt: skip
        return self

    def judge(self, s: StudySpec) -> Judged:
        return aggregate(self.records, s, TEACHER)


def by_name(judged: Judged) -> dict[str, object]:
    return {c.config: c for c in judged}


def test_replicate_and_confirmation_seeds_are_disjoint_stable_sequences() -> None:
    search = [replicate_seed(7, k) for k in range(20)]
    held_out = [confirmation_seed(7, k) for k in range(20)]
    assert search[0] == 7 and len(set(search)) == 20 and not set(search) & set(held_out)
    assert held_out == [confirmation_seed(7, k) for k in range(20)]  # stable


def test_own_noise_interval_without_a_prior() -> None:
    # A: [0.040, 0.044, 0.048]: mean 0.044, s = 0.004 (df 2), t(0.95, 2) = 2.919986,
    # half = 2.919986 * 0.004 / sqrt(3) = 0.0067434: straddles kappa.
    (a,) = Study().add("A", [0.040, 0.044, 0.048]).judge(spec())
    assert a.sigma is not None
    assert (a.sigma.low, a.sigma.high) == pytest.approx((0.044 - 0.0067434, 0.044 + 0.0067434))
    assert (a.sigma.sd, a.sigma.df) == (pytest.approx(0.004), 2)
    assert a.verdict == "uncertain"


def test_two_identical_seeds_do_not_make_an_interval_of_zero_width() -> None:
    # sd floored at 0.0002 (df 1): half = t(0.95, 1) 6.313752 * 0.0002 / sqrt(2) = 0.00089290
    (a,) = Study().add("A", [0.030, 0.030]).judge(spec())
    assert a.sigma is not None and a.sigma.sd == SIGMA_SD_FLOOR
    assert a.sigma.high - a.sigma.mean == pytest.approx(0.00089290, rel=1e-5)


def test_fit_prior_homogeneous_configurations_weigh_prior_df() -> None:
    # Three configurations with the same variance 2e-6 on df 1: their spread of log
    # variances is below what sampling alone gives, so d0 = PRIOR_DF, and
    # s0^2 = exp(log 2e-6 - digamma(0.5) + log 0.5) = 2e-6 * e^1.270363 = 7.1243e-6,
    # rounded to 2 significant digits: 7.1e-6.
    s0, d0 = fit_prior([(2e-6, 1)] * 3, SIGMA_SD_FLOOR)  # type: ignore[misc]
    assert (s0, d0) == (7.1e-6, PRIOR_DF)
    assert fit_prior([(2e-6, 1)] * 2, SIGMA_SD_FLOOR) is None  # two say nothing of spread


def test_fit_prior_heterogeneous_configurations_get_little_weight() -> None:
    # variances 1e-6, 1e-4, 1e-5 (df 2 each): var of log variances 5.3019, minus
    # trigamma(1) 1.644934 = 3.657; d0 / 2 solves trigamma(x) = 3.657.
    logs = [math.log(v) for v in (1e-6, 1e-4, 1e-5)]
    mean = sum(logs) / 3
    excess = sum((x - mean) ** 2 for x in logs) / 2 - float(polygamma(1, 1.0))
    half_d0 = brentq(lambda x: float(polygamma(1, x)) - excess, 1e-3, 100)
    s0, d0 = fit_prior([(1e-6, 2), (1e-4, 2), (1e-5, 2)], SIGMA_SD_FLOOR)  # type: ignore[misc]
    assert d0 == round(2 * half_d0, 1) and d0 < 1.5  # rounded to 0.1
    # location: mean of e_i = log v + gamma (digamma(1) = -gamma), corrected for d0,
    # rounded to 2 significant digits
    e_mean = mean - float(polygamma(0, 1.0))
    exact = 2 * half_d0
    expected = math.exp(e_mean + float(polygamma(0, exact / 2)) - math.log(exact / 2))
    assert s0 == float(f"{expected:.2g}")


def test_shrunk_interval_with_a_prior_from_the_others() -> None:
    # B, C, D (each [x, x + 0.002], var 2e-6, df 1) and A [0.040, 0.044, 0.048]: the
    # search's prior pools all four; A's held-out seeds are judged on B, C, D's alone
    # (hand-computed in the confirmation test below). Here: A is shrunk, not pooled alone.
    study = Study().add("A", [0.040, 0.044, 0.048])
    for name, x in (("B", 0.030), ("C", 0.020), ("D", 0.025)):
        study.add(name, [x, x + 0.002])
    judged = study.judge(spec())
    a = by_name(judged)["A"]
    prior = judged.pool.prior()
    assert prior is not None and 0 < prior.sigma_df <= PRIOR_DF
    var = (prior.sigma_df * prior.sigma_var + 2 * 1.6e-5) / (prior.sigma_df + 2)
    half = student_t.ppf(0.95, prior.sigma_df + 2) * math.sqrt(var) / math.sqrt(3)
    assert a.sigma.high == pytest.approx(0.044 + half)  # type: ignore[attr-defined]
    assert a.sigma.high < 0.044 + 0.0067434  # narrower than on its own noise alone


def test_one_seed_is_never_feasible_but_can_be_clearly_infeasible() -> None:
    study = Study().add("low", [0.001]).add("far", [0.12]).add("near", [0.052])
    verdicts = {c.config: c.verdict for c in study.judge(spec())}
    # no prior yet: "far" is beyond 2 * kappa, the others open
    assert verdicts == {"low": "uncertain", "far": "infeasible", "near": "uncertain"}
    # with a prior from three tight configurations, one seed at 0.065 is clearly beyond
    for name, x in (("B", 0.030), ("C", 0.020), ("D", 0.025)):
        study.add(name, [x, x + 0.002])
    study.add("beyond", [0.065])
    judged = by_name(study.judge(spec()))
    assert judged["low"].verdict == "uncertain"  # type: ignore[attr-defined]
    assert judged["beyond"].verdict == "infeasible"  # type: ignore[attr-defined]
    # ...while a single-seed study decides on the point estimate, as Optuna's constraints
    single = Study().add("low", [0.001]).add("far", [0.9]).judge(spec(max_seeds=1))
    assert [c.verdict for c in single] == ["feasible", "infeasible"]


def test_a_noisy_baseline_is_not_pooled_into_the_prior() -> None:
    tight = Study()
    for name, x in (("A", 0.040), ("B", 0.030), ("C", 0.020), ("D", 0.025)):
        tight.add(name, [x, x + 0.002])
    with_baseline = Study()
    with_baseline.add("base", [0.10, 0.30], role=Role.BASELINE)  # bimodal: collapses or not
    for name, x in (("A", 0.040), ("B", 0.030), ("C", 0.020), ("D", 0.025)):
        with_baseline.add(name, [x, x + 0.002])
    a1 = by_name(tight.judge(spec()))["A"]
    a2 = by_name(with_baseline.judge(spec()))["A"]
    assert a1.sigma == a2.sigma  # type: ignore[attr-defined]
    assert with_baseline.judge(spec()).pool.prior() == tight.judge(spec()).pool.prior()


def test_nan_sigma_and_pruned_first_seeds_are_infeasible_and_get_no_seeds() -> None:
    study = Study().add("nan", [math.nan]).add("pruned", [0.0], state=TrialState.PRUNED)
    s = spec()
    judged = study.judge(s)
    assert [c.verdict for c in judged] == ["infeasible", "infeasible"]
    assert seeds_to_queue(judged.configurations, s, 10) == []
    assert not judged.pool.members


def test_baseline_reference_is_its_mean_with_welch_degrees_of_freedom() -> None:
    # baseline accuracies [0.80, 0.82]: mean 0.81, se 0.01 (df 1). A's [0.80, 0.81, 0.82]:
    # own sd 0.01 (no prior: only A is comparable), se^2 = 1e-4 / 3; total 1.3333e-4,
    # Welch df = total^2 / ((1e-4/3)^2 / 2 + (1e-4)^2 / 1) = 1.684211.
    study = Study().add("base", [0.056, 0.058], [0.80, 0.82], role=Role.BASELINE)
    study.add("A", [0.040, 0.041, 0.042], [0.80, 0.81, 0.82])
    judged = study.judge(spec(reference="baseline"))
    assert (judged.reference.accuracy, judged.reference.se) == pytest.approx((0.81, 0.01))
    a = by_name(judged)["A"]
    welch = (1.3333333e-4) ** 2 / ((1e-4 / 3) ** 2 / 2 + (1e-4) ** 2)
    assert a.drop.df == pytest.approx(welch, rel=1e-6)  # type: ignore[attr-defined]
    half = student_t.ppf(0.95, welch) * math.sqrt(1.3333333e-4)
    assert a.drop.high == pytest.approx(0.0 + half, rel=1e-6)  # type: ignore[attr-defined]
    assert by_name(judged)["base"].drop.high == 0.0  # type: ignore[attr-defined]


def test_racing_queues_seeds_only_where_the_answer_is_open() -> None:
    s = spec()
    study = Study()
    for name, x in (("B", 0.030), ("C", 0.020), ("D", 0.025)):
        study.add(name, [x, x + 0.002, x + 0.001])  # feasible, done (3 seeds)
    study.add("far", [0.12])  # clearly infeasible
    study.add("open", [0.049])  # one seed near kappa
    study.add("busy", [0.045]).add("busy", [0.0], state=TrialState.RUNNING)
    study.add("worse", [0.061, 0.062])  # infeasible on two seeds
    study.add("fresh", [0.040, 0.041])  # feasible or nearly: gets a third seed
    judged = study.judge(s)
    queued = [(c.config, k) for c, k in seeds_to_queue(judged.configurations, s, 10)]
    assert queued == [("fresh", 2), ("open", 1)]  # by mean sigma
    assert seeds_to_queue(judged.configurations, s, 1) == [(by_name(judged)["fresh"], 2)]


def test_initial_seeds_and_the_all_strategy() -> None:
    study = Study().add("A", [0.3])  # hopeless on its one seed
    initial = spec(max_seeds=4, initial_seeds=2)
    queued = seeds_to_queue(study.judge(initial).configurations, initial, 10)
    assert [k for _, k in queued] == [1]  # its initial second seed
    everything = spec(strategy="all")
    queued = seeds_to_queue(study.judge(everything).configurations, everything, 10)
    assert [k for _, k in queued] == [1, 2]


def test_a_sample_not_yet_sampled_keeps_the_seeds_it_will_need() -> None:
    # strategy all, 2 seeds each, budget 6: A and B done, a third sample taken by one
    # worker and still being sampled. Another worker must not spend its second seed's
    # slot on a fourth configuration (which would leave two with one seed each).
    s = spec(n_trials=6, max_seeds=2, strategy="all")
    judged = Study().add("A", [0.02, 0.03]).add("B", [0.04, 0.05]).judge(s)
    step = plan(judged, s, Usage(search=5, confirmation=0, search_busy=1, unsampled=1))
    assert (step.phase, step.queue, step.new_samples) == ("search", [], 0)
    assert plan(judged, s, Usage(search=5, confirmation=0, search_busy=1)).new_samples == 1
    # racing's first seed is the sample itself: nothing to keep
    racing = spec(n_trials=6, max_seeds=2)
    assert plan(judged, racing, Usage(5, 0, 1, unsampled=1)).new_samples == 1


def test_failed_replicates_are_not_queued_again() -> None:
    s = spec(max_seeds=2)
    study = Study().add("A", [0.02]).add("A", [0.0], state=TrialState.FAIL)
    (c,) = study.judge(s)
    assert c.replicates == 2 and c.n == 1 and seeds_to_queue([c], s, 10) == []


def confirmed_study(held_out: list[float]) -> Study:
    """A picked by the search, B, C, D (each var 2e-6 in sigma and accuracy, df 1) its
    comparable neighbours, and A's held-out seeds."""
    study = Study().add("A", [0.035, 0.036, 0.037])
    for name, x in (("B", 0.030), ("C", 0.020), ("D", 0.025)):
        study.add(name, [x, x + 0.002], [0.800, 0.802])
    return study.add("A", held_out, [TEACHER] * len(held_out), role=Role.CONFIRMATION)


def test_confirmation_on_held_out_seeds_against_hand_computed_bounds() -> None:
    # A's held-out seeds [0.040, 0.044, 0.048] (s^2 1.6e-5, df 2) on the prior from B, C, D
    # alone (s0^2 7.1e-6, d0 4): var (4 * 7.1e-6 + 2 * 1.6e-5) / 6 = 1.00667e-5,
    # sd 0.0031728, df 6, t(0.95, 6) = 1.943180: half 0.0035596, upper 0.0475596 <= 0.05.
    # Accuracy: own var 0, prior 7.1e-6: var 4.7333e-6, sd 0.0021756, se 0.0012561,
    # half 0.0024408: drop upper 0.0024408 <= 0.01. Confirmed.
    s = spec(confirm_seeds=3)
    judged = confirmed_study([0.040, 0.044, 0.048]).judge(s)
    a = by_name(judged)["A"]
    result = confirmation_of(a, judged, s)  # type: ignore[arg-type]
    assert result.sigma is not None and result.drop is not None
    assert result.sigma.mean == pytest.approx(0.044)  # the held-out seeds' mean only
    assert result.sigma.high == pytest.approx(0.0475596, abs=2e-7)
    assert result.drop.high == pytest.approx(0.0024408, abs=2e-7)
    assert result.confirmed and result.trials == [9, 10, 11]
    found = answer(judged, s)
    assert found is not None and found.confirmed and found.config == "A"
    assert (found.sigma, found.trials) == (pytest.approx(0.044), [9, 10, 11])
    assert plan(judged, s, Usage(search=9, confirmation=3, search_busy=0)).phase == "done"


def test_a_noisy_held_out_interval_is_not_confirmed() -> None:
    s = spec(confirm_seeds=3)
    # mean 0.045, own s 0.015 (shrunk to 0.0089 by the prior): upper above kappa
    judged = confirmed_study([0.030, 0.045, 0.060]).judge(s)
    result = confirmation_of(by_name(judged)["A"], judged, s)  # type: ignore[arg-type]
    assert result.sigma is not None and result.sigma.high > 0.05 and not result.confirmed
    # mean 0.030: upper 0.040 within kappa, but +-0.010 is wider than confirm_precision
    # (0.1 * kappa = 0.005): four lucky seeds of a noisy configuration confirm nothing
    judged = confirmed_study([0.015, 0.030, 0.045]).judge(s)
    result = confirmation_of(by_name(judged)["A"], judged, s)  # type: ignore[arg-type]
    assert result.sigma is not None and result.sigma.high == pytest.approx(0.0400188, abs=1e-6)
    assert not result.confirmed
    # the precision rule: within kappa, but +-0.0036 is wider than confirm_precision 0.05
    narrow = spec(confirm_seeds=3, confirm_precision=0.05)
    judged = confirmed_study([0.040, 0.044, 0.048]).judge(narrow)
    result = confirmation_of(by_name(judged)["A"], judged, narrow)  # type: ignore[arg-type]
    assert result.sigma.high <= 0.05 and not result.confirmed  # type: ignore[union-attr]
    found = answer(judged, narrow)
    assert found is None or not found.confirmed


def test_candidates_rank_by_confirmability_not_by_the_lowest_mean() -> None:
    s = spec(confirm_seeds=4)
    study = Study()
    for name, x in (("B", 0.030), ("C", 0.020), ("D", 0.025)):
        study.add(name, [x, x + 0.002, x + 0.001], [0.800, 0.802, 0.801])
    study.add("edge", [0.015, 0.016, 0.017], [0.811, 0.811, 0.811])  # low sigma, drop 0.009
    ranked = [c.config for c in candidates(study.judge(s), s)]
    # B, C, D have drops of 0.019: beyond the limit at their mean, no candidates;
    # "edge" is, its drop 0.009 is inside.
    assert ranked == ["edge"]
    study.add("safe", [0.030, 0.031, 0.032], [0.820, 0.821, 0.819])  # drop 0: far inside
    assert [c.config for c in candidates(study.judge(s), s)] == ["safe", "edge"]


def test_the_confirmation_schedule() -> None:
    # n_trials 30, 3 held-out seeds x 2 candidates: 6 reserved, the search has 24.
    s = spec(n_trials=30, confirm_seeds=3)
    study = Study().add("base", [0.20], [0.5], role=Role.BASELINE)
    study.add("A", [0.035, 0.036, 0.037]).add("B", [0.030, 0.032]).add("C", [0.020, 0.022])
    study.add("D", [0.025, 0.027])
    judged = study.judge(s)
    step = plan(judged, s, Usage(search=10, confirmation=0, search_busy=0))
    assert step.phase == "search" and step.new_samples + len(step.queue) == 14
    # the search's last trial is still running: the candidate waits for it
    assert plan(judged, s, Usage(24, 0, 1)).queue == []
    step = plan(judged, s, Usage(24, 0, 0))
    best = candidates(judged, s)[0].config
    assert step.phase == "confirmation"
    queued = [(q.config.config, q.replicate, q.role) for q in step.queue]
    assert queued == [(best, k, Role.CONFIRMATION) for k in range(3)]
    # a resumed study whose candidate has 2 of its 3 held-out seeds made: the third
    resumed = Study()
    resumed.records = list(study.records)
    resumed.counts = dict(study.counts)
    resumed.add(best, [0.03, 0.031], role=Role.CONFIRMATION)
    step = plan(resumed.judge(s), s, Usage(24, 2, 0))
    assert [(q.config.config, q.replicate) for q in step.queue] == [(best, 2)]
    # the first candidate fails on its held-out seeds: the next one is tried
    failed = Study()
    failed.records, failed.counts = list(study.records), dict(study.counts)
    failed.add(best, [0.060, 0.061, 0.062], role=Role.CONFIRMATION)
    judged_failed = failed.judge(s)
    step = plan(judged_failed, s, Usage(24, 3, 0))
    following = candidates(judged_failed, s)[0].config
    assert step.phase == "confirmation" and following != best
    assert {q.config.config for q in step.queue} == {following}
    found = answer(judged_failed, s)
    assert found is not None and not found.confirmed  # the best candidate, not confirmed


def test_no_candidate_gives_one_confirmation_back_to_the_search() -> None:
    s = spec(n_trials=30, confirm_seeds=3)
    study = Study().add("base", [0.20], [0.5], role=Role.BASELINE).add("far", [0.09, 0.091])
    judged = study.judge(s)
    assert candidates(judged, s) == []
    step = plan(judged, s, Usage(24, 0, 0))
    assert step.phase == "search" and step.new_samples + len(step.queue) == 3
    # both confirmations' reserves given back and spent: done
    assert plan(judged, s, Usage(30, 0, 0)).phase == "done"


@pytest.mark.parametrize(
    ("replicates", "message"),
    [
        ({"max_seeds": 0}, "replicates.max_seeds: got 0"),
        ({"max_seeds": 2, "initial_seeds": 3}, "initial_seeds 3 must not exceed max_seeds 2"),
        ({"strategy": "best"}, "replicates.strategy: 'best' is not allowed"),
        ({"confidence": 1.5}, "replicates.confidence: got 1.5"),
        ({"seeds": 3}, "replicates.seeds: unknown key"),
        ({"confirm_seeds": 1}, "confirm_seeds 1 cannot confirm anything"),
    ],
)
def test_bad_replicates_values_are_refused(replicates: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(".", r"\.")):
        spec(**replicates)
    assert ReplicatesSpec().max_seeds == 1  # off unless asked for


def test_a_reserve_beyond_the_budget_is_refused() -> None:
    with pytest.raises(SpecError, match="n_trials"):
        spec(n_trials=10, confirm_seeds=5)  # 10 reserved of 10


def test_the_harness_drives_the_rules_and_separates_them() -> None:
    """A small run of ``experiments/answer_reliability.py`` (seeded: deterministic): the
    previous rule answers less often than the shipped one where answers are clear, and
    no confirmed answer is truly infeasible."""
    rows = {r.rule: r for r in run(["sst2-clear"], [40], ["previous", "confirmed"], 40)}
    assert rows["confirmed"].answered > rows["previous"].answered
    assert rows["confirmed"].wrong_of_studies == 0.0
    assert abs(rows["confirmed"].sigma_bias) < 0.001
    assert rows["confirmed"].confirmation_trials > 0


def test_the_index_keeps_the_shortlists_and_plans_what_a_full_pass_plans() -> None:
    """``ConfigurationIndex`` keeps the open, feasible and tried configurations as trials
    arrive (the claim's O(changes) path); after every trial they, the verdicts and the
    claim's plan (``limit=1``) must equal a full pass over the same records."""
    import random

    from kdsearch.service.racing import ConfigurationIndex, Shortlists

    rng = random.Random(3)
    s = spec(n_trials=400, confirm_seeds=2, confirm_candidates=2)
    index = ConfigurationIndex(s)
    records: list[TrialRecord] = []
    means = {f"c{i}": rng.choice([0.03, 0.045, 0.05, 0.06, 0.12]) for i in range(40)}
    seen: dict[tuple[str, Role], int] = {}
    running: list[int] = []
    for step in range(260):
        if running and rng.random() < 0.5:  # a running trial finishes (or its worker dies)
            i = running.pop(rng.randrange(len(running)))
            old = records[i]
            state = TrialState.COMPLETE if rng.random() < 0.9 else TrialState.FAIL
            done = state == TrialState.COMPLETE
            sigma = max(rng.gauss(means[old.config], 0.003), 0.001) if done else None
            accuracy = rng.gauss(TEACHER - 0.004, 0.003) if done else None
            records[i] = synthetic_record(
                i, old.config, old.role, old.replicate, old.seed, state, sigma, accuracy
            )
        else:  # a new trial starts: a configuration's next seed, search or held out
            config = f"c{rng.randrange(40)}"
            role = Role.CONFIRMATION if rng.random() < 0.1 else Role.SEARCH
            k = seen.get((config, role), 0)
            seen[(config, role)] = k + 1
            seed = (confirmation_seed if role == Role.CONFIRMATION else replicate_seed)(7, k)
            records.append(
                synthetic_record(len(records), config, role, k, seed, TrialState.RUNNING)
            )
            i = len(records) - 1
            running.append(i)
        index.update_many([records[i]])
        kept = index.judge(TEACHER, 872)
        full = aggregate(records, s, TEACHER)
        assert [(c.config, c.verdict) for c in kept] == [(c.config, c.verdict) for c in full]
        lists, expected = kept.shortlists, Shortlists.of(full.configurations, s)
        assert lists is not None
        for name in ("open", "feasible", "tried"):
            got = [c.config for c in getattr(lists, name)]
            want = [c.config for c in getattr(expected, name)]
            assert (sorted(got) if name == "feasible" else got) == (
                sorted(want) if name == "feasible" else want
            ), (step, name)
        usage = Usage(search=len(records), confirmation=0, search_busy=len(running))
        fast, slow = plan(kept, s, usage, limit=1), plan(full, s, usage)
        assert fast.phase == slow.phase
        assert [(q.config.config, q.replicate) for q in fast.queue] == [
            (q.config.config, q.replicate) for q in slow.queue[:1]
        ], step
        if not slow.queue:
            assert fast.new_samples == slow.new_samples
    assert lists.open and lists.feasible and lists.tried  # every list was exercised
