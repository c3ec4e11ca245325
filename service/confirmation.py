"""The study's answer, confirmed on held-out seeds. Pure functions of judged
configurations (``service/racing.py``) and the spec: no database, no clock.

Picking the best of ~20 noisy configurations and reporting it from the seeds that picked
it overstates it (the winner's curse), and re-judging each configuration after every
seed multiplies the chances to call a lucky one feasible. So the search only nominates:

- ``replicates.confirm_seeds`` (k) and ``confirm_candidates`` (m) reserve ``k * m`` trials
  of the budget up front. The search spends the rest; then its best **candidate** (the
  feasible configuration with the lowest upper bound of sigma, else the most promising
  open one) runs on k **held-out seeds** (``confirmation_seed``), seeds no search
  replicate of any configuration uses.
- The candidates are ranked by ``confirmability``: how many held-out standard errors
  inside both thresholds the search's means are (on their own noise).
- The candidate is **confirmed** when the intervals of its held-out seeds alone are within
  both thresholds and sigma's is narrow enough (``confirm_precision``): the mean of those
  seeds, their own variance shrunk toward the prior fitted to the other comparable
  configurations (``racing.fit_prior``; its own search seeds are left out: they are the
  ones that selected it), at the two-sided level ``confirm_confidence``; the accuracy
  reference's uncertainty enters the drop's interval. Otherwise the next candidate is
  confirmed while the reserve lasts. With no candidate when the search ends, one
  confirmation's reserve goes back to the search, and the study looks again.
- The **answer** (``Answer``) is the confirmed configuration, reported from its held-out
  seeds only; otherwise the best candidate, marked "not confirmed", reported from its
  search seeds; otherwise none. Once confirmed, the study stops early: more trials could
  only pick again among confirmed configurations, which is the selection the held-out
  seeds are there to avoid.

How often a confirmed answer is truly infeasible, how often a study ends with one, and
how far its figures are from the truth: ``experiments/answer_reliability.py``
(``docs/answer-reliability.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kdsearch.service.racing import (
    SIGMA_SD_FLOOR,
    Configuration,
    Interval,
    Judged,
    Shortlists,
    accuracy_sd_floor,
    drop_interval,
    interval,
    noise_of,
    seeds_to_queue,
    shortlists,
)
from kdsearch.service.record import Answer
from kdsearch.service.spec import StudySpec
from kdsearch.service.trial_config import Role


@dataclass(frozen=True)
class Confirmation:
    """A candidate's held-out seeds and what they say."""

    config: str
    trials: list[int]
    sigma: Interval | None
    drop: Interval | None
    confirmed: bool

    @property
    def complete(self) -> bool:
        return self.sigma is not None


def confirmation_of(c: Configuration, judged: Judged, spec: StudySpec) -> Confirmation:
    """What ``c``'s held-out seeds say, once all ``confirm_seeds`` of them have finished
    (judging after each would multiply the chances of a lucky pass)."""
    seeds = c.confirmation
    complete = seeds.n >= max(spec.replicates.confirm_seeds, 2) and not c.pending_confirmations
    if not complete or not all(math.isfinite(s) for s in seeds.sigmas):
        return Confirmation(c.config, seeds.trials, None, None, False)
    # The pooled prior without this configuration's search seeds (they selected it).
    prior = judged.pool.prior(without=c.config)
    level = spec.replicates.confirm_confidence
    floors = (SIGMA_SD_FLOOR, accuracy_sd_floor(judged.n_dev))
    sigma_noise, accuracy_noise = noise_of(seeds, prior, floors)
    assert sigma_noise is not None  # two seeds or more: at least one degree of freedom
    sigma = interval(seeds.sigmas, *sigma_noise, level)
    if c.baseline and judged.reference.kind == "baseline":
        drop: Interval | None = Interval(0.0, 0.0, 0.0, 0.0, math.inf)
    else:
        drop = drop_interval(seeds.accuracies, accuracy_noise, judged.reference, level)
    limits = spec.thresholds
    confirmed = (
        drop is not None
        and sigma.high <= limits.sigma_max
        and drop.high <= limits.accuracy_drop_max
        and sigma.high - sigma.mean <= spec.replicates.confirm_precision * limits.sigma_max
    )
    return Confirmation(c.config, seeds.trials, sigma, drop, confirmed)


def candidates(judged: Judged, spec: StudySpec) -> list[Configuration]:
    """Configurations worth confirming, the likeliest to pass first: not yet tried on
    held-out seeds, not infeasible, both means within the thresholds; ranked by
    ``confirmability``."""
    limits = spec.thresholds
    open_ = [
        c
        for c in judged
        if c.confirmations == 0
        and c.n > 0
        and c.verdict != "infeasible"
        and c.sigma is not None
        and c.sigma_mean <= limits.sigma_max
        and c.drop is not None
        and c.drop.mean <= limits.accuracy_drop_max
    ]
    return sorted(open_, key=lambda c: -confirmability(c, judged, spec))


def confirmability(c: Configuration, judged: Judged, spec: StudySpec) -> float:
    """How far inside both thresholds the search's means are, in standard errors of the
    mean of ``confirm_seeds`` held-out seeds (its own seed sds; the reference's noise in
    the drop's): the smaller of the two. The candidate with the lowest upper bound of sigma
    is not the likeliest to pass, when its drop sits at the limit or its noise is large."""
    assert c.sigma is not None and c.drop is not None
    k = max(spec.replicates.confirm_seeds, 2)
    limits = spec.thresholds
    sigma_se = max(c.sigma.sd, SIGMA_SD_FLOOR) / math.sqrt(k)
    z_sigma = (limits.sigma_max - c.sigma_mean) / sigma_se
    if c.baseline and judged.reference.kind == "baseline":
        return z_sigma  # its own reference: no drop
    reference_se = judged.reference.se if math.isfinite(judged.reference.se) else 0.0
    accuracy_sd = max(c.drop.sd, accuracy_sd_floor(judged.n_dev))
    drop_se = math.sqrt(accuracy_sd**2 / k + reference_se**2)
    return min(z_sigma, (limits.accuracy_drop_max - c.drop.mean) / drop_se)


Phase = Literal["search", "confirmation", "done"]


@dataclass(frozen=True)
class Queued:
    """A trial to queue: a configuration's next seed, search or held out."""

    config: Configuration
    replicate: int  # the seed's index in its sequence (search or confirmation)
    role: Role


@dataclass(frozen=True)
class Plan:
    """What the claim does next."""

    phase: Phase
    queue: list[Queued]
    new_samples: int  # how many new configurations may still be sampled now


@dataclass(frozen=True)
class Usage:
    """How much of the budget is used: trials finished, running or queued."""

    search: int  # baseline and search trials
    confirmation: int
    search_busy: int  # of those, running or queued
    # Of those, new samples taken but not yet sampled (the worker samples after the
    # critical section): their configurations are unknown, their seeds still to come.
    unsampled: int = 0


def plan(judged: Judged, spec: StudySpec, usage: Usage, limit: int | None = None) -> Plan:
    """The study's next step: racing seeds and new samples while the search has budget,
    then held-out seeds for the best candidate, until one is confirmed. ``limit``: plan at
    most this many racing seeds (a claim takes one: the rest would be planned again by
    the next claim); ``new_samples`` then counts only when the queue is empty."""
    reps = spec.replicates
    k, m = reps.confirm_seeds, reps.confirm_candidates
    lists = shortlists(judged, spec)
    if k == 0:  # no confirmation: the search has the whole budget
        return _search(lists, spec, spec.n_trials - usage.search, usage, limit)
    tried = lists.tried
    results = [confirmation_of(c, judged, spec) for c in tried]
    if any(r.confirmed for r in results):
        return Plan("done", [], 0)
    running = next((c for c in tried if c.confirmations < k), None)
    if running is not None:  # queue the rest of its held-out seeds (a resumed study)
        missing = [Queued(running, r, Role.CONFIRMATION) for r in range(running.confirmations, k)]
        return Plan("confirmation", missing, 0)
    if any(c.pending_confirmations for c in tried):
        return Plan("confirmation", [], 0)
    base = spec.n_trials - k * m
    extra = max(0, usage.search - base)
    given_back = math.ceil(extra / k) if extra else 0
    left = m - len(tried) - given_back
    allowance = base + given_back * k
    if usage.search < allowance:
        return _search(lists, spec, allowance - usage.search, usage, limit)
    if usage.search_busy:
        return Plan("search", [], 0)  # the search's last trials: the candidate waits for them
    if left <= 0:
        return Plan("done", [], 0)
    best = candidates(judged, spec)
    room = spec.n_trials - usage.search - usage.confirmation
    if best and room >= k:
        return Plan("confirmation", [Queued(best[0], r, Role.CONFIRMATION) for r in range(k)], 0)
    # No candidate: one confirmation's reserve goes back to the search.
    free = min(k, spec.n_trials - usage.search - usage.confirmation)
    if free <= 0:
        return Plan("done", [], 0)
    return _search(lists, spec, free, usage, limit)


def _search(lists: Shortlists, spec: StudySpec, free: int, usage: Usage, limit: int | None) -> Plan:
    """The search's step with ``free`` slots: racing seeds first, then new samples. Each
    new sample not yet sampled keeps the seeds its strategy will ask for once its
    configuration is known (else a second worker would spend them on yet another sample,
    leaving a configuration short of its seeds)."""
    reps = spec.replicates
    per_sample = reps.max_seeds if reps.strategy == "all" else reps.initial_seeds
    free -= usage.unsampled * (per_sample - 1)
    slots = free if limit is None else min(free, limit)
    queue = [Queued(c, r, _role(c)) for c, r in seeds_to_queue([], spec, slots, lists)]
    return Plan("search", queue, max(0, free - len(queue)))


def _role(c: Configuration) -> Role:
    return Role.BASELINE if c.baseline else Role.SEARCH


def answer(judged: Judged, spec: StudySpec) -> Answer | None:
    """The study's answer: its confirmed configuration (figures from the held-out seeds),
    else the best candidate (not confirmed; its search figures), else None."""
    for c in judged:
        if c.confirmations:
            result = confirmation_of(c, judged, spec)
            if result.confirmed:
                assert result.sigma is not None and result.drop is not None
                return Answer(c.config, True, result.trials, result.sigma.mean, result.drop.mean)
    best = best_candidate(judged, spec)
    if best is None:
        return None
    drop = best.drop.mean if best.drop is not None else math.nan
    return Answer(best.config, False, best.trials, best.sigma_mean, drop)


def best_candidate(judged: Judged, spec: StudySpec) -> Configuration | None:
    """Without a confirmed configuration, the one the study would name: the feasible
    configuration with the lowest upper bound of sigma (ties: of the drop, then the
    means); with ``max_seeds: 1``, the point estimates'. Ranking by the mean would favour
    the configurations with the fewest seeds, whose means are the least certain."""

    def key(c: Configuration) -> tuple[float, ...]:
        sigma = c.sigma.high if c.sigma is not None else c.sigma_mean
        drop = c.drop.high if c.drop is not None else math.inf
        return (sigma, drop, c.sigma_mean)

    return min((c for c in judged if c.verdict == "feasible"), key=key, default=None)


def confirmations(judged: Judged, spec: StudySpec) -> list[Confirmation]:
    """Every candidate's held-out seeds, in the order they were tried."""
    return [confirmation_of(c, judged, spec) for c in judged if c.confirmations]


def tried(judged: Sequence[Configuration]) -> int:
    return sum(1 for c in judged if c.confirmations)
