"""The study lifecycle: create or attach, load, sample, claim trials under a global budget."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.artifacts import ArtifactLocation, resolve_artifacts
from kdsearch.service.errors import KdsearchError
from kdsearch.service.faults import fault_point
from kdsearch.service.hashing import stable_int
from kdsearch.service.racing import aggregate, config_id, replicate_seed, seeds_to_queue
from kdsearch.service.record import (
    STUDY_KEYS,
    StudyAttr,
    TrialAttr,
    TrialRecord,
    check_keys,
    objectives_for_constraints,
    retry_attrs,
    set_study_attr,
    set_trial_attrs,
)
from kdsearch.service.spec import (
    DEPTH,
    INTEGER_HYPERPARAMETERS,
    STAGE1_PREFIX,
    CategoricalParam,
    FloatParam,
    Hyperparameters,
    Stage1Spec,
    StudySpec,
)
from kdsearch.service.storage import require_study, study_lock

logger = logging.getLogger(__name__)

METRIC_NAMES = ["sigma", "accuracy_drop"]
# A trial counts against the budget once it is done, running, or queued to run.
_BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class ThresholdConstraints:
    """Optuna ``constraints_func``: values <= 0 are feasible.

    Written as the ``constraints`` system attr, which optuna-dashboard reads to mark
    infeasible trials (``record.objectives_for_constraints`` says what a trial is judged by).
    """

    def __init__(self, sigma_max: float, accuracy_drop_max: float) -> None:
        self.sigma_max = sigma_max
        self.accuracy_drop_max = accuracy_drop_max

    def __call__(self, trial: FrozenTrial) -> Sequence[float]:
        sigma, drop = objectives_for_constraints(trial)
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
    values = {**spec.defaults.model_dump(), DEPTH: spec.student.teacher_layers}
    if spec.stage1 is not None:
        values.update({STAGE1_PREFIX + k: v for k, v in spec.stage1.model_dump().items()})
    return {name: values[name] for name in spec.search_space}


def trial_depth(spec: StudySpec, params: dict[str, Any]) -> int | None:
    """The student's depth in this trial (built from the teacher's first layers), or
    None for a student checkpoint."""
    if DEPTH in params:
        return int(params[DEPTH])
    return spec.student.teacher_layers


def _typed(name: str, value: Any) -> Any:
    return int(value) if name in INTEGER_HYPERPARAMETERS else float(value)


def trial_hyperparameters(spec: StudySpec, params: dict[str, Any]) -> Hyperparameters:
    """The full, typed stage-2 hyperparameters of a trial: searched values over the defaults."""
    values = spec.defaults.model_dump()
    values.update({k: _typed(k, v) for k, v in params.items() if k in Hyperparameters.model_fields})
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
    return stable_int([spec.seed, worker_id], bits=32)


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


def create_or_attach(
    storage: optuna.storages.RDBStorage, spec: StudySpec, artifacts: str | None = None
) -> bool:
    """Create the study (returns True) or attach to an identical one (returns False).

    Creation is all or nothing: the study, its metric names, the stored spec, the
    artifact location (when given) and the enqueued baseline are written under the study
    lock, and removed again on failure.
    """
    given = spec.to_json_dict()
    with study_lock(storage, spec.name):
        try:
            study_id = storage.get_study_id_from_name(spec.name)
        except KeyError:
            study_id = None
        if study_id is not None:
            stored = storage.get_study_user_attrs(study_id).get(StudyAttr.SPEC)
            if stored is None:
                raise KdsearchError(
                    f"study {spec.name!r} exists but was not created by kdsearch; "
                    "choose another name"
                )
            differences = spec_differences(_as_current(stored), given)
            if differences:
                raise KdsearchError(
                    f"study {spec.name!r} exists with a different spec:\n"
                    + "\n".join(f"  - {d}" for d in differences)
                    + "\nUse a new study name, or restore these values to attach to it."
                )
            if artifacts is not None:
                _record_location(storage, study_id, spec.name, artifacts)
            return False
        study = optuna.create_study(
            storage=storage, study_name=spec.name, directions=["minimize", "minimize"]
        )
        try:
            with _quiet_optuna():
                study.set_metric_names(METRIC_NAMES)
            set_study_attr(study, StudyAttr.SPEC, given)
            if artifacts is not None:
                set_study_attr(study, StudyAttr.ARTIFACTS, artifacts)
            # The baseline is enqueued here, once, under the lock: concurrent enqueue_trial
            # calls can duplicate it.
            baseline = baseline_params(spec)
            attrs = {TrialAttr.BASELINE: True, **replicate_attrs(spec, baseline, 0)}
            study.enqueue_trial(baseline, user_attrs=attrs)
        except BaseException:
            optuna.delete_study(study_name=spec.name, storage=storage)
            raise
        return True


def _record_location(
    storage: optuna.storages.BaseStorage, study_id: int, name: str, location: str
) -> None:
    """Record ``location`` as the study's artifact location, unless it has another one."""
    recorded = storage.get_study_user_attrs(study_id).get(StudyAttr.ARTIFACTS)
    if recorded is None:
        check_keys({StudyAttr.ARTIFACTS}, STUDY_KEYS)
        storage.set_study_user_attr(study_id, StudyAttr.ARTIFACTS, location)
        logger.info("study %s keeps its artifacts in %s", name, location)
    elif recorded != location:
        raise KdsearchError(
            f"artifact location {location!r} is not the one study {name!r} uses ({recorded!r}); "
            "drop --artifacts (and $KDSEARCH_ARTIFACTS) to use the study's, or create a new "
            "study for another location"
        )


def study_artifacts(
    storage: optuna.storages.RDBStorage, name: str, explicit: str | None, worker: bool = False
) -> ArtifactLocation:
    """Where study ``name``'s artifacts are: ``explicit`` (``--artifacts`` or
    ``$KDSEARCH_ARTIFACTS``), else the location the study recorded, else the default.

    A ``worker`` naming another location than the one its study recorded is refused: one
    study's files never scatter over two places (readers may name another location: the
    files may have moved)."""
    require_study(storage, name)
    study_id = storage.get_study_id_from_name(name)
    recorded = storage.get_study_user_attrs(study_id).get(StudyAttr.ARTIFACTS)
    location = resolve_artifacts(explicit or recorded)
    if worker and recorded is not None and str(location) != recorded:
        _record_location(storage, study_id, name, str(location))  # refuses, naming both
    return location


def record_artifact_location(
    storage: optuna.storages.RDBStorage, name: str, location: ArtifactLocation
) -> None:
    """Record where a study's worker keeps its artifacts (once it could open them), unless
    the study has a location already."""
    with study_lock(storage, name):
        _record_location(storage, storage.get_study_id_from_name(name), name, str(location))


def recorded_locations(storage: optuna.storages.BaseStorage) -> dict[str, str | None]:
    """Each study's recorded artifact location (None where none is recorded)."""
    return {s.study_name: s.user_attrs.get(StudyAttr.ARTIFACTS) for s in storage.get_all_studies()}


def _as_current(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as this version of kdsearch reads it: keys added since the study was
    created take their defaults, so attaching to an older study compares like with like."""
    try:
        return StudySpec.model_validate(stored).to_json_dict()
    except Exception:
        return stored


def load_stored_spec(storage: optuna.storages.BaseStorage, name: str) -> StudySpec:
    require_study(storage, name)
    study_id = storage.get_study_id_from_name(name)
    stored = storage.get_study_user_attrs(study_id).get(StudyAttr.SPEC)
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
    attempt = TrialRecord.of(failed).attempt + (1 if count else 0)
    if attempt > max_retries:
        logger.warning("trial %d failed %d times: not retried", failed.number, attempt)
        return False
    params = failed.params or failed.system_attrs.get("fixed_params")
    if not params:
        # Failed before its hyperparameters were drawn: there is nothing to re-run, and
        # its budget slot is free again for a new sample.
        logger.info("trial %d failed before sampling: not re-queued", failed.number)
        return False
    attrs = retry_attrs(failed, attempt, reason)
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
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
    HALTED = "trials kept failing: the study is halted"


def failure_streak(trials: Sequence[FrozenTrial], after: int = -1) -> list[int]:
    """The trials (numbers) of the latest run of failures, in completion order: finished
    trials numbered above ``after``, counting back from the last one until a trial that
    did not fail through its own doing. Stops and infrastructure failures neither count
    nor break the run; a COMPLETE or PRUNED trial breaks it."""
    finished = sorted(
        (t for t in trials if t.number > after and t.state.is_finished() and t.datetime_complete),
        key=lambda t: t.datetime_complete,  # type: ignore[arg-type,return-value]
    )
    run: list[int] = []
    for trial in reversed(finished):
        record = TrialRecord.of(trial)
        if record.state != TrialState.FAIL:
            break
        if record.charged_failure:
            run.append(trial.number)
    return run[::-1]


def _halt_if_failing(study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial]) -> bool:
    """Whether the study is halted; halts it when the latest failures in a row reach
    ``reliability.max_failures_in_a_row``. Callers hold the study lock."""
    attrs = study.user_attrs
    if attrs.get(StudyAttr.HALTED):
        return True
    streak = failure_streak(trials, after=attrs.get(StudyAttr.UNHALTED_AFTER, -1))
    limit = spec.reliability.max_failures_in_a_row
    if len(streak) < limit:
        return False
    last = next(t for t in trials if t.number == streak[-1])
    error = TrialRecord.of(last).error or "its worker died (heartbeat stale)"
    reason = (
        f"{len(streak)} trials in a row failed (trials {streak[0]}..{streak[-1]}; "
        f"reliability.max_failures_in_a_row is {limit}); the last one: {error}. Fix the "
        f"cause, then run `kdsearch study unhalt {spec.name}` and start the workers again"
    )
    set_study_attr(study, StudyAttr.HALTED, reason)
    logger.error("study %s halted: %s", spec.name, reason)
    return True


def _baseline_gate(study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial]) -> Claim | None:
    """With ``accuracy_reference: baseline`` every trial's drop is measured against the
    baseline's student, so nothing but the baseline runs until it has finished: None lets
    the claim go on, a ``Claim`` says why not. Callers hold the study lock."""
    if spec.thresholds.accuracy_reference != "baseline":
        return None
    if baseline_accuracy(trials) is not None:
        return None
    baselines = [t for t in trials if t.user_attrs.get(TrialAttr.BASELINE)]
    waiting = sorted((t for t in trials if t.state == TrialState.WAITING), key=lambda t: t.number)
    if waiting and waiting[0].user_attrs.get(TrialAttr.BASELINE):
        return None  # the next claim takes the baseline
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in baselines):
        return Claim.WAIT
    reason = (
        "the baseline (trial 0, the paper's defaults) failed and is not retried any more, "
        "but thresholds.accuracy_reference is 'baseline': every drop is measured against "
        f"it. Fix its error, enqueue it again (or use accuracy_reference: teacher), then run "
        f"`kdsearch study unhalt {spec.name}`"
    )
    set_study_attr(study, StudyAttr.HALTED, reason)
    return Claim.HALTED


def baseline_accuracy(trials: Sequence[FrozenTrial]) -> float | None:
    """The dev accuracy of the baseline's student (its first seed's finished run), the
    reference of ``accuracy_reference: baseline``, if there is one."""
    for trial in sorted(trials, key=lambda t: t.number):
        record = TrialRecord.of(trial)
        done = record.state == TrialState.COMPLETE and record.outcome is not None
        if record.baseline and record.replicate == 0 and done:
            return record.outcome.student_dev_accuracy  # type: ignore[union-attr]
    return None


def halted_reason(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    return storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(StudyAttr.HALTED)


def unhalt(storage: optuna.storages.RDBStorage, name: str) -> bool:
    """Clear a halt (returns whether there was one): failures so far no longer count."""
    require_study(storage, name)
    with study_lock(storage, name):
        study = optuna.load_study(study_name=name, storage=storage)
        if not study.user_attrs.get(StudyAttr.HALTED):
            return False
        last = max((t.number for t in study.get_trials(deepcopy=False)), default=-1)
        set_study_attr(study, StudyAttr.UNHALTED_AFTER, last)
        set_study_attr(study, StudyAttr.HALTED, None)
        return True


def claim_trial(
    study: optuna.Study,
    spec: StudySpec,
    storage: optuna.storages.RDBStorage,
    on_ask: Callable[[optuna.Trial], None] | None = None,
) -> optuna.Trial | Claim:
    """Take the next trial, or say why not.

    Stale trials (dead workers) are failed and re-queued first. Then racing queues the
    seeds configurations should get next (``service/racing.py``). WAITING trials (the
    baseline, retries, seed replicates) go next; a new one is sampled only while finished
    + running + waiting < n_trials. The count and the ask happen under the study lock, so two
    workers can never both take the last slot. With no slot free but trials running,
    the caller should wait: a running trial may still fail and need a re-run.

    The trial's first heartbeat is written inside the lock, right after ``ask``: from
    then on a dead worker's trial goes stale (and one that dies before it is caught by
    ``KdsearchStorage``'s no-heartbeat rule). ``on_ask`` receives the trial as soon as it
    exists, so a caller whose claim fails halfway (a lost connection) can fail it
    instead of leaving it behind.
    """
    with study_lock(storage, spec.name):
        fail_stale_trials(study)
        everything = study.get_trials(deepcopy=False)
        if _halt_if_failing(study, spec, everything):
            return Claim.HALTED
        if (gate := _baseline_gate(study, spec, everything)) is not None:
            return gate
        trials = [t for t in everything if t.state in _BUDGET_STATES]
        queued = _queue_replicates(study, spec, everything, spec.n_trials - len(trials))
        waiting = queued + sum(t.state == TrialState.WAITING for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if waiting == 0 and len(trials) >= spec.n_trials:
            return Claim.WAIT if running else Claim.DONE
        with _quiet_optuna():
            trial = study.ask()
        if on_ask is not None:
            on_ask(trial)
        fault_point("after-ask")
        storage.record_heartbeat(trial._trial_id)
        fault_point("after-first-beat")
        params = suggest(trial, spec)
        if TrialAttr.CONFIG not in trial.user_attrs:  # newly sampled: its first replicate
            set_trial_attrs(storage, trial._trial_id, replicate_attrs(spec, params, 0))
        return trial


def replicate_attrs(spec: StudySpec, params: dict[str, Any], replicate: int) -> dict[str, Any]:
    """The user attrs naming a trial's configuration, replicate and seed."""
    return {
        TrialAttr.CONFIG: config_id(params),
        TrialAttr.REPLICATE: replicate,
        TrialAttr.SEED: replicate_seed(spec.seed, replicate),
    }


def _queue_replicates(
    study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial], free_slots: int
) -> int:
    """Queue the seeds racing asks for (at most ``free_slots``); returns how many.
    Callers hold the study lock, so no replicate is ever queued twice."""
    if spec.replicates.max_seeds == 1:
        return 0
    configs = aggregate([TrialRecord.of(t) for t in trials], spec)
    queue = seeds_to_queue(configs, spec, free_slots)
    for config, replicate in queue:
        attrs = replicate_attrs(spec, config.params, replicate)
        if config.baseline:
            attrs[TrialAttr.BASELINE] = True
        study.enqueue_trial(config.params, user_attrs=attrs, skip_if_exists=False)
        logger.info(
            "configuration %s gets seed %d (replicate %d): %s",
            config.config, attrs[TrialAttr.SEED], replicate, config.verdict,
        )  # fmt: skip
    return len(queue)
