"""Claiming a trial: under the study's critical section, decide what runs next and take it.

A claim is one transaction (``storage.critical_section``) that fails stale trials (and
re-queues them), halts a study whose trials keep failing, asks the schedule
(``service/confirmation.plan``: racing seeds, new samples, held-out seeds) what to queue
and whether a new configuration may be sampled, and then takes the oldest queued trial or
creates a new one, with its first heartbeat. The budget is global and exact: finished +
running + queued trials never exceed ``n_trials``, whatever the number of workers, and two
workers never both take a slot (a frozen holder's claim is rolled back by the server).

The sampling itself (Optuna's sampler draws the new trial's hyperparameters) happens after
the critical section, in parallel on every worker, and the claim ends by resolving the
trial's ``TrialConfig`` once and recording it: the worker is handed what it runs.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.service import sampler
from kdsearch.service.confirmation import Plan, Queued, Usage, plan
from kdsearch.service.faults import fault_point
from kdsearch.service.racing import ConfigurationIndex, Judged
from kdsearch.service.record import (
    SystemAttr,
    TrialAttr,
    TrialRecord,
    placement_attrs,
    set_trial_attrs,
    teacher_accuracy,
)
from kdsearch.service.recovery import fail_stale_trials, halt, halt_if_failing
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import KdsearchStorage, critical_section, track_cache
from kdsearch.service.trial_config import (
    KnownAccuracies,
    Placement,
    Precision,
    Role,
    TrialConfig,
    config_id,
    confirmation_seed,
    replicate_seed,
    resolve,
)

logger = logging.getLogger(__name__)

STALE_CHECK_S = 1.0


class Claim(enum.Enum):
    DONE = "the budget is spent"
    WAIT = "no slot free, but trials are still running"
    HALTED = "trials kept failing: the study is halted"


@dataclass(frozen=True)
class ClaimedTrial:
    """A trial this worker now runs, with what the study decided for it."""

    trial: optuna.Trial
    placement: Placement
    config: TrialConfig | None  # None: its values could not be resolved (``problem`` says why)
    problem: str | None = None

    @property
    def number(self) -> int:
        return self.trial.number


class StudyView:
    """This process's view of one study, kept current at the cost of what changed: each
    refresh reads the trials created since the last one and the unfinished ones whose state
    changed (a state query, then five bulk queries), and updates their records, their
    configurations (``ConfigurationIndex``), the budget counts and the completion order.
    A study of 10,000 trials is read whole once, by a worker's first claim."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = track_cache(study)
        self.forget()

    @property
    def _backend(self) -> KdsearchStorage:
        return self.study._storage._backend  # type: ignore[attr-defined,no-any-return]

    def forget(self) -> None:
        """Drop everything read (a rolled-back critical section may have left records of
        writes that never committed); the next refresh reads the study again."""
        self._records: dict[int, TrialRecord] = {}  # by trial id: ids grow with numbers
        self._unfinished: set[int] = set()
        self._max_id = -1
        self._usage = [0, 0, 0, 0]  # Usage's fields, kept up to date
        self._done_keys: list[tuple[Any, int]] = []  # (completed_at, number), sorted
        self._done: list[TrialRecord] = []  # finished trials in completion order
        self.index: ConfigurationIndex | None = None
        self._stale_checked = -math.inf

    def stale_check_due(self) -> bool:
        """Whether this claim looks for stale trials: at most once every
        ``STALE_CHECK_S`` per process. A stale trial is one whose worker stopped beating
        for the grace period (seconds to minutes), and heartbeat threads sweep too, so
        looking at every claim of a busy study (tens a second) would only cost its lock
        time (a query over the running trials each time)."""
        now = time.monotonic()
        if now - self._stale_checked < STALE_CHECK_S:
            return False
        self._stale_checked = now
        return True

    def refresh(self, spec: StudySpec) -> None:
        if self.index is None:
            self.index = ConfigurationIndex(spec)
        # The unfinished trials are read again only when their state changed (a queued
        # one taken, a running one finished) or their values were still to be sampled
        # (at most one per worker): their attrs while running (progress, probes) are
        # nothing a claim decides on.
        states = self._backend.read_states(self._unfinished)
        moved = [
            i
            for i, state in states.items()
            if state != self._records[i].state or self._records[i].unsampled
        ]
        for trial_id in self._unfinished - states.keys():  # deleted (never in practice)
            self._set(trial_id, None)
        changed = [
            TrialRecord.of(t)
            for t in self._backend.read_changed(self.study._study_id, self._max_id, moved)
        ]
        for record in changed:
            self._set(record.trial_id, record)
        self.index.update_many(changed)

    def _set(self, trial_id: int, record: TrialRecord | None) -> None:
        old = self._records.pop(trial_id, None) if record is None else self._records.get(trial_id)
        if old is not None:
            self._count(old, -1)
        if record is None:
            self._unfinished.discard(trial_id)
            return
        self._records[trial_id] = record
        self._max_id = max(self._max_id, trial_id)
        self._count(record, +1)
        if record.state.is_finished():
            self._unfinished.discard(trial_id)
            if record.completed_at is not None:  # finished once: it never changes again
                key = (record.completed_at, record.number)
                at = bisect.bisect(self._done_keys, key)
                self._done_keys.insert(at, key)
                self._done.insert(at, record)
        else:
            self._unfinished.add(trial_id)

    def _count(self, record: TrialRecord, sign: int) -> None:
        if record.state == TrialState.FAIL:
            return  # a failed trial frees its slot
        if record.confirmation:
            self._usage[1] += sign
        else:
            self._usage[0] += sign
            self._usage[2] += sign * (record.state in (TrialState.RUNNING, TrialState.WAITING))
            self._usage[3] += sign * record.unsampled

    def records(self, spec: StudySpec | None = None) -> list[TrialRecord]:
        """Every trial's record, by number (refreshed first when ``spec`` is given)."""
        if spec is not None:
            self.refresh(spec)
        return list(self._records.values())

    def finished_in_order(self) -> list[TrialRecord]:
        """The finished trials in completion order (ties by number)."""
        return self._done

    def usage(self) -> Usage:
        return Usage(*self._usage)

    def unfinished(self) -> list[TrialRecord]:
        """The queued and running trials (from the last refresh)."""
        return [self._records[i] for i in self._unfinished]

    def waiting(self) -> list[TrialRecord]:
        """The queued trials, oldest first (from the last refresh)."""
        queued = (r for r in self.unfinished() if r.state == TrialState.WAITING)
        return sorted(queued, key=lambda r: r.number)

    def judged(self, teacher_accuracy: float | None) -> Judged:
        assert self.index is not None, "refresh() first"
        last = self._done[-1] if self._done else None
        n_dev = next(
            (r.outcome.dev_n_total for r in reversed(self._done) if r.outcome is not None), 1
        )
        if teacher_accuracy is None and last is not None:
            teacher_accuracy = next(
                (r.outcome.teacher_dev_accuracy for r in self._done if r.outcome is not None), None
            )
        return self.index.judge(teacher_accuracy, n_dev)


def usage_of(records: list[TrialRecord]) -> Usage:
    """The budget used: trials done, running or queued (a failed trial frees its slot)."""
    counted = [r for r in records if r.state != TrialState.FAIL]
    busy = (TrialState.RUNNING, TrialState.WAITING)
    return Usage(
        search=sum(not r.confirmation for r in counted),
        confirmation=sum(r.confirmation for r in counted),
        search_busy=sum(not r.confirmation and r.state in busy for r in counted),
        unsampled=sum(r.unsampled for r in counted),
    )


def claim_trial(
    view: StudyView,
    spec: StudySpec,
    storage: KdsearchStorage,
    precision: Precision,
    on_ask: Callable[[int], None] | None = None,
) -> ClaimedTrial | Claim:
    """Take the next trial, or say why not. ``on_ask`` receives the trial's id as soon as
    it is committed, so a caller whose claim fails after the critical section (a lost
    connection while sampling) can fail it instead of leaving it behind."""
    study = view.study
    try:
        with critical_section(storage, spec.name):
            taken = _take(view, spec, storage)
    except BaseException:
        view.forget()  # it may hold records of writes that were rolled back
        raise
    if not isinstance(taken, tuple):
        return taken
    trial_id, judged = taken
    if on_ask is not None:
        on_ask(trial_id)
    fault_point("after-claim")
    return _prepare(study, spec, storage, trial_id, judged, precision)


def _take(view: StudyView, spec: StudySpec, storage: KdsearchStorage) -> tuple[int, Judged] | Claim:
    """The critical section: stale trials, halting, the schedule, then a trial taken."""
    study = view.study
    if view.stale_check_due():
        fail_stale_trials(study)
    view.refresh(spec)
    attrs = study.user_attrs  # read once: the halt, the teacher's figures
    if halt_if_failing(study, spec, view.finished_in_order(), attrs):
        return Claim.HALTED
    judged = view.judged(teacher_accuracy(attrs))
    if (gate := _baseline_gate(study, spec, view, judged)) is not None:
        return gate
    step: Plan = plan(judged, spec, view.usage(), limit=1)  # the claim takes one seed
    trial_id = _pop_waiting(study, view)  # queued earlier (the baseline, a re-queued trial)
    if trial_id is None and step.queue:
        trial_id = _start_seed(study, spec, step.queue[0])
    if trial_id is None:
        if step.new_samples <= 0:
            running = any(r.state == TrialState.RUNNING for r in view.unfinished())
            return Claim.WAIT if running else Claim.DONE
        trial_id = study._storage.create_new_trial(study._study_id)
        set_trial_attrs(storage, trial_id, {TrialAttr.ROLE: Role.SEARCH.value})
    storage.record_heartbeat(trial_id)
    fault_point("in-claim")  # inside the transaction: a death here leaves nothing behind
    return trial_id, judged


def _start_seed(study: optuna.Study, spec: StudySpec, queued: Queued) -> int:
    """The schedule's first seed, created RUNNING with its configuration's values fixed.
    Only what this claim takes is made: the schedule is planned again at every claim, so
    the rest of its queue would be planned again by the next one anyway, and a study of
    thousands of configurations would otherwise queue thousands of seeds at once (each an
    Optuna trial to create, then to re-read while it waits)."""
    c = queued.config
    seed = (
        confirmation_seed(spec.seed, queued.replicate)
        if queued.role == Role.CONFIRMATION
        else replicate_seed(spec.seed, queued.replicate)
    )
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        # what ``enqueue_trial`` records: the sampler's suggest returns these values
        system_attrs={SystemAttr.FIXED_PARAMS: dict(c.params)},
        user_attrs=placement_attrs(c.config, queued.replicate, seed, queued.role),
    )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    logger.info(
        "configuration %s gets %s seed %d (#%d): %s",
        c.config, queued.role.value, seed, queued.replicate, c.verdict,
    )  # fmt: skip
    return trial_id


def _pop_waiting(study: optuna.Study, view: StudyView) -> int | None:
    """The oldest queued trial, now RUNNING, or None (the critical section keeps other
    workers out; the state change is conditional all the same)."""
    storage = study._storage
    for trial in view.waiting():
        try:
            if storage.set_trial_state_values(trial.trial_id, state=TrialState.RUNNING):
                return trial.trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _baseline_gate(
    study: optuna.Study, spec: StudySpec, view: StudyView, judged: Judged
) -> Claim | None:
    """With ``accuracy_reference: baseline`` every trial's drop is measured against the
    baseline's students, so nothing but the baseline runs until one of its seeds has
    finished: None lets the claim go on, a ``Claim`` says why not."""
    if spec.thresholds.accuracy_reference != "baseline" or judged.reference.accuracy is not None:
        return None
    waiting = view.waiting()
    if waiting and waiting[0].baseline:
        return None  # the next claim takes the baseline
    baselines = [r for r in view.records() if r.baseline]
    if any(r.state in (TrialState.RUNNING, TrialState.WAITING) for r in baselines):
        return Claim.WAIT
    halt(
        study,
        spec,
        "the baseline (trial 0, the paper's defaults) failed and is not retried any more, "
        "but thresholds.accuracy_reference is 'baseline': every drop is measured against "
        f"it. Fix its error, enqueue it again (or use accuracy_reference: teacher), then run "
        f"`kdsearch study unhalt {spec.name}`",
    )
    return Claim.HALTED


def _prepare(
    study: optuna.Study,
    spec: StudySpec,
    storage: KdsearchStorage,
    trial_id: int,
    judged: Judged,
    precision: Precision,
) -> ClaimedTrial:
    """After the critical section: draw the trial's hyperparameters (a new one's from its
    own seeded sampler), resolve its config once and record it."""
    number = storage.get_trial(trial_id).number
    sampler.reseed(study, spec, number)
    # Optuna's trial cache learns of the new trial here (the claim read the study its own
    # way): the sampler reads every trial anyway, outside the lock.
    study.get_trials(deepcopy=False)
    trial = optuna.Trial(study, trial_id)
    params = sampler.suggest(trial, spec)
    record = TrialRecord.of(storage.get_trial(trial_id))
    attrs: dict[str, Any] = {}
    if record.config is None:  # newly sampled: its configuration's first replicate
        placement = Placement(config_id(params), 0, replicate_seed(spec.seed, 0), Role.SEARCH)
        attrs.update(placement_attrs(placement.config, 0, placement.seed, Role.SEARCH))
    else:
        seed = record.seed if record.seed is not None else spec.seed
        placement = Placement(record.config, record.replicate, seed, record.role)
    baseline = next((c for c in judged if c.baseline and c.n), None)
    known = KnownAccuracies(
        teacher=judged.reference.accuracy if judged.reference.kind == "teacher" else None,
        baseline=baseline.accuracy_mean if baseline is not None else None,
    )
    try:
        config = resolve(spec, placement, params, known, precision)
    except Exception as exc:  # values the schema refuses (an enqueued trial): its failure
        if attrs:
            set_trial_attrs(storage, trial_id, attrs)
        return ClaimedTrial(trial, placement, None, f"{type(exc).__name__}: {exc}")
    attrs[TrialAttr.TRIAL_CONFIG] = config.to_attr()
    set_trial_attrs(storage, trial_id, attrs)
    return ClaimedTrial(trial, placement, config)
