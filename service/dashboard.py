"""``kdsearch dashboard``: optuna-dashboard on kdsearch's storage and artifacts.

- The storage URL (and its password) comes from ``--storage`` or the environment and never
  shows in the process list.
- Every study's recorded artifact location is served (``RoutingArtifactStore``), so the
  dashboard shows each trial's figures and prediction files wherever its study keeps them.
- Constraints: kdsearch records them through the trial (Optuna 5's
  ``trial.set_constraint``: ``constraints:sigma``, ``constraints:accuracy_drop``), which
  optuna-dashboard 0.21 does not read yet; it reads the list format earlier Optuna
  versions wrote (``constraints``). ``DashboardStorage`` shows each trial to the dashboard
  with that list filled in from the keyed values, so infeasible trials stay marked;
  trials of studies made by earlier kdsearch versions already carry the list.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import signal
from collections.abc import Container
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.artifacts import RoutingArtifactStore, readable_store, resolve_artifacts
from kdsearch.service.record import (
    StudyAttr,
    SystemAttr,
    TrialAttr,
    TrialRecord,
    constraints_of,
    teacher_accuracy,
)
from kdsearch.service.storage import KdsearchStorage, open_storage, redact, resolve_storage_url

logger = logging.getLogger(__name__)


def with_listed_constraints(trial: FrozenTrial) -> FrozenTrial:
    """``trial``, with its keyed constraints also in the dashboard's list format."""
    system = trial.system_attrs
    if SystemAttr.CONSTRAINTS in system:
        return trial
    values = constraints_of(system)
    if values is None:
        return trial
    shown = copy.copy(trial)
    shown._system_attrs = {**system, SystemAttr.CONSTRAINTS: list(values)}
    return shown


def with_answer_mark(trial: FrozenTrial, marks: dict[int, str]) -> FrozenTrial:
    """``trial``, with ``TrialAttr.ANSWER`` when it is a seed of the study's answer."""
    label = marks.get(trial._trial_id)
    if label is None:
        return trial
    shown = copy.copy(trial)
    shown._user_attrs = {**trial.user_attrs, TrialAttr.ANSWER: label}
    return shown


def answer_marks(study_attrs: dict[str, Any], trials: list[FrozenTrial]) -> dict[int, str]:
    """The trial ids of the study's answer (every seed of its configuration), each with
    what the answer is; empty for a study without one or not made by kdsearch. The same
    answer ``report``, ``status``, the study note and ``export`` name (``summarize``)."""
    from kdsearch.service.racing import aggregate
    from kdsearch.service.spec import StudySpec
    from kdsearch.service.summary import summarize

    stored = study_attrs.get(StudyAttr.SPEC)
    if stored is None:
        return {}
    spec = StudySpec.model_validate(stored)
    records = [TrialRecord.of(t) for t in trials]
    summary = summarize(records, spec, aggregate(records, spec, teacher_accuracy(study_attrs)))
    if summary.answer is None:
        return {}
    label = "confirmed answer" if summary.answer_confirmed else "best candidate (not confirmed)"
    return {r.trial_id: label for r in records if r.config == summary.answer.config}


class DashboardStorage(KdsearchStorage):
    """kdsearch's storage as optuna-dashboard reads it (never written through it): the
    constraints in the list format it reads, and the answer's trials marked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # study id -> ((trials, finished trials) when computed, the marks)
        self._marks: dict[int, tuple[tuple[int, int], dict[int, str]]] = {}

    def _answer_marks(self, study_id: int, trials: list[FrozenTrial]) -> dict[int, str]:
        """The marks of the study whose trials these are, computed again only when a
        trial was added or finished since the last time."""
        key = (len(trials), sum(t.state.is_finished() for t in trials))
        cached = self._marks.get(study_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            marks = answer_marks(self.get_study_user_attrs(study_id), trials)
        except Exception as exc:  # a display aid: the dashboard serves the study without it
            logger.warning("cannot mark the answer of study %d: %s", study_id, exc)
            marks = {}
        self._marks[study_id] = (key, marks)
        return marks

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        # One read: the marks are computed from every trial, the answer filtered after.
        trials = super().get_all_trials(study_id, deepcopy=False)
        marks = self._answer_marks(study_id, trials)
        shown = [t for t in trials if states is None or t.state in states]
        if deepcopy:
            shown = copy.deepcopy(shown)
        return [with_answer_mark(with_listed_constraints(t), marks) for t in shown]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        # The marks of the last read of its study (the dashboard lists a study's trials
        # before it opens one); a study not read yet is read once.
        trial = super().get_trial(trial_id)
        study_id = self.study_id_of_trial(trial_id)
        cached = self._marks.get(study_id)
        marks = (
            cached[1]
            if cached is not None
            else self._answer_marks(study_id, super().get_all_trials(study_id, deepcopy=False))
        )
        return with_answer_mark(with_listed_constraints(trial), marks)


def _stop_now(signum: int, frame: object) -> None:
    """SIGTERM / SIGINT: exit at once. wsgiref's request handler catches every exception,
    SystemExit included, so raising one while a request is served would be swallowed and
    the server would go on; the dashboard only reads, so there is nothing to clean up."""
    logger.info("dashboard stopped (signal %d)", signum)
    logging.shutdown()
    os._exit(0)


def serve(storage_url: str | None, explicit_artifacts: str | None, host: str, port: int) -> None:
    from optuna_dashboard import run_server

    from kdsearch.service.artifacts import recorded_locations

    url = resolve_storage_url(storage_url)
    storage: Any = open_storage(url, create=False, kind=DashboardStorage)
    # Every study's own location (the default for a study that recorded none), unless one
    # is named: the dashboard starts even when some cannot be read, saying which.
    values = (
        [explicit_artifacts]
        if explicit_artifacts
        else sorted(set(recorded_locations(storage).values()), key=str)
    )
    stores = [s for v in values if (s := readable_store(resolve_artifacts(v))) is not None]
    _check_port(host, port)
    logger.info("dashboard on http://%s:%d for %s", host, port, redact(url))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_now)
    run_server(storage, host=host, port=port, artifact_store=RoutingArtifactStore(stores))


def _check_port(host: str, port: int) -> None:
    """Refuse a busy port or an address this machine does not have, before serving."""
    import socket

    from kdsearch.service.errors import KdsearchError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise KdsearchError(
            f"--host {host!r} is not an address of this machine ({exc}); use 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise KdsearchError(
                    f"--host {host!r} is not an address of this machine ({exc.strerror}); use "
                    "127.0.0.1, 0.0.0.0 or one of this machine's addresses"
                ) from None
            raise KdsearchError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (or "
                "stop what uses it) or another --host"
            ) from None
