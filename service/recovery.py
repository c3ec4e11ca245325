"""Recovering from failures: re-runs of failed and stale trials, and halting a study whose
trials keep failing.

- ``requeue``: a failed trial is queued again with its hyperparameters, configuration, seed
  and role, up to ``reliability.max_retries`` (stops, infrastructure and claim failures
  use none).
- ``fail_stale_trials``: RUNNING trials whose heartbeat stopped (a dead worker) are failed
  and re-queued, in one transaction (``storage.critical_section``), by whichever worker
  looks first; the stale rule itself is ``KdsearchStorage``'s.
- ``halt_if_failing``: after ``reliability.max_failures_in_a_row`` charged failures the
  study is halted: every worker stops until ``kdsearch study unhalt``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.record import (
    StudyAttr,
    TrialRecord,
    retry_attrs,
    set_study_attr,
)
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import KdsearchStorage, critical_section, require_study

logger = logging.getLogger(__name__)


def requeue(
    study: optuna.Study, failed: FrozenTrial, max_retries: int, reason: str, count: bool = True
) -> bool:
    """Queue a re-run of ``failed`` with the same hyperparameters, up to ``max_retries``.

    Only the process that moved the trial to FAIL calls this (the state change is
    conditional in the storage), so a trial is never re-queued twice. A re-run caused by
    a stop request (``count=False``) does not use up a retry.
    """
    record = TrialRecord.of(failed)
    attempt = record.attempt + (1 if count else 0)
    if attempt > max_retries:
        logger.warning("trial %d failed %d times: not retried", failed.number, attempt)
        return False
    if not record.params:
        # Failed before its hyperparameters were drawn: there is nothing to re-run, and
        # its budget slot is free again for a new sample.
        logger.info("trial %d failed before sampling: not re-queued", failed.number)
        return False
    attrs = retry_attrs(record, attempt, reason)
    study.enqueue_trial(record.params, user_attrs=attrs, skip_if_exists=False)
    logger.info("trial %d re-queued (attempt %d of %d)", failed.number, attempt, max_retries)
    return True


class RequeueStale:
    """``heartbeat_stale_trial_callback``: a trial whose worker died is re-queued."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # The failed trial is finished and takes no more attrs: the retry says why.
        requeue(study, trial, self.max_retries, reason="worker died (heartbeat stale)")


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose heartbeat stopped (their ``RequeueStale`` callback
    re-queues them). Safe to call from many workers: the state change is conditional.
    Callers run it inside the study's critical section, so failing and re-queueing land
    together."""
    optuna.storages.fail_stale_trials(study)


def sweep_stale_trials(study: optuna.Study, storage: KdsearchStorage, name: str) -> bool:
    """From a heartbeat thread: fail and re-queue stale trials if the study's lock is free
    right now (a claim in progress does it itself). Returns whether it looked."""
    with critical_section(storage, name, wait=False) as held:
        if held:
            fail_stale_trials(study)
        return held


def failure_streak(finished: Sequence[TrialRecord], after: int = -1) -> list[int]:
    """The trials (numbers) of the latest run of failures, in completion order, from the
    finished trials in completion order (``StudyView.finished_in_order``) numbered above
    ``after``: counting back from the last one until a trial that did not fail through its
    own doing. Stops and infrastructure failures neither count nor break the run; a
    COMPLETE or PRUNED trial breaks it. The work is the run's length, not the study's."""
    run: list[int] = []
    for record in reversed(finished):
        if record.number <= after:
            continue
        if record.state != TrialState.FAIL:
            break
        if record.charged_failure:
            run.append(record.number)
    return run[::-1]


def halt_if_failing(
    study: optuna.Study,
    spec: StudySpec,
    finished: Sequence[TrialRecord],
    attrs: Mapping[str, Any] | None = None,
) -> bool:
    """Whether the study is halted; halts it when the latest failures in a row reach
    ``reliability.max_failures_in_a_row``. ``finished``: in completion order; ``attrs``:
    the study's user attrs, where the caller has read them. Callers hold the study's
    critical section."""
    if attrs is None:
        attrs = study.user_attrs
    if attrs.get(StudyAttr.HALTED):
        return True
    streak = failure_streak(finished, after=attrs.get(StudyAttr.UNHALTED_AFTER, -1))
    limit = spec.reliability.max_failures_in_a_row
    if len(streak) < limit:
        return False
    last = next(t for t in reversed(finished) if t.number == streak[-1])
    error = last.error or "its worker died (heartbeat stale)"
    halt(
        study,
        spec,
        f"{len(streak)} trials in a row failed (trials {streak[0]}..{streak[-1]}; "
        f"reliability.max_failures_in_a_row is {limit}); the last one: {error}. Fix the "
        f"cause, then run `kdsearch study unhalt {spec.name}` and start the workers again",
    )
    return True


def halt(study: optuna.Study, spec: StudySpec, reason: str) -> None:
    set_study_attr(study, StudyAttr.HALTED, reason)
    logger.error("study %s halted: %s", spec.name, reason)


def halted_reason(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    return storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(StudyAttr.HALTED)


def unhalt(storage: KdsearchStorage, name: str) -> bool:
    """Clear a halt (returns whether there was one): failures so far no longer count."""
    require_study(storage, name)
    study = optuna.load_study(study_name=name, storage=storage)
    with critical_section(storage, name):
        if not study.user_attrs.get(StudyAttr.HALTED):
            return False
        last = max((t.number for t in study.get_trials(deepcopy=False)), default=-1)
        set_study_attr(study, StudyAttr.UNHALTED_AFTER, last)
        set_study_attr(study, StudyAttr.HALTED, None)
        return True
