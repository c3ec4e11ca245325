"""Seed replicates: each configuration's seeds, its intervals and verdict, and racing
(which configurations get another seed). Pure functions of trial records and the spec: no
database, no clock, like ``service/pruning.py``.

The statistics, and why (measured by ``experiments/answer_reliability.py``,
``docs/answer-reliability.md``):

- A **configuration** is a set of searched hyperparameter values; each of its search
  **replicates** is a trial with those values and its own training seed. Replicate k runs
  ``replicate_seed(spec.seed, k)``, the same list for every configuration (common random
  numbers). Confirmation seeds (``service/confirmation.py``) are kept apart.
- **Each configuration is judged on its own noise.** Seed noise differs 20-65x between
  configurations (a collapsing, untrained configuration is bimodal; trained ones move by
  0.001-0.0025 in sigma), so one pooled sd would be wrong for most of them. A
  configuration's variance is its own sample variance (df ``n - 1``), shrunk toward a
  **prior** fitted to the *comparable* configurations (two or more seeds, not the
  baseline, not pruned, mean sigma within ``2 * sigma_max``; three of them at least) by
  empirical Bayes (``fit_prior``, limma's moderated variances): its location ``s0^2`` is
  a mean of log variances (the noisiest configuration does not set everyone's prior),
  its weight ``nu0`` is small when their variances differ more than sampling explains,
  and at most ``PRIOR_DF`` (they are comparable, not identical);
  ``s^2 = (nu0 s0^2 + (n - 1) s^2_own) / (nu0 + n - 1)`` with ``df = nu0 + n - 1``, and
  a **floor** on the sd (two identical seeds do not make an interval of zero width).
  ``mean +- t((1 + confidence) / 2, df) * s / sqrt(n)``.
- **The accuracy drop** of a configuration is ``reference - its mean dev accuracy``: the
  teacher's dev accuracy (exact), or the **baseline's mean over its seeds**, whose own
  uncertainty enters every drop's interval (Welch's degrees of freedom). Each trial's
  recorded drop is against the reference known when it was claimed; configurations are
  judged against the current one.
- **Verdict**: ``feasible`` when both upper bounds are within the thresholds (never on one
  seed), ``infeasible`` when a lower bound is beyond one (on one seed only when it is
  clearly beyond: its interval from the prior alone, or, without a prior yet, sigma above
  ``2 * sigma_max`` or a drop 5 points beyond its limit), ``uncertain`` otherwise. With
  ``max_seeds: 1`` (no replicates) the verdict is the point estimate's, as the trial's
  constraints mark it, and nothing is confirmed.
- **Racing**: another seed (up to ``max_seeds``, one pending at a time) for every
  configuration that is not infeasible and not clearly dominated by a feasible one (whose
  upper bounds are at or below its lower bounds in both objectives). New configurations
  start with ``initial_seeds``.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from optuna.trial import TrialState

from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import StudySpec
from kdsearch.service.trial_config import Role, config_id

Verdict = Literal["feasible", "infeasible", "uncertain"]

# The most degrees of freedom the prior counts for: the configurations it pools are
# comparable, not identical, so many of them do not make it exact for any one.
PRIOR_DF = 4.0
# A prior needs the variances of this many comparable configurations (their spread is
# what says how much the prior is worth).
MIN_PRIOR_CONFIGS = 3
# sd floors: sigma (a fifth of the smallest seed sd measured on trained configurations,
# 0.0025-0.001), and the dev accuracy (half a dev row).
SIGMA_SD_FLOOR = 0.0002
# One seed is "clearly beyond" a threshold without a prior at these distances.
CLEARLY_BEYOND_SIGMA = 2.0  # x sigma_max
CLEARLY_BEYOND_DROP = 0.05  # + accuracy_drop_max


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    sd: float  # the per-seed sd the interval uses (shrunk, floored; of the accuracy for a drop)
    df: float


@dataclass(frozen=True)
class Seeds:
    """Finished runs of one configuration on one kind of seed (search or held out)."""

    trials: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # student dev accuracy

    @property
    def n(self) -> int:
        return len(self.trials)

    # Computed once per object (seeds never change in place): judging thousands of
    # configurations per claim reads these many times.
    @functools.cached_property
    def sigma_mean(self) -> float:
        return _mean(self.sigmas)

    @functools.cached_property
    def accuracy_mean(self) -> float:
        return _mean(self.accuracies)

    @functools.cached_property
    def sigma_var(self) -> float | None:
        return _var(self.sigmas)

    @functools.cached_property
    def accuracy_var(self) -> float | None:
        return _var(self.accuracies)

    @functools.cached_property
    def finite(self) -> bool:
        return all(math.isfinite(s) for s in self.sigmas)

    def add(self, record: TrialRecord, seed: int) -> Seeds:
        assert record.outcome is not None
        return Seeds(
            [*self.trials, record.number],
            [*self.seeds, seed],
            [*self.sigmas, _sigma(record)],
            [*self.accuracies, record.outcome.student_dev_accuracy],
        )


@dataclass(frozen=True)
class Configuration:
    """One configuration and what its finished replicates say."""

    config: str
    params: dict[str, Any]
    baseline: bool
    search: Seeds  # finished search replicates (COMPLETE, or degenerate)
    confirmation: Seeds  # finished held-out seeds
    replicates: int  # search replicates made so far, finished or not (the next index)
    confirmations: int  # confirmation seeds made so far, finished or not
    pending: int  # search replicates queued or running
    pending_confirmations: int
    pruned: bool  # its first replicate was pruned: no more seeds
    sigma: Interval | None = None
    drop: Interval | None = None
    verdict: Verdict = "uncertain"

    # the search figures, as the tables show them
    @property
    def trials(self) -> list[int]:
        return self.search.trials

    @property
    def seeds(self) -> list[int]:
        return self.search.seeds

    @property
    def sigmas(self) -> list[float]:
        return self.search.sigmas

    @property
    def n(self) -> int:
        return self.search.n

    @property
    def sigma_mean(self) -> float:
        return self.search.sigma_mean

    @property
    def accuracy_mean(self) -> float:
        return self.search.accuracy_mean

    @property
    def sigma_sd(self) -> float | None:
        return _sd(self.search.sigmas)

    @property
    def accuracy_sd(self) -> float | None:
        return _sd(self.search.accuracies)


@dataclass(frozen=True)
class Reference:
    """The dev accuracy drops are measured against, with its uncertainty."""

    kind: Literal["teacher", "baseline"]
    accuracy: float | None  # None: not known yet (the baseline has no finished seed)
    se: float = 0.0  # standard error of ``accuracy`` (0: exact, the teacher)
    df: float = math.inf
    n: int = 0


@dataclass(frozen=True)
class Prior:
    """The seed variance typical of comparable configurations, per objective, and how many
    degrees of freedom it is worth (its ``df``: small when their variances disagree)."""

    sigma_var: float
    sigma_df: float
    accuracy_var: float
    accuracy_df: float


@dataclass(frozen=True)
class Pool:
    """The comparable configurations' own variances, from which a prior is fitted: the
    whole pool for the search, the pool without a configuration for its confirmation
    (its search seeds selected it)."""

    members: tuple[tuple[str, int, float, float], ...] = ()  # (config, df, var sigma, var acc)
    accuracy_floor: float = 0.0

    def prior(self, without: str | None = None) -> Prior | None:
        kept = self.members if without is None else [m for m in self.members if m[0] != without]
        sigma = fit_prior([(m[2], m[1]) for m in kept], SIGMA_SD_FLOOR)
        accuracy = fit_prior([(m[3], m[1]) for m in kept], self.accuracy_floor)
        if sigma is None or accuracy is None:
            return None
        return Prior(sigma[0], sigma[1], accuracy[0], accuracy[1])


def fit_prior(variances: Sequence[tuple[float, int]], floor: float) -> tuple[float, float] | None:
    """Empirical Bayes for variances (Smyth 2004, limma's ``fitFDist``): the prior
    variance ``s0^2`` and its degrees of freedom ``d0`` from the log sample variances
    ``(var, df)`` of several configurations. ``d0`` is large when they agree as closely as
    sampling alone allows, small when their true variances differ (20-65x across these
    studies: then each configuration mostly keeps its own); capped at ``PRIOR_DF``. None
    below ``MIN_PRIOR_CONFIGS`` configurations. The location is a mean of log variances, so
    the noisiest configuration does not set every other's prior.

    Rounded (``s0^2`` to 2 significant digits, ``d0`` to 0.1): far finer than the prior's
    own uncertainty, and a study of thousands of configurations then keeps one prior from
    claim to claim, so their verdicts are not recomputed each time (``ConfigurationIndex``)."""
    n = len(variances)
    if n < MIN_PRIOR_CONFIGS:
        return None
    from scipy.special import digamma

    # The per-configuration terms depend on df only through a few functions of it, and
    # a study's configurations have a handful of distinct df (their seeds, minus one).
    low = max(floor**2, 1e-30)
    e = [math.log(max(v, low)) - _log_chi2_bias(d) for v, d in variances]
    mean = math.fsum(e) / n
    e_var = math.fsum((x - mean) ** 2 for x in e) / (n - 1)
    excess = e_var - math.fsum(_trigamma_half(d) for _, d in variances) / n
    if excess <= 0:
        return _round_prior(math.exp(mean), PRIOR_DF)
    d0 = 2 * trigamma_inverse(excess)
    s0 = math.exp(mean + float(digamma(d0 / 2)) - math.log(d0 / 2))
    return _round_prior(s0, min(d0, PRIOR_DF))


@functools.lru_cache(maxsize=256)
def _log_chi2_bias(df: float) -> float:
    """E[log s^2] - log sigma^2 for a sample variance on ``df`` degrees of freedom."""
    from scipy.special import digamma

    return float(digamma(df / 2)) - math.log(df / 2)


@functools.lru_cache(maxsize=256)
def _trigamma_half(df: float) -> float:
    """Var[log s^2] on ``df`` degrees of freedom: trigamma(df / 2)."""
    from scipy.special import polygamma

    return float(polygamma(1, df / 2))


def _round_prior(var: float, df: float) -> tuple[float, float]:
    return float(f"{var:.2g}"), max(round(df, 1), 0.1)


def trigamma_inverse(x: float) -> float:
    """y with trigamma(y) = x (limma's ``trigammaInverse``: Newton's method)."""
    from scipy.special import polygamma

    if x > 1e7:
        return 1 / math.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = float(polygamma(1, y))
        step = tri * (1 - tri / x) / float(polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


@dataclass(frozen=True)
class Shortlists:
    """The few configurations the schedule looks at, so that a claim does not pass over
    all of a large study's: the ``open`` ones in racing order (``is_open``,
    ``racing_order``), the ``feasible`` ones (which may dominate them; in no particular
    order), and the ``tried`` ones (with held-out seeds, in configuration order)."""

    open: list[Configuration]
    feasible: list[Configuration]
    tried: list[Configuration]
    frontier: Frontier | None = None  # of ``feasible``, where the index keeps one

    def dominating(self) -> Frontier:
        return self.frontier or Frontier(self.feasible)

    @classmethod
    def of(cls, configs: Sequence[Configuration], spec: StudySpec) -> Shortlists:
        return cls(
            open=sorted((c for c in configs if is_open(c, spec)), key=racing_order),
            feasible=[c for c in configs if c.verdict == "feasible"],
            tried=[c for c in configs if c.confirmations],
        )


def shortlists(judged: Judged, spec: StudySpec) -> Shortlists:
    """``judged``'s shortlists: kept by its index, or found in its configurations."""
    return judged.shortlists or Shortlists.of(judged.configurations, spec)


@dataclass(frozen=True)
class Judged:
    """Every configuration with its verdict, and what they were judged against."""

    configurations: list[Configuration]
    reference: Reference
    pool: Pool
    n_dev: int = 1  # dev rows: the accuracy's resolution
    # Kept by ``ConfigurationIndex`` as configurations change; else found in the list.
    shortlists: Shortlists | None = None

    def __iter__(self) -> Any:
        return iter(self.configurations)

    def __len__(self) -> int:
        return len(self.configurations)

    def __getitem__(self, index: int) -> Configuration:
        return self.configurations[index]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _var(values: Sequence[float]) -> float | None:
    """Sample variance (ddof = 1); None below two values."""
    if len(values) < 2:
        return None
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _ss(values: Sequence[float]) -> float:
    """Sum of squared deviations from the mean."""
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values)


def _sd(values: Sequence[float]) -> float | None:
    var = _var(values)
    return None if var is None else math.sqrt(var)


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, df: float) -> float:
    """Student's t quantile, cached: the same few (q, df) pairs come up claim after claim.
    From ``scipy.special`` (the same functions ``scipy.stats`` calls), which the prior
    needs anyway: importing ``scipy.stats`` too would add 0.3 s to every command."""
    from scipy.special import ndtri, stdtrit

    if math.isinf(df):
        return float(ndtri(q))
    return float(stdtrit(df, q))


def accuracy_sd_floor(n_dev: int) -> float:
    """Half a dev row: the accuracy moves in steps of 1 / n_dev."""
    return 0.5 / max(n_dev, 1)


def _sigma(r: TrialRecord) -> float:
    """A finished replicate's sigma; undefined (NaN, or a degenerate run) is infinite."""
    sigma = r.outcome.sigma if r.outcome is not None else math.nan
    return math.inf if math.isnan(sigma) else sigma


def group(records: Sequence[TrialRecord], spec: StudySpec) -> list[Configuration]:
    """Every configuration of the study, with its finished seeds, in the order its first
    replicate was made (not yet judged)."""
    index = ConfigurationIndex(spec)
    index.update_many(sorted(records, key=lambda r: r.number))
    return index.configurations()


def configuration_of(key: str, trials: Sequence[TrialRecord], study_seed: int) -> Configuration:
    """One configuration from its trials (in number order), not yet judged."""
    search, confirmation = Seeds(), Seeds()
    replicates = confirmations = pending = pending_confirmations = 0
    for r in trials:
        seed = r.seed if r.seed is not None else study_seed
        busy = r.state in (TrialState.WAITING, TrialState.RUNNING)
        # A degenerate replicate (no train input right for both models: sigma
        # undefined) is a finished run of its configuration, infinitely bad in sigma.
        done = r.outcome is not None and (r.state == TrialState.COMPLETE or r.degenerate)
        if r.confirmation:
            confirmations = max(confirmations, r.replicate + 1)
            pending_confirmations += busy
            if done:
                confirmation = confirmation.add(r, seed)
        else:
            replicates = max(replicates, r.replicate + 1)
            pending += busy
            if done:
                search = search.add(r, seed)
    return Configuration(
        config=key,
        params=dict(trials[0].params),
        baseline=any(r.baseline for r in trials),
        search=search,
        confirmation=confirmation,
        replicates=replicates,
        confirmations=confirmations,
        pending=pending,
        pending_confirmations=pending_confirmations,
        pruned=any(
            r.state == TrialState.PRUNED and r.replicate == 0 and not r.degenerate
            for r in trials
            if not r.confirmation
        ),
    )


class ConfigurationIndex:
    """The configurations of a study kept up to date trial by trial, and judged at the
    cost of what changed: a trial added or changed rebuilds its own configuration, the
    prior is refitted only when a pooled configuration changed, and only the changed
    configurations are judged again unless the prior or the reference moved (then all
    are). The results are those of ``aggregate`` on the same trials."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self._members: dict[str, dict[int, TrialRecord]] = {}  # by trial number
        self._configs: dict[str, Configuration] = {}  # insertion order: first replicate's
        self._key_of: dict[int, str] = {}  # trial number -> its configuration
        self._pooled: dict[str, tuple[str, int, float, float]] = {}  # comparable ones
        self._pool_version = 0
        self._prior: tuple[tuple[int, float], Prior | None] | None = None
        self._baseline: str | None = None
        self._judged: dict[str, Configuration] = {}
        self._dirty: set[str] = set()
        self._inputs: Any = None
        # The shortlists, kept as verdicts change: the open configurations sorted by
        # (racing order, position), the feasible and the tried ones by key.
        self._seq: dict[str, int] = {}  # a configuration's position (its first trial's)
        self._next_seq = 0
        self._open: list[tuple[tuple[bool, float], int, str]] = []
        self._open_entry: dict[str, tuple[tuple[bool, float], int, str]] = {}
        self._feasible: dict[str, Configuration] = {}
        self._tried: dict[str, Configuration] = {}
        self._frontier: Frontier | None = None  # of ``_feasible``; None: to build again

    def update_many(self, records: Sequence[TrialRecord]) -> None:
        """Add or replace these trials' records; each configuration they touch is
        rebuilt once (a whole study read at once: once per configuration, not per trial)."""
        touched: dict[str, None] = {}  # insertion order: a configuration's first trial's
        for record in records:
            if not record.params or record.unsampled:
                continue  # failed before its values were drawn, or they are being drawn
            key = record.config or config_id(record.params)
            previous = self._key_of.get(record.number)
            if previous is not None and previous != key:  # re-keyed (never in practice)
                self._members[previous].pop(record.number, None)
                touched[previous] = None
            self._key_of[record.number] = key
            self._members.setdefault(key, {})[record.number] = record
            touched[key] = None
        for key in touched:
            self._rebuild(key)

    def _rebuild(self, key: str) -> None:
        self._dirty.add(key)
        members = self._members.get(key)
        if not members:
            self._configs.pop(key, None)
            self._seq.pop(key, None)
            if self._pooled.pop(key, None) is not None:
                self._pool_version += 1
            return
        if key not in self._seq:
            self._seq[key] = self._next_seq
            self._next_seq += 1
        trials = [members[n] for n in sorted(members)]
        c = self._configs[key] = configuration_of(key, trials, self.spec.seed)
        if c.baseline:
            self._baseline = key
        member = _pool_member(c) if comparable(c, self.spec) else None
        if member != self._pooled.get(key):
            self._pool_version += 1
            if member is None:
                self._pooled.pop(key)
            else:
                self._pooled[key] = member

    def configurations(self) -> list[Configuration]:
        return list(self._configs.values())

    def judge(self, teacher_accuracy: float | None, n_dev: int) -> Judged:
        spec = self.spec
        baseline = self._configs.get(self._baseline) if self._baseline else None
        reference = reference_of([baseline] if baseline else [], spec, teacher_accuracy, n_dev)
        pool = Pool(tuple(self._pooled.values()), accuracy_sd_floor(n_dev))
        version = (self._pool_version, pool.accuracy_floor)
        if self._prior is None or self._prior[0] != version:
            self._prior = (version, pool.prior())
        prior = self._prior[1]
        floors = (SIGMA_SD_FLOOR, accuracy_sd_floor(n_dev))
        inputs = (reference, prior, floors)
        if inputs != self._inputs:  # every verdict depends on these: judge all again
            self._judged = {
                k: _judge(c, spec, reference, prior, floors) for k, c in self._configs.items()
            }
            self._inputs = inputs
            self._open, self._open_entry = [], {}
            self._feasible, self._tried, self._frontier = {}, {}, None
            changed: Any = self._judged
        else:
            for key in self._dirty:
                c = self._configs.get(key)
                if c is None:
                    self._judged.pop(key, None)
                else:
                    self._judged[key] = _judge(c, spec, reference, prior, floors)
            changed = self._dirty
        for key in changed:
            self._shortlist(key)
        self._dirty.clear()
        if self._frontier is None:
            self._frontier = Frontier(list(self._feasible.values()))
        lists = Shortlists(
            open=[self._judged[e[2]] for e in self._open],
            feasible=list(self._feasible.values()),
            tried=sorted(self._tried.values(), key=lambda c: self._seq[c.config]),
            frontier=self._frontier,
        )
        return Judged(list(self._judged.values()), reference, pool, n_dev, lists)

    def _shortlist(self, key: str) -> None:
        """``key``'s place in the shortlists, from its new verdict."""
        c = self._judged.get(key)
        entry = self._open_entry.pop(key, None)
        if entry is not None:
            del self._open[bisect.bisect_left(self._open, entry)]
        if c is not None and is_open(c, self.spec):
            entry = self._open_entry[key] = (racing_order(c), self._seq[key], key)
            bisect.insort(self._open, entry)
        if self._feasible.pop(key, None) is not None:
            self._frontier = None
        if c is not None and c.verdict == "feasible":
            self._feasible[key] = c
            self._frontier = None
        self._tried.pop(key, None)
        if c is not None and c.confirmations:
            self._tried[key] = c


def aggregate(
    records: Sequence[TrialRecord], spec: StudySpec, teacher_accuracy: float | None = None
) -> Judged:
    """Every configuration of the study, judged on its search seeds.
    ``teacher_accuracy``: the reference of ``accuracy_reference: teacher`` (default: read
    from the finished trials' outcomes)."""
    configs = group(records, spec)
    if teacher_accuracy is None:
        teacher_accuracy = next(
            (r.outcome.teacher_dev_accuracy for r in records if r.outcome is not None), None
        )
    n_dev = next((r.outcome.dev_n_total for r in records if r.outcome is not None), 1)
    return judge(configs, spec, teacher_accuracy, n_dev)


def judge(
    configs: Sequence[Configuration],
    spec: StudySpec,
    teacher_accuracy: float | None,
    n_dev: int,
) -> Judged:
    """Every configuration's intervals and verdict."""
    reference = reference_of(configs, spec, teacher_accuracy, n_dev)
    pool = pool_of(configs, spec, n_dev)
    prior = pool.prior()
    floors = (SIGMA_SD_FLOOR, accuracy_sd_floor(n_dev))
    judged = [_judge(c, spec, reference, prior, floors) for c in configs]
    return Judged(judged, reference, pool, n_dev)


def reference_of(
    configs: Sequence[Configuration], spec: StudySpec, teacher: float | None, n_dev: int
) -> Reference:
    if spec.thresholds.accuracy_reference == "teacher":
        return Reference("teacher", teacher)
    baseline = next((c for c in configs if c.baseline and c.search.n), None)
    if baseline is None:
        return Reference("baseline", None)
    accuracies = baseline.search.accuracies
    n = len(accuracies)
    var = _var(accuracies)
    if var is None:  # one seed: the reference is known, its noise is not
        return Reference("baseline", _mean(accuracies), math.nan, 0.0, n)
    sd = max(math.sqrt(var), accuracy_sd_floor(n_dev))
    return Reference("baseline", _mean(accuracies), sd / math.sqrt(n), n - 1.0, n)


def comparable(c: Configuration, spec: StudySpec) -> bool:
    """Pooled into the others' prior: two seeds or more, not the baseline (often an
    untrained, bimodal configuration), not pruned, finite and within ``2 * sigma_max``
    (the far ones collapse, and their noise is not a trained configuration's)."""
    seeds = c.search
    return (
        seeds.n >= 2
        and not c.baseline
        and not c.pruned
        and seeds.finite
        and seeds.sigma_mean <= 2 * spec.thresholds.sigma_max
    )


def pool_of(configs: Sequence[Configuration], spec: StudySpec, n_dev: int) -> Pool:
    members = tuple(_pool_member(c) for c in configs if comparable(c, spec))
    return Pool(members, accuracy_sd_floor(n_dev))


def _pool_member(c: Configuration) -> tuple[str, int, float, float]:
    return (c.config, c.search.n - 1, c.search.sigma_var or 0.0, c.search.accuracy_var or 0.0)


def noise_of(
    seeds: Seeds, prior: Prior | None, floors: tuple[float, float]
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """(sd, df) of sigma's and of the accuracy's seed noise for ``seeds``."""
    if prior is None:
        return shrunk(seeds.sigmas, None, 0.0, floors[0]), shrunk(
            seeds.accuracies, None, 0.0, floors[1]
        )
    return (
        shrunk(seeds.sigmas, prior.sigma_var, prior.sigma_df, floors[0]),
        shrunk(seeds.accuracies, prior.accuracy_var, prior.accuracy_df, floors[1]),
    )


def shrunk(
    values: Sequence[float], prior_var: float | None, prior_df: float, floor: float
) -> tuple[float, float] | None:
    """(sd, df) of ``values``' seed noise: its own variance shrunk toward the prior,
    floored; None when neither has any degree of freedom."""
    own = _var(values)
    own_df = len(values) - 1
    if prior_var is None:
        prior_df = 0.0
    df = prior_df + own_df
    if df <= 0:
        return None
    var = ((prior_df * (prior_var or 0.0)) + own_df * (own or 0.0)) / df
    return max(math.sqrt(var), floor), df


def interval(values: Sequence[float], sd: float, df: float, confidence: float) -> Interval:
    mean = _mean(values)
    half = t_quantile((1 + confidence) / 2, df) * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, sd, df)


def drop_interval(
    accuracies: Sequence[float],
    accuracy: tuple[float, float] | None,
    reference: Reference,
    confidence: float,
) -> Interval | None:
    """The interval of ``reference - mean(accuracies)``: the two means' uncertainties
    added, with Welch-Satterthwaite degrees of freedom."""
    if reference.accuracy is None or accuracy is None or math.isnan(reference.se):
        return None
    sd, df = accuracy
    own = sd**2 / len(accuracies)
    ref = reference.se**2
    total = own + ref
    if ref == 0:
        welch = df
    else:
        welch = total**2 / (own**2 / df + (ref**2 / reference.df if reference.df > 0 else math.inf))
    mean = reference.accuracy - _mean(accuracies)
    half = t_quantile((1 + confidence) / 2, welch) * math.sqrt(total)
    return Interval(mean, mean - half, mean + half, sd, welch)


def verdict_of(sigma: Interval, drop: Interval, sigma_max: float, drop_max: float) -> Verdict:
    if sigma.high <= sigma_max and drop.high <= drop_max:
        return "feasible"
    if sigma.low > sigma_max or drop.low > drop_max:
        return "infeasible"
    return "uncertain"


def _judge(
    c: Configuration,
    spec: StudySpec,
    reference: Reference,
    prior: Prior | None,
    floors: tuple[float, float],
) -> Configuration:
    limits = spec.thresholds
    seeds = c.search
    if seeds.n == 0:
        return replace(c, verdict="infeasible" if c.pruned else "uncertain")
    if not all(math.isfinite(s) for s in seeds.sigmas):
        return replace(c, verdict="infeasible")
    point_drop = _point_drop(c, reference)
    if spec.replicates.max_seeds == 1:
        # No replicates: the point estimate decides, as the trial's constraints do.
        sigma = Interval(c.sigma_mean, c.sigma_mean, c.sigma_mean, 0.0, 0.0)
        drop = Interval(point_drop, point_drop, point_drop, 0.0, 0.0)
        if math.isnan(point_drop):
            return replace(c, sigma=sigma, verdict="uncertain")
        verdict = verdict_of(sigma, drop, limits.sigma_max, limits.accuracy_drop_max)
        return replace(c, sigma=sigma, drop=drop, verdict=verdict)
    confidence = spec.replicates.confidence
    sigma_noise, accuracy_noise = noise_of(seeds, prior, floors)
    sigma = interval(seeds.sigmas, *sigma_noise, confidence) if sigma_noise else None
    if c.baseline and reference.kind == "baseline":
        drop: Interval | None = Interval(0.0, 0.0, 0.0, 0.0, math.inf)  # its own reference
    else:
        drop = drop_interval(seeds.accuracies, accuracy_noise, reference, confidence)
    if seeds.n == 1:
        return replace(
            c, sigma=sigma, drop=drop, verdict=_one_seed(c, sigma, drop, point_drop, spec)
        )
    if sigma is None or drop is None:
        clearly = _clearly_beyond(c.sigma_mean, point_drop, spec)
        return replace(c, sigma=sigma, drop=drop, verdict="infeasible" if clearly else "uncertain")
    return replace(
        c, sigma=sigma, drop=drop,
        verdict=verdict_of(sigma, drop, limits.sigma_max, limits.accuracy_drop_max),
    )  # fmt: skip


def _point_drop(c: Configuration, reference: Reference) -> float:
    """The drop of ``c``'s mean accuracy against the reference (the baseline's: 0)."""
    if c.baseline and reference.kind == "baseline":
        return 0.0
    if reference.accuracy is None:
        return math.nan
    return reference.accuracy - _mean(c.search.accuracies)


def _one_seed(
    c: Configuration,
    sigma: Interval | None,
    drop: Interval | None,
    point_drop: float,
    spec: StudySpec,
) -> Verdict:
    """One seed is never feasible; it is infeasible when clearly beyond a threshold."""
    limits = spec.thresholds
    if sigma is not None and sigma.low > limits.sigma_max:
        return "infeasible"
    if drop is not None and drop.low > limits.accuracy_drop_max:
        return "infeasible"
    return "infeasible" if _clearly_beyond(c.sigma_mean, point_drop, spec) else "uncertain"


def _clearly_beyond(sigma: float, drop: float, spec: StudySpec) -> bool:
    limits = spec.thresholds
    return sigma > CLEARLY_BEYOND_SIGMA * limits.sigma_max or (
        not math.isnan(drop) and drop > limits.accuracy_drop_max + CLEARLY_BEYOND_DROP
    )


def dominated(c: Configuration, by: Sequence[Configuration]) -> bool:
    """Some feasible other configuration is better in both objectives even at its worst
    (upper bounds) than ``c`` at its best (lower bounds)."""
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


class Frontier:
    """The feasible configurations' upper bounds, sorted, for ``dominated``'s question in
    O(log F) instead of O(F): is some feasible configuration at or below ``c``'s lower
    bounds in both objectives (below in one)?"""

    def __init__(self, feasible: Sequence[Configuration]) -> None:
        bounded = sorted(
            ((c.sigma.high, c.drop.high, c) for c in feasible if c.sigma and c.drop),
            key=lambda x: (x[0], x[1]),
        )
        self._highs = [x[0] for x in bounded]
        self._bounded = bounded
        self._prefix_min: list[float] = []
        low = math.inf
        for _, drop_high, _ in bounded:
            low = min(low, drop_high)
            self._prefix_min.append(low)

    def dominates(self, c: Configuration) -> bool:
        if c.sigma is None or c.drop is None:
            return False
        k = bisect.bisect_right(self._highs, c.sigma.low)  # sigma.high <= c's sigma.low
        if k == 0:
            return False
        best = self._prefix_min[k - 1]
        if best < c.drop.low:
            return True
        if best > c.drop.low:
            return False
        return dominated(c, [x[2] for x in self._bounded[:k]])  # ties: check strictness


def _initial_target(spec: StudySpec) -> int:
    reps = spec.replicates
    return reps.initial_seeds if reps.strategy != "all" else reps.max_seeds


def is_open(c: Configuration, spec: StudySpec) -> bool:
    """Whether ``c`` may get another search seed (racing then asks whether a feasible
    configuration dominates it): short of its initial seeds, or with all of them finished
    and not infeasible, below ``max_seeds``, not pruned. Most of a large study's
    configurations are not: they have all their seeds, or a verdict racing stops at."""
    reps = spec.replicates
    if reps.max_seeds == 1 or c.pruned or c.replicates >= reps.max_seeds:
        return False
    if c.replicates < _initial_target(spec):
        return True
    return not (c.pending or c.n == 0 or c.verdict == "infeasible")


def racing_order(c: Configuration) -> tuple[bool, float]:
    """The order seeds are queued in: the baseline first, then by mean sigma."""
    return (not c.baseline, c.sigma_mean if c.n else math.inf)


def seeds_to_queue(
    configs: Sequence[Configuration],
    spec: StudySpec,
    free_slots: int,
    lists: Shortlists | None = None,
) -> list[tuple[Configuration, int]]:
    """The search replicates to queue now, as (configuration, replicate index), at most
    ``free_slots``: the baseline first, then by mean sigma. ``lists``: ``configs``'
    shortlists where an index keeps them (else found here)."""
    reps = spec.replicates
    if reps.max_seeds == 1 or free_slots <= 0:
        return []
    target = _initial_target(spec)
    if lists is None:
        lists = Shortlists.of(configs, spec)
    frontier: Frontier | None = None  # built only when racing needs it
    queue: list[tuple[Configuration, int]] = []
    for c in lists.open:
        if c.replicates < target:
            wanted = list(range(c.replicates, target))
        else:
            if frontier is None:
                frontier = lists.dominating()
            if frontier.dominates(c):
                continue
            wanted = [c.replicates]  # racing: one more seed at a time
        for k in wanted:
            if len(queue) >= free_slots:
                return queue
            queue.append((c, k))
    return queue


def by_config(configs: Sequence[Configuration]) -> Mapping[str, Configuration]:
    return {c.config: c for c in configs}


def role_of(c: Configuration) -> Role:
    return Role.BASELINE if c.baseline else Role.SEARCH
