"""The study lifecycle: create or attach, load, sample, claim trials under a global budget."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import warnings
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from kdsearch.service.errors import KdsearchError
from kdsearch.service.spec import (
    INTEGER_HYPERPARAMETERS,
    STAGE1_PREFIX,
    CategoricalParam,
    FloatParam,
    Hyperparameters,
    Stage1Spec,
    StudySpec,
)
from kdsearch.service.storage import require_study, study_lock
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

METRIC_NAMES = ["sigma", "accuracy_drop"]
SPEC_ATTR = "kdsearch:spec"
BASELINE_ATTR = "kdsearch:baseline"
ATTEMPT_ATTR = "kdsearch:attempt"  # 0 for a first run, n for the n-th retry
RETRY_OF_ATTR = "kdsearch:retry_of"  # number of the trial this one re-runs
RETRY_REASON_ATTR = "kdsearch:retry_reason"  # why the trial it re-runs failed
PROBES_ATTR = "probe_history"  # probe points (epoch ends, or every N steps), kept if pruned
# A trial counts against the budget once it is done, running, or queued to run.
_BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class ThresholdConstraints:
    """Optuna ``constraints_func``: values <= 0 are feasible.

    Reads the objectives from user attrs, because the sampler calls it in ``tell``
    before the trial's values are stored. Written as the ``constraints`` system attr,
    which optuna-dashboard reads to mark infeasible trials.
    """

    def __init__(self, sigma_max: float, accuracy_drop_max: float) -> None:
        self.sigma_max = sigma_max
        self.accuracy_drop_max = accuracy_drop_max

    def __call__(self, trial: FrozenTrial) -> Sequence[float]:
        attrs = trial.user_attrs
        if "sigma" in attrs:
            sigma, drop = attrs["sigma"], attrs["accuracy_drop"]
        elif attrs.get(PROBES_ATTR):
            # A pruned trial is judged by its last probe.
            sigma, drop = attrs[PROBES_ATTR][-1]["sigma"], attrs[PROBES_ATTR][-1]["accuracy_drop"]
        else:
            sigma = drop = float("inf")
        if sigma != sigma:  # NaN (no input right for both models) is never feasible
            sigma = float("inf")
        return (sigma - self.sigma_max, drop - self.accuracy_drop_max)


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Draw (or, for an enqueued trial, read back) every searched hyperparameter."""
    for name, param in spec.search_space.items():
        if isinstance(param, CategoricalParam):
            trial.suggest_categorical(name, param.choices)
        elif isinstance(param, FloatParam):
            trial.suggest_float(name, param.low, param.high, log=param.log)
        else:
            trial.suggest_int(name, param.low, param.high, log=param.log)
    return trial.params


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The paper's default configuration, restricted to the searched hyperparameters."""
    values = spec.defaults.model_dump()
    if spec.stage1 is not None:
        values.update({STAGE1_PREFIX + k: v for k, v in spec.stage1.model_dump().items()})
    return {name: values[name] for name in spec.search_space}


def _typed(name: str, value: Any) -> Any:
    return int(value) if name in INTEGER_HYPERPARAMETERS else float(value)


def trial_hyperparameters(spec: StudySpec, params: dict[str, Any]) -> Hyperparameters:
    """The full, typed stage-2 hyperparameters of a trial: searched values over the defaults."""
    values = spec.defaults.model_dump()
    values.update({k: _typed(k, v) for k, v in params.items() if not k.startswith(STAGE1_PREFIX)})
    return Hyperparameters(**values)


def trial_stage1(spec: StudySpec, params: dict[str, Any]) -> Stage1Spec | None:
    """The trial's stage-1 settings when it runs stage 1 itself (stage-1 keys searched)."""
    if spec.stage1 is None or not spec.stage1_per_trial:
        return None
    values = spec.stage1.model_dump()
    values.update(
        {
            k.removeprefix(STAGE1_PREFIX): _typed(k, v)
            for k, v in params.items()
            if k.startswith(STAGE1_PREFIX)
        }
    )
    return Stage1Spec(**values)


def worker_seed(spec: StudySpec, worker_id: str | None = None) -> int:
    """A per-worker sampler seed: a shared seed would make every worker replay the same
    random startup points (optuna#4714)."""
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    return zlib.crc32(f"{spec.seed}:{worker_id}".encode())


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence warnings about deliberate choices.

    ``constraints_func`` is deprecated in optuna 5.0 in favour of ``trial.set_constraint``,
    but that writes ``constraints:<key>`` attrs which optuna-dashboard 0.21 does not read;
    the ``constraints`` attr written via ``constraints_func`` is what it reads. Multivariate
    TPE and ``set_metric_names`` are marked experimental but stable in practice.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # We run our own heartbeat thread around ask/tell instead of Study.optimize.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def build_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """Every worker builds the same sampler from the spec (samplers are not stored)."""
    constraints = ThresholdConstraints(spec.thresholds.sigma_max, spec.thresholds.accuracy_drop_max)
    if spec.sampler.name == "tpe":
        with _quiet_optuna():
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=spec.sampler.n_startup_trials,
                multivariate=True,
                constant_liar=True,
                constraints_func=constraints,
            )
    if spec.sampler.name == "nsga2":
        with _quiet_optuna():
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    # Random search as TPE that never leaves its random start-up phase: RandomSampler
    # takes no constraints_func, so it would not record feasibility.
    with _quiet_optuna():
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=2**31 - 1, constraints_func=constraints
        )


def spec_differences(stored: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec dicts, with both values."""
    out = []
    for key in sorted(set(stored) | set(given)):
        where = f"{prefix}{key}"
        a, b = stored.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_differences(a, b, prefix=f"{where}.")
        elif a != b:
            out.append(f"{where}: stored {json.dumps(a)}, given {json.dumps(b)}")
    return out


def create_or_attach(storage: optuna.storages.RDBStorage, spec: StudySpec) -> bool:
    """Create the study (returns True) or attach to an identical one (returns False).

    Creation is all or nothing: the study, its metric names, the stored spec and the
    enqueued baseline are written under the study lock, and removed again on failure.
    """
    given = spec.to_json_dict()
    with study_lock(storage, spec.name):
        try:
            study_id = storage.get_study_id_from_name(spec.name)
        except KeyError:
            study_id = None
        if study_id is not None:
            stored = storage.get_study_user_attrs(study_id).get(SPEC_ATTR)
            if stored is None:
                raise KdsearchError(
                    f"study {spec.name!r} exists but was not created by kdsearch; "
                    "choose another name"
                )
            differences = spec_differences(stored, given)
            if differences:
                raise KdsearchError(
                    f"study {spec.name!r} exists with a different spec:\n"
                    + "\n".join(f"  - {d}" for d in differences)
                    + "\nUse a new study name, or restore these values to attach to it."
                )
            return False
        study = optuna.create_study(
            storage=storage, study_name=spec.name, directions=["minimize", "minimize"]
        )
        try:
            with _quiet_optuna():
                study.set_metric_names(METRIC_NAMES)
            study.set_user_attr(SPEC_ATTR, given)
            # The baseline is enqueued here, once, under the lock: concurrent enqueue_trial
            # calls can duplicate it.
            study.enqueue_trial(baseline_params(spec), user_attrs={BASELINE_ATTR: True})
        except BaseException:
            optuna.delete_study(study_name=spec.name, storage=storage)
            raise
        return True


def load_stored_spec(storage: optuna.storages.BaseStorage, name: str) -> StudySpec:
    require_study(storage, name)
    study_id = storage.get_study_id_from_name(name)
    stored = storage.get_study_user_attrs(study_id).get(SPEC_ATTR)
    if stored is None:
        raise KdsearchError(f"study {name!r} was not created by kdsearch (no stored spec)")
    return StudySpec.model_validate(stored)


def requeue(
    study: optuna.Study, failed: FrozenTrial, max_retries: int, reason: str, count: bool = True
) -> bool:
    """Queue a re-run of ``failed`` with the same hyperparameters, up to ``max_retries``.

    Only the process that moved the trial to FAIL calls this (the state change is
    conditional in the storage), so a trial is never re-queued twice. A re-run caused by
    a stop request (``count=False``) does not use up a retry.
    """
    attempt = failed.user_attrs.get(ATTEMPT_ATTR, 0) + (1 if count else 0)
    if attempt > max_retries:
        logger.warning("trial %d failed %d times: not retried", failed.number, attempt)
        return False
    keep = {k: v for k, v in failed.user_attrs.items() if k == BASELINE_ATTR}
    attrs = {**keep, ATTEMPT_ATTR: attempt, RETRY_OF_ATTR: failed.number, RETRY_REASON_ATTR: reason}
    study.enqueue_trial(failed.params, user_attrs=attrs, skip_if_exists=False)
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
    re-queues them). Safe to call from many workers: the state change is conditional."""
    with _quiet_optuna():
        optuna.storages.fail_stale_trials(study)


class Claim(enum.Enum):
    DONE = "the budget is spent"
    WAIT = "no slot free, but trials are still running"


def claim_trial(
    study: optuna.Study, spec: StudySpec, storage: optuna.storages.RDBStorage
) -> optuna.Trial | Claim:
    """Take the next trial, or say why not.

    Stale trials (dead workers) are failed and re-queued first. WAITING trials (the
    baseline, retries) go next; a new one is sampled only while finished + running +
    waiting < n_trials. The count and the ask happen under the study lock, so two
    workers can never both take the last slot. With no slot free but trials running,
    the caller should wait: a running trial may still fail and need a re-run.
    """
    with study_lock(storage, spec.name):
        fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False, states=_BUDGET_STATES)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if waiting == 0 and len(trials) >= spec.n_trials:
            return Claim.WAIT if running else Claim.DONE
        with _quiet_optuna():
            trial = study.ask()
        suggest(trial, spec)
        return trial


def is_feasible(trial: FrozenTrial) -> bool | None:
    constraints = trial.system_attrs.get("constraints")
    if constraints is None:
        return None
    return all(c <= 0 for c in constraints)
