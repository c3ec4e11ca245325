"""Seed replicates on synthetic trials: aggregates against hand-computed values, verdicts,
and racing's decisions (pure functions: no database)."""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

from kdsearch.service.racing import (
    aggregate,
    best_configuration,
    config_id,
    pooled_noise,
    replicate_seed,
    seeds_to_queue,
)
from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import ReplicatesSpec, StudySpec, spec_from_dict

SPEC = {
    "name": "r",
    "task": "sst2",
    "data": {"source": "hub"},
    "teacher": {"model": "org/teacher"},
    "student": {"model": "org/student"},
    "n_trials": 50,
    "seed": 7,
}


def spec(**replicates: object) -> StudySpec:
    return spec_from_dict({**SPEC, "replicates": replicates}, source="test")


def trial(
    number: int,
    lr: float,
    sigma: float | None = None,
    drop: float = 0.0,
    replicate: int = 0,
    state: TrialState = TrialState.COMPLETE,
    baseline: bool = False,
) -> TrialRecord:
    params = {"learning_rate": lr}
    return TrialRecord(
        number=number, state=state, params=params,
        values=(sigma, drop) if sigma is not None else None, constraints=None,
        baseline=baseline, config=config_id(params), replicate=replicate,
        seed=replicate_seed(7, replicate), attempt=0, retry_of=None, retry_reason=None,
        hyperparameters=None, worker_host=None, device=None, precision=None, probes=[],
        progress=None, pruned_by=None, error=None, failure=None, artifacts={}, tracking={},
        outcome=None,
    )  # fmt: skip


def test_replicate_seeds_are_the_same_list_for_every_configuration() -> None:
    seeds = [replicate_seed(7, k) for k in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [replicate_seed(7, k) for k in range(4)]  # stable
    assert config_id({"a": 1, "b": 2.5}) == config_id({"b": 2.5, "a": 1})


def test_aggregates_match_hand_computed_values() -> None:
    records = [
        trial(0, 1e-3, 0.04, 0.00, 0), trial(1, 1e-3, 0.05, 0.01, 1), trial(2, 1e-3, 0.06, 0.02, 2),
        trial(3, 2e-3, 0.03, 0.00, 0), trial(4, 2e-3, 0.05, 0.00, 1),
    ]  # fmt: skip
    a, b = aggregate(records, spec(max_seeds=3, confidence=0.9))
    assert (a.n, a.seeds, a.replicates) == (3, [replicate_seed(7, k) for k in range(3)], 3)
    assert a.sigma_mean == pytest.approx(0.05) and a.sigma_sd == pytest.approx(0.01)
    assert b.sigma_mean == pytest.approx(0.04) and b.drop_sd == pytest.approx(0.0)
    # pooled: (0.0002 + 0.0002) / (2 + 1) for sigma; t(0.95, df=3) = 2.353363
    noise = pooled_noise([(a.sigmas, a.drops), (b.sigmas, b.drops)])
    assert noise is not None and noise.df == 3
    assert noise.sigma_sd == pytest.approx(0.011547005, rel=1e-6)
    assert noise.drop_sd == pytest.approx(0.008164966, rel=1e-6)
    assert a.sigma is not None and a.drop is not None and b.sigma is not None
    assert (a.sigma.low, a.sigma.high) == pytest.approx((0.05 - 0.015689090, 0.05 + 0.015689090))
    assert (a.drop.low, a.drop.high) == pytest.approx((0.01 - 0.011093862, 0.01 + 0.011093862))
    assert (b.sigma.low, b.sigma.high) == pytest.approx((0.04 - 0.019215132, 0.04 + 0.019215132))
    # A's sigma interval straddles kappa = 0.05: uncertain; B's too (upper 0.059)
    assert (a.verdict, b.verdict) == ("uncertain", "uncertain")


def test_verdicts_from_the_bounds() -> None:
    noise = [trial(0, 1e-3, 0.020, 0.0, 0), trial(1, 1e-3, 0.022, 0.0, 1)]  # tight noise
    configs = aggregate(
        [*noise, trial(2, 2e-3, 0.10, 0.0), trial(3, 3e-3, 0.021, 0.0), trial(4, 4e-3, 0.049, 0.0)],
        spec(max_seeds=3),
    )
    verdicts = {c.params["learning_rate"]: c.verdict for c in configs}
    # sd 0.0014 (df 1): one seed's interval is +-0.0089 at 90%
    assert verdicts == {1e-3: "feasible", 2e-3: "infeasible", 3e-3: "feasible", 4e-3: "uncertain"}


def test_without_a_noise_estimate_nothing_is_decided() -> None:
    configs = aggregate([trial(0, 1e-3, 0.001), trial(1, 2e-3, 0.9)], spec(max_seeds=3))
    assert [c.verdict for c in configs] == ["uncertain", "uncertain"]
    # ...while a single-seed study decides on the point estimate, as Optuna's constraints
    single = aggregate([trial(0, 1e-3, 0.001), trial(1, 2e-3, 0.9)], spec())
    assert [c.verdict for c in single] == ["feasible", "infeasible"]


def test_nan_sigma_and_pruned_first_seeds_are_infeasible() -> None:
    configs = aggregate(
        [trial(0, 1e-3, math.nan), trial(1, 2e-3, state=TrialState.PRUNED)], spec(max_seeds=3)
    )
    assert [c.verdict for c in configs] == ["infeasible", "infeasible"]
    assert seeds_to_queue(configs, spec(max_seeds=3), 10) == []


def test_racing_queues_seeds_only_where_the_answer_is_open() -> None:
    s = spec(max_seeds=3)
    records = [
        trial(0, 1e-3, 0.020, 0.0, 0, baseline=True), trial(1, 1e-3, 0.022, 0.0, 1),  # feasible
        trial(2, 2e-3, 0.10, 0.0),  # clearly infeasible
        trial(3, 3e-3, 0.049, -0.02),  # uncertain: straddles kappa, best drop of all
        trial(4, 4e-3, 0.045, 0.0), trial(5, 4e-3, state=TrialState.RUNNING, replicate=1),
        trial(6, 5e-3, 0.040, 0.005),  # feasible, but worse than the baseline even at its best
        trial(7, 6e-3, 0.021, 0.0), trial(8, 6e-3, 0.019, 0.0, 1), trial(9, 6e-3, 0.020, 0.0, 2),
    ]  # fmt: skip
    configs = {c.params["learning_rate"]: c for c in aggregate(records, s)}
    queued = [
        (c.params["learning_rate"], k) for c, k in seeds_to_queue(list(configs.values()), s, 10)
    ]
    # the baseline (feasible, could be on the front) first, then the uncertain one; not
    # the infeasible, not the one with a seed pending, not the dominated, not the full one
    assert queued == [(1e-3, 2), (3e-3, 1)]
    assert configs[5e-3].verdict == "feasible"  # dominated, so no more seeds all the same
    assert seeds_to_queue(list(configs.values()), s, 1) == [(configs[1e-3], 2)]  # budget-bound
    # the answer: confirmed feasible with the lowest upper bound of sigma
    best = best_configuration(list(configs.values()))
    assert best is not None and best.params == {"learning_rate": 6e-3}


def test_the_answer_is_the_lowest_upper_bound_not_the_luckiest_mean() -> None:
    # The demo's case: a configuration confirmed on 3 seeds against one run once whose
    # single draw is lower. Pooled noise (sd 0.0025) makes both feasible; the one seed's
    # interval is the wider, and its mean the less certain.
    records = [
        trial(0, 1e-3, 0.0440, 0.0, 0), trial(1, 1e-3, 0.0410, 0.0, 1),
        trial(2, 1e-3, 0.0390, 0.0, 2),  # mean 0.0413, 3 seeds
        trial(3, 2e-3, 0.0404, 0.0),  # 0.0404, 1 seed
    ]  # fmt: skip
    configs = {c.params["learning_rate"]: c for c in aggregate(records, spec(max_seeds=3))}
    assert [c.verdict for c in configs.values()] == ["feasible", "feasible"]
    assert configs[2e-3].sigma_mean < configs[1e-3].sigma_mean
    assert configs[2e-3].sigma.high > configs[1e-3].sigma.high  # type: ignore[union-attr]
    best = best_configuration(list(configs.values()))
    assert best is not None and best.params == {"learning_rate": 1e-3}


def test_initial_seeds_and_the_all_strategy() -> None:
    records = [trial(0, 1e-3, 0.3, 0.5)]  # hopeless on its one seed
    initial = spec(max_seeds=4, initial_seeds=2)
    (c,) = aggregate(records, initial)
    assert [k for _, k in seeds_to_queue([c], initial, 10)] == [1]  # its initial second seed
    everything = spec(max_seeds=3, strategy="all")
    assert [k for _, k in seeds_to_queue([c], everything, 10)] == [1, 2]
    assert seeds_to_queue([c], spec(), 10) == []  # no replicates


def test_failed_replicates_are_not_queued_again() -> None:
    s = spec(max_seeds=2)
    records = [trial(0, 1e-3, 0.02), trial(1, 1e-3, replicate=1, state=TrialState.FAIL)]
    (c,) = aggregate(records, s)
    assert c.replicates == 2 and c.n == 1 and seeds_to_queue([c], s, 10) == []


@pytest.mark.parametrize(
    ("replicates", "message"),
    [
        ({"max_seeds": 0}, "replicates.max_seeds: got 0"),
        ({"max_seeds": 2, "initial_seeds": 3}, "initial_seeds 3 must not exceed max_seeds 2"),
        ({"strategy": "best"}, "replicates.strategy: 'best' is not allowed"),
        ({"confidence": 1.5}, "replicates.confidence: got 1.5"),
        ({"seeds": 3}, "replicates.seeds: unknown key"),
    ],
)
def test_bad_replicates_values_are_refused(replicates: dict, message: str) -> None:
    from kdsearch.service.errors import SpecError

    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(".", r"\.")):
        spec(**replicates)
    assert ReplicatesSpec().max_seeds == 1  # off unless asked for
