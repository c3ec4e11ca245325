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
from collections.abc import Container
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.artifacts import RoutingArtifactStore, readable_store, resolve_artifacts
from kdsearch.service.record import SystemAttr, constraints_of
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


class DashboardStorage(KdsearchStorage):
    """kdsearch's storage as optuna-dashboard reads it (never written through it)."""

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return [
            with_listed_constraints(t) for t in super().get_all_trials(study_id, deepcopy, states)
        ]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return with_listed_constraints(super().get_trial(trial_id))


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
