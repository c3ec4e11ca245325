"""How reliable is the study's answer? A Monte-Carlo harness that drives the shipped
schedule and judgement (``service/racing.aggregate``, ``service/confirmation.plan`` and
``answer``, ``service/claim.usage_of``: the functions ``claim_trial`` runs under its
critical section) trial by trial, with synthetic studies whose true figures are known.

Each simulated study claims trials as ``claim_trial`` does (queue what the plan asks for,
take the oldest queued trial, else sample a new configuration while the plan allows), with
``--workers`` trials in flight at once finishing in random order. A new configuration is
drawn from the scenario's population (a random sampler). Seed noise is shaped like
``docs/experiment-results.md``:

- **trained** configurations: sigma ~ Normal(mean, sd) with sd 0.001-0.0025 (SST-2-like,
  MRPC-like) or log-uniform 0.001-0.05 (``loguniform``); dev accuracy ~ Normal, sd 0.3-0.6
  points, counted in dev rows (872).
- **untrained** configurations, and the baseline (the paper's defaults): bimodal; a seed
  either collapses (sigma ~0.21, accuracy at the majority class) or starts to learn; sd of
  sigma 0.06-0.09.

Rules compared at equal budget: ``previous`` (``experiments/previous_racing.py``, the rule
before issue 23, frozen), ``single`` (one seed per configuration, the answer the feasible
trial with the lowest sigma), ``own-noise`` (the new per-configuration judgement without
held-out seeds: the best candidate, never confirmed) and ``confirmed`` (the shipped rule:
``confirm_seeds`` held-out seeds).

    .venv/bin/python experiments/answer_reliability.py --studies 500 --out table.md
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import previous_racing  # noqa: E402
from kdsearch.service.claim import usage_of  # noqa: E402
from kdsearch.service.confirmation import answer, plan  # noqa: E402
from kdsearch.service.loading import spec_from_dict  # noqa: E402
from kdsearch.service.racing import Judged, aggregate  # noqa: E402
from kdsearch.service.record import TrackingIds, TrialOutcome, TrialRecord  # noqa: E402
from kdsearch.service.spec import StudySpec  # noqa: E402
from kdsearch.service.trial_config import Role, confirmation_seed, replicate_seed  # noqa: E402

logger = logging.getLogger("answer_reliability")

KAPPA = 0.05
DROP_MAX = 0.01
TEACHER = 0.82
N_DEV = 872
MAJORITY = 0.51


# ---------------------------------------------------------------- populations


@dataclass(frozen=True)
class Truth:
    """A configuration's true seed distribution."""

    kind: str  # "trained" | "bimodal"
    sigma_mean: float  # E[sigma] over seeds
    accuracy_mean: float  # E[dev accuracy] over seeds
    sigma_sd: float  # sd of sigma over seeds (the mixture's, when bimodal)
    accuracy_sd: float
    collapse: float = 0.0  # bimodal: P(a seed collapses)
    learn_sigma: float = 0.0  # bimodal: sigma of a seed that learns

    def draw(self, rng: random.Random) -> tuple[float, float]:
        """One seed's (sigma, dev accuracy)."""
        if self.kind == "bimodal":
            if rng.random() < self.collapse:
                sigma, accuracy = rng.gauss(0.21, 0.01), rng.gauss(MAJORITY, 0.004)
            else:
                sigma, accuracy = rng.gauss(self.learn_sigma, 0.01), rng.gauss(0.74, 0.01)
        else:
            sigma = rng.gauss(self.sigma_mean, self.sigma_sd)
            accuracy = rng.gauss(self.accuracy_mean, self.accuracy_sd)
        accuracy = round(min(max(accuracy, 0.0), 1.0) * N_DEV) / N_DEV  # counted in dev rows
        return max(sigma, 0.0005), accuracy


def bimodal(rng: random.Random) -> Truth:
    collapse = rng.uniform(0.25, 0.75)
    learn = rng.uniform(0.06, 0.12)
    mean = collapse * 0.21 + (1 - collapse) * learn
    var = collapse * (1 - collapse) * (0.21 - learn) ** 2 + 0.01**2
    accuracy = collapse * MAJORITY + (1 - collapse) * 0.74
    return Truth("bimodal", mean, accuracy, math.sqrt(var), 0.1, collapse, learn)


@dataclass(frozen=True)
class Scenario:
    """A population of configurations, and the study's thresholds reference."""

    name: str
    sigma_range: tuple[float, float]  # trained configurations' true mean sigma, uniform
    drop_range: tuple[float, float]  # trained configurations' true drop vs the teacher
    sigma_sd: Callable[[random.Random], float]
    untrained: float = 0.3  # share of bimodal (untrained, collapsing) configurations
    reference: str = "teacher"
    description: str = ""

    def baseline(self, rng: random.Random) -> Truth:
        if self.reference == "baseline":  # a baseline that trains: the paper's reading
            return Truth("trained", 0.056, TEACHER - 0.005, 0.002, 0.005)
        return bimodal(rng)

    def draw(self, rng: random.Random) -> Truth:
        if rng.random() < self.untrained:
            return bimodal(rng)
        return Truth(
            "trained",
            rng.uniform(*self.sigma_range),
            TEACHER - rng.uniform(*self.drop_range),
            self.sigma_sd(rng),
            rng.uniform(0.003, 0.006),
        )


def _sst2_sd(rng: random.Random) -> float:
    return rng.uniform(0.001, 0.0025)


def _loguniform_sd(rng: random.Random) -> float:
    return math.exp(rng.uniform(math.log(0.001), math.log(0.05)))


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("sst2-clear", (0.035, 0.085), (-0.01, 0.03), _sst2_sd,
                 description="SST-2-like noise, some configurations clearly feasible"),
        Scenario("sst2-near", (0.045, 0.085), (-0.01, 0.03), _sst2_sd,
                 description="SST-2-like noise, the best within +-0.005 of kappa"),
        Scenario("sst2-none", (0.052, 0.09), (-0.01, 0.03), _sst2_sd,
                 description="SST-2-like noise, no configuration feasible"),
        Scenario("loguniform-clear", (0.035, 0.085), (-0.01, 0.03), _loguniform_sd,
                 description="sigma sd log-uniform 0.001-0.05, some clearly feasible"),
        Scenario("loguniform-near", (0.045, 0.085), (-0.01, 0.03), _loguniform_sd,
                 description="sigma sd log-uniform 0.001-0.05, the best near kappa"),
        Scenario("baseline-ref", (0.035, 0.085), (-0.01, 0.03), _sst2_sd,
                 reference="baseline",
                 description="drops against a trained baseline's mean (the paper's reading)"),
    ]
}  # fmt: skip


def truly_feasible(truth: Truth, reference: float) -> bool:
    return truth.sigma_mean <= KAPPA and reference - truth.accuracy_mean <= DROP_MAX


def margin_sds(truth: Truth, reference: float) -> float:
    """How far inside both thresholds, in the configuration's own seed sds (the smaller)."""
    drop = reference - truth.accuracy_mean
    return min((KAPPA - truth.sigma_mean) / truth.sigma_sd, (DROP_MAX - drop) / truth.accuracy_sd)


# ---------------------------------------------------------------- one study


def study_spec(rule: str, budget: int, scenario: Scenario, confirm_seeds: int) -> StudySpec:
    replicates: dict[str, Any] = {"initial_seeds": 1, "max_seeds": 3, "confidence": 0.9}
    if rule == "single":
        replicates = {"max_seeds": 1}
    elif rule == "confirmed":
        replicates |= {"confirm_seeds": confirm_seeds, "confirm_candidates": 2}
    raw = {
        "name": "sim",
        "task": "sst2",
        "data": {"source": "hub"},
        "teacher": {"model": "org/teacher"},
        "student": {"model": "org/student"},
        "n_trials": budget,
        "seed": 7,
        # nothing is sampled from it: the harness draws configurations from the population
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
        "thresholds": {"sigma_max": KAPPA, "accuracy_drop_max": DROP_MAX,
                       "accuracy_reference": scenario.reference},
        "replicates": replicates,
    }  # fmt: skip
    return spec_from_dict(raw, source="answer_reliability")


_OUTCOME_TEMPLATE: dict[str, Any] = {name: 0.0 for name in TrialOutcome.REQUIRED} | {
    "epoch_losses": [0.0],
    "train_sigma_per_class": [0.0],
    "dev_sigma_per_class": [0.0],
    "dev_n_total": N_DEV,
    "teacher_dev_accuracy": TEACHER,
}


def synthetic_record(
    number: int,
    config: str,
    role: Role,
    replicate: int,
    seed: int,
    state: TrialState = TrialState.WAITING,
    sigma: float | None = None,
    accuracy: float | None = None,
    drop: float | None = None,
) -> TrialRecord:
    """A trial as ``TrialRecord.of`` reads it back: queued (no figures) or finished."""
    outcome = None
    values = None
    if sigma is not None and accuracy is not None:
        drop = TEACHER - accuracy if drop is None else drop
        outcome = TrialOutcome(
            **_OUTCOME_TEMPLATE
            | {"sigma": sigma, "accuracy_drop": drop, "student_dev_accuracy": accuracy}
        )
        values = (sigma, drop)
    return TrialRecord(
        number=number, state=state, params={"config": config}, values=values,
        constraints=None, role=role, config=config, replicate=replicate, seed=seed, attempt=0,
        retry_of=None, retry_reason=None, trial_config=None, hyperparameters=None,
        worker_host=None, device=None, precision=None, probes=[], progress=None,
        pruned_by=None, error=None, failure=None, artifacts={}, tracking=TrackingIds(),
        outcome=outcome,
    )  # fmt: skip


@dataclass
class Result:
    """One simulated study's answer, against the truth."""

    answered: bool = False
    confirmed: bool = False
    wrong: bool = False  # the answer is truly infeasible
    sigma_error: float = math.nan  # reported sigma - true sigma
    drop_error: float = math.nan
    configurations: int = 0
    trials: int = 0
    confirmation_trials: int = 0
    best_margin: float = -math.inf  # the best tried configuration's margin, in its sds
    population_margin: bool = False  # some tried configuration is feasible by >= 1 sd
    coverage: list[tuple[int, bool]] = field(default_factory=list)  # (seeds, covered)


class Simulation:
    """A study claimed trial by trial as ``claim_trial`` does, on synthetic figures."""

    def __init__(self, scenario: Scenario, spec: StudySpec, rng: random.Random, workers: int):
        self.scenario, self.spec, self.rng, self.workers = scenario, spec, rng, workers
        self.records: list[TrialRecord] = []
        self.truth: dict[str, Truth] = {"baseline": scenario.baseline(rng)}
        self.running: list[int] = []
        # the baseline is queued at creation, as ``create_or_attach`` does
        self._add("baseline", Role.BASELINE, 0)

    @property
    def reference(self) -> float:
        if self.spec.thresholds.accuracy_reference == "baseline":
            return self.truth["baseline"].accuracy_mean
        return TEACHER

    def _add(self, config: str, role: Role, replicate: int) -> None:
        seed = (confirmation_seed if role == Role.CONFIRMATION else replicate_seed)(7, replicate)
        self.records.append(synthetic_record(len(self.records), config, role, replicate, seed))

    def judge(self) -> Judged:
        return aggregate(self.records, self.spec, TEACHER)

    def claim(self, judge: Callable[[], Any], schedule: Callable[[Any], tuple[list, int]]) -> bool:
        """One claim: queue what the schedule asks for, take the oldest queued trial or
        sample a new one; False when nothing can be taken now."""
        if self.spec.thresholds.accuracy_reference == "baseline" and not any(
            r.baseline and r.outcome is not None for r in self.records
        ):  # the baseline gate: nothing but the baseline runs before its first seed ends
            waiting = [r for r in self.records if r.state == TrialState.WAITING and r.baseline]
            if not waiting:
                return False
            self._start(waiting[0].number)
            return True
        queue, new_samples = schedule(judge())
        for config, replicate, role in queue:
            self._add(config, role, replicate)
        waiting = [r for r in self.records if r.state == TrialState.WAITING]
        if waiting:
            self._start(waiting[0].number)
            return True
        if new_samples <= 0:
            return False
        key = f"c{len(self.truth)}"
        self.truth[key] = self.scenario.draw(self.rng)
        self._add(key, Role.SEARCH, 0)
        self._start(len(self.records) - 1)
        return True

    def _start(self, number: int) -> None:
        self.records[number] = dataclasses.replace(self.records[number], state=TrialState.RUNNING)
        self.running.append(number)

    def finish_one(self) -> None:
        number = self.running.pop(self.rng.randrange(len(self.running)))
        r = self.records[number]
        sigma, accuracy = self.truth[r.config].draw(self.rng)
        # A trial's recorded drop is against the reference known when it finished (the
        # previous rule used these values; the new one re-derives drops from accuracies).
        baseline = [x.outcome.student_dev_accuracy for x in self.records
                    if x.baseline and x.outcome is not None]  # fmt: skip
        reference = (
            baseline[0]
            if self.spec.thresholds.accuracy_reference == "baseline" and baseline
            else TEACHER
        )
        if r.baseline and not baseline and self.spec.thresholds.accuracy_reference == "baseline":
            reference = accuracy
        seed = r.seed if r.seed is not None else 7
        self.records[number] = synthetic_record(
            number, r.config, r.role, r.replicate, seed, TrialState.COMPLETE,
            sigma, accuracy, reference - accuracy,
        )  # fmt: skip

    def run(self, judge: Callable[[], Any], schedule: Callable[[Any], tuple[list, int]]) -> None:
        while True:
            while len(self.running) < self.workers and self.claim(judge, schedule):
                pass
            if not self.running:
                return
            self.finish_one()


def _new_schedule(
    spec: StudySpec, records: list[TrialRecord]
) -> Callable[[Judged], tuple[list, int]]:
    def schedule(judged: Judged) -> tuple[list, int]:
        step = plan(judged, spec, usage_of(records))
        return [(q.config.config, q.replicate, q.role) for q in step.queue], step.new_samples

    return schedule


def _previous_schedule(
    spec: StudySpec, records: list[TrialRecord]
) -> Callable[[list], tuple[list, int]]:
    def schedule(configs: list) -> tuple[list, int]:
        free = spec.n_trials - len(records)
        queue = previous_racing.seeds_to_queue(configs, spec, free)
        roles = [Role.BASELINE if c.baseline else Role.SEARCH for c, _ in queue]
        return [(c.config, k, role) for (c, k), role in zip(queue, roles, strict=True)], free - len(
            queue
        )

    return schedule


def simulate(
    rule: str, scenario: Scenario, budget: int, seed: int, workers: int, confirm_seeds: int
) -> Result:
    spec = study_spec(rule, budget, scenario, confirm_seeds)
    sim = Simulation(scenario, spec, random.Random(seed), workers)
    if rule == "previous":
        sim.run(
            lambda: previous_racing.aggregate(sim.records, spec),
            _previous_schedule(spec, sim.records),
        )
    else:
        sim.run(sim.judge, _new_schedule(spec, sim.records))
    return evaluate(rule, sim)


def evaluate(rule: str, sim: Simulation) -> Result:
    spec, reference = sim.spec, sim.reference
    result = Result(trials=len(sim.records))
    result.confirmation_trials = sum(r.confirmation for r in sim.records)
    tried = {r.config for r in sim.records if r.config != "baseline"}
    result.configurations = len(tried)
    margins = [margin_sds(sim.truth[c], reference) for c in tried if sim.truth[c].kind == "trained"]
    result.best_margin = max(margins, default=-math.inf)
    result.population_margin = result.best_margin >= 1.0
    if rule == "previous":
        configs = previous_racing.aggregate(sim.records, spec)
        best = previous_racing.best_configuration(configs)
        for c in configs:
            if c.sigma is not None:
                truth = sim.truth[c.config]
                result.coverage.append((c.n, c.sigma.low <= truth.sigma_mean <= c.sigma.high))
        if best is not None:
            truth = sim.truth[best.config]
            result.answered = True
            result.wrong = not truly_feasible(truth, reference)
            result.sigma_error = best.sigma_mean - truth.sigma_mean
            result.drop_error = best.drop_mean - (reference - truth.accuracy_mean)
        return result
    judged = sim.judge()
    for c in judged:
        if c.sigma is not None and not c.baseline:
            truth = sim.truth[c.config]
            result.coverage.append((c.n, c.sigma.low <= truth.sigma_mean <= c.sigma.high))
    found = answer(judged, spec)
    if found is not None and (found.confirmed or rule in ("single", "own-noise")):
        truth = sim.truth[found.config]
        result.answered = True
        result.confirmed = found.confirmed
        result.wrong = not truly_feasible(truth, reference)
        result.sigma_error = found.sigma - truth.sigma_mean
        result.drop_error = found.accuracy_drop - (reference - truth.accuracy_mean)
    return result


# ---------------------------------------------------------------- the table


RULES = ("previous", "single", "own-noise", "confirmed")


@dataclass
class Row:
    scenario: str
    budget: int
    rule: str
    studies: int
    answered: float
    wrong_of_studies: float
    wrong_of_answers: float
    answered_with_margin: float  # among studies that tried a configuration feasible by >= 1 sd
    sigma_bias: float
    drop_bias: float
    configurations: float
    confirmation_trials: float
    coverage: dict[int, tuple[float, int]]


def summarise(scenario: str, budget: int, rule: str, results: Sequence[Result]) -> Row:
    answered = [r for r in results if r.answered]
    with_margin = [r for r in results if r.population_margin]
    coverage: dict[int, list[bool]] = defaultdict(list)
    for r in results if rule != "single" else ():  # single seed: no intervals
        for n, covered in r.coverage:
            coverage[min(n, 3)].append(covered)
    return Row(
        scenario=scenario,
        budget=budget,
        rule=rule,
        studies=len(results),
        answered=len(answered) / len(results),
        wrong_of_studies=sum(r.wrong for r in answered) / len(results),
        wrong_of_answers=sum(r.wrong for r in answered) / len(answered) if answered else math.nan,
        answered_with_margin=(
            sum(r.answered for r in with_margin) / len(with_margin) if with_margin else math.nan
        ),
        sigma_bias=statistics.fmean(r.sigma_error for r in answered) if answered else math.nan,
        drop_bias=statistics.fmean(r.drop_error for r in answered) if answered else math.nan,
        configurations=statistics.fmean(r.configurations for r in results),
        confirmation_trials=statistics.fmean(r.confirmation_trials for r in results),
        coverage={n: (sum(v) / len(v), len(v)) for n, v in sorted(coverage.items())},
    )


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| scenario | budget | rule | answered | truly infeasible (of studies) | "
        "truly infeasible (of answers) | answered, a config feasible by >= 1 sd tried | "
        "sigma bias | drop bias | configs tried | held-out trials | "
        "interval coverage n=1 / 2 / 3 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        cov = " / ".join(f"{_pct(r.coverage[n][0])}" if n in r.coverage else "-" for n in (1, 2, 3))
        lines.append(
            f"| {r.scenario} | {r.budget} | {r.rule} | {_pct(r.answered)} | "
            f"{_pct(r.wrong_of_studies)} | {_pct(r.wrong_of_answers)} | "
            f"{_pct(r.answered_with_margin)} | {r.sigma_bias:+.4f} | {r.drop_bias:+.4f} | "
            f"{r.configurations:.1f} | {r.confirmation_trials:.1f} | {cov} |"
        )
    return head + "\n".join(lines) + "\n"


def run(
    scenarios: Sequence[str], budgets: Sequence[int], rules: Sequence[str], studies: int,
    workers: int = 1, confirm_seeds: int = 6, seed: int = 0,
) -> list[Row]:  # fmt: skip
    rows = []
    for name in scenarios:
        scenario = SCENARIOS[name]
        for budget in budgets:
            for rule in rules:
                start = time.perf_counter()
                results = [
                    simulate(rule, scenario, budget, seed * 1_000_003 + i, workers, confirm_seeds)
                    for i in range(studies)
                ]  # the same study seeds for every rule: the same populations drawn
                rows.append(summarise(name, budget, rule, results))
                logger.info(
                    "%s budget %d %s: %d studies in %.0f s", name, budget, rule, studies,
                    time.perf_counter() - start,
                )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[24, 40, 60])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--confirm-seeds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = run(args.scenarios, args.budgets, args.rules, args.studies, args.workers,
               args.confirm_seeds, args.seed)  # fmt: skip
    text = table(rows)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
