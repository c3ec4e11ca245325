"""The racing rule as it was before issue 23 (service/racing.py at e1e803d), frozen for
``experiments/answer_reliability.py`` to compare against: one noise estimate pooled over
every configuration with two seeds, intervals and verdicts from it (also on one seed), the
answer = the feasible configuration with the lowest upper bound of sigma, reported from the
seeds that selected it. Verbatim but for the imports; do not edit."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from optuna.trial import TrialState

from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import StudySpec
from kdsearch.service.trial_config import config_id

Verdict = Literal["feasible", "infeasible", "uncertain"]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class Noise:
    """The pooled seed-to-seed standard deviations, and their degrees of freedom."""

    sigma_sd: float
    drop_sd: float
    df: int


@dataclass(frozen=True)
class Configuration:
    """One configuration and what its finished replicates say."""

    config: str
    params: dict[str, Any]
    baseline: bool
    trials: list[int]  # finished (COMPLETE) replicates
    seeds: list[int]
    sigmas: list[float]
    drops: list[float]
    replicates: int  # replicates made so far, finished or not (the next one's index)
    pending: int  # replicates queued or running
    pruned: bool  # its first replicate was pruned: no more seeds
    sigma: Interval | None = None
    drop: Interval | None = None
    verdict: Verdict = "uncertain"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def sigma_mean(self) -> float:
        return _mean(self.sigmas)

    @property
    def drop_mean(self) -> float:
        return _mean(self.drops)

    @property
    def sigma_sd(self) -> float | None:
        return _sd(self.sigmas)

    @property
    def drop_sd(self) -> float | None:
        return _sd(self.drops)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof = 1); None below two values."""
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pooled_noise(groups: Sequence[tuple[Sequence[float], Sequence[float]]]) -> Noise | None:
    """The pooled within-group sd of sigma and of the drop over ``(sigmas, drops)`` groups
    of two or more values; None when no group has two."""
    df = sum(len(s) - 1 for s, _ in groups if len(s) >= 2)
    if df == 0:
        return None

    def pooled(index: int) -> float:
        total = 0.0
        for group in groups:
            values = group[index]
            if len(values) >= 2:
                mean = _mean(values)
                total += sum((v - mean) ** 2 for v in values)
        return math.sqrt(total / df)

    return Noise(pooled(0), pooled(1), df)


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def _interval(values: Sequence[float], sd: float, df: int, confidence: float) -> Interval:
    mean = _mean(values)
    half = _t_quantile((1 + confidence) / 2, df) * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def verdict_of(sigma: Interval, drop: Interval, sigma_max: float, drop_max: float) -> Verdict:
    if sigma.high <= sigma_max and drop.high <= drop_max:
        return "feasible"
    if sigma.low > sigma_max or drop.low > drop_max:
        return "infeasible"
    return "uncertain"


def aggregate(records: Sequence[TrialRecord], spec: StudySpec) -> list[Configuration]:
    """Every configuration of the study, with its aggregates and verdict, in the order
    its first replicate was made."""
    groups: dict[str, list[TrialRecord]] = {}
    for record in sorted(records, key=lambda r: r.number):
        if not record.params:
            continue  # failed before its hyperparameters were drawn
        key = record.config or config_id(record.params)
        groups.setdefault(key, []).append(record)
    raw = []
    for key, members in groups.items():
        # A degenerate replicate (no train input right for both models: sigma undefined)
        # is a finished run of its configuration, infinitely bad in sigma.
        done = [
            r
            for r in members
            if (r.state == TrialState.COMPLETE and r.values)
            or (r.degenerate and r.outcome is not None)
        ]
        sigmas = [_sigma(r) for r in done]
        raw.append(
            Configuration(
                config=key,
                params=dict(members[0].params),
                baseline=any(r.baseline for r in members),
                trials=[r.number for r in done],
                seeds=[r.seed if r.seed is not None else spec.seed for r in done],
                sigmas=sigmas,
                drops=[r.values[1] if r.values else r.outcome.accuracy_drop for r in done],  # type: ignore[union-attr]
                replicates=max(r.replicate for r in members) + 1,
                pending=sum(r.state in (TrialState.WAITING, TrialState.RUNNING) for r in members),
                pruned=any(r.state == TrialState.PRUNED and r.replicate == 0 for r in members),
            )
        )
    finite = [(c.sigmas, c.drops) for c in raw if all(math.isfinite(s) for s in c.sigmas)]
    noise = pooled_noise(finite)
    return [_judge(c, spec, noise) for c in raw]


def _sigma(r: TrialRecord) -> float:
    """A finished replicate's sigma; undefined (NaN, or a degenerate run) is infinite."""
    sigma = r.values[0] if r.values else math.nan
    return math.inf if math.isnan(sigma) else sigma


def _judge(c: Configuration, spec: StudySpec, noise: Noise | None) -> Configuration:
    limits = spec.thresholds
    if c.n == 0:
        verdict: Verdict = "infeasible" if c.pruned else "uncertain"
        return dataclasses.replace(c, verdict=verdict)
    if not all(math.isfinite(s) for s in c.sigmas):
        return dataclasses.replace(c, verdict="infeasible")
    if spec.replicates.max_seeds == 1 or noise is None:
        point = Interval(c.sigma_mean, c.sigma_mean, c.sigma_mean)
        drop = Interval(c.drop_mean, c.drop_mean, c.drop_mean)
        # No replicates: the point estimate decides, as the trial's constraints do.
        # Replicates, but no noise estimate yet: nothing is decided.
        verdict = (
            verdict_of(point, drop, limits.sigma_max, limits.accuracy_drop_max)
            if spec.replicates.max_seeds == 1
            else "uncertain"
        )
        return dataclasses.replace(c, verdict=verdict)
    confidence = spec.replicates.confidence
    sigma = _interval(c.sigmas, noise.sigma_sd, noise.df, confidence)
    drop = _interval(c.drops, noise.drop_sd, noise.df, confidence)
    verdict = verdict_of(sigma, drop, limits.sigma_max, limits.accuracy_drop_max)
    return dataclasses.replace(c, sigma=sigma, drop=drop, verdict=verdict)


def dominated(c: Configuration, by: Sequence[Configuration]) -> bool:
    """Some confirmed-feasible other configuration is better in both objectives even at
    its worst (upper bounds) than ``c`` at its best (lower bounds)."""
    if c.sigma is None or c.drop is None:
        return False
    for other in by:
        if other.config == c.config or other.sigma is None or other.drop is None:
            continue
        if (
            other.sigma.high <= c.sigma.low
            and other.drop.high <= c.drop.low
            and (other.sigma.high < c.sigma.low or other.drop.high < c.drop.low)
        ):
            return True
    return False


def seeds_to_queue(
    configs: Sequence[Configuration], spec: StudySpec, free_slots: int
) -> list[tuple[Configuration, int]]:
    """The replicates to queue now, as (configuration, replicate index), at most
    ``free_slots``: the baseline first, then by mean sigma."""
    reps = spec.replicates
    if reps.max_seeds == 1 or free_slots <= 0:
        return []
    feasible = [c for c in configs if c.verdict == "feasible"]
    order = sorted(configs, key=lambda c: (not c.baseline, c.sigma_mean if c.n else math.inf))
    queue: list[tuple[Configuration, int]] = []
    for c in order:
        if c.pruned or c.replicates >= reps.max_seeds:
            continue
        if reps.strategy == "all" or c.replicates < reps.initial_seeds:
            target = reps.max_seeds if reps.strategy == "all" else reps.initial_seeds
            wanted = list(range(c.replicates, target))
        elif c.pending or c.n == 0 or c.verdict == "infeasible" or dominated(c, feasible):
            continue
        else:
            wanted = [c.replicates]  # racing: one more seed at a time
        for k in wanted:
            if len(queue) >= free_slots:
                return queue
            queue.append((c, k))
    return queue


def best_configuration(configs: Sequence[Configuration]) -> Configuration | None:
    """The answer a study gives: the confirmed-feasible configuration with the lowest
    upper bound of sigma (ties: of the drop, then the means). Ranking by the mean would
    favour the configurations with the fewest seeds, whose means are the least certain
    (the lowest of many noisy means is biased low); the upper bound is what the
    configuration is shown to keep. Without intervals (``max_seeds: 1``), the means."""

    def key(c: Configuration) -> tuple[float, ...]:
        sigma = c.sigma.high if c.sigma is not None else c.sigma_mean
        drop = c.drop.high if c.drop is not None else c.drop_mean
        return (sigma, drop, c.sigma_mean, c.drop_mean)

    return min((c for c in configs if c.verdict == "feasible"), key=key, default=None)
