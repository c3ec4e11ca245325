"""The trial record: every attribute kdsearch stores on a study or a trial, in one place.

Optuna keeps a trial's objectives (``values``), ``params`` and ``state``; everything else
kdsearch needs (the figures users read, the probes the pruner decides from, retries,
artifacts) travels as user attrs. This module owns their names and types:

- ``StudyAttr`` and ``TrialAttr`` declare every key; ``set_trial_attrs`` refuses a key
  that is not declared, so a new figure cannot be written without being declared here.
- ``TrialOutcome`` is the typed result of a finished trial (objectives, confidence
  figures, task metrics, calibration, timing). Its field names *are* the user-attr keys,
  flat, so optuna-dashboard shows each figure as it is.
- ``TrialRecord.of(frozen)`` reads a stored trial back, typed: the sampler's constraints,
  status, report, export and the pruning replay all read through it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    import optuna


class StudyAttr:
    """Study user attrs."""

    SPEC = "kdsearch:spec"  # the resolved StudySpec (JSON), written once at creation
    TEACHER_ARTIFACTS = "kdsearch:teacher_artifacts"  # {"location", "ids": {file: artifact id}}
    ARTIFACTS = "kdsearch:artifacts"  # where the study's artifacts are (a folder or s3://...)
    HALTED = "kdsearch:halted"  # why the study stopped every worker (failures in a row), or None
    UNHALTED_AFTER = "kdsearch:unhalted_after"  # failures up to this trial number no longer count
    TRACKING = "kdsearch:tracking"  # {MLflow tracking URI: the study's parent run id}


class TrialAttr:
    """Trial user attrs other than the outcome's figures (see ``TrialOutcome``)."""

    # bookkeeping, prefixed: not figures
    BASELINE = "kdsearch:baseline"  # the paper's default configuration (trial 0)
    CONFIG = "kdsearch:config"  # the configuration (its hyperparameters' stable hash)
    REPLICATE = "kdsearch:replicate"  # 0 for a configuration's first seed, k for its k+1-th
    SEED = "kdsearch:seed"  # the training seed of this replicate
    ATTEMPT = "kdsearch:attempt"  # 0 for a first run, n for the n-th retry
    RETRY_OF = "kdsearch:retry_of"  # number of the trial this one re-runs
    RETRY_REASON = "kdsearch:retry_reason"  # why the trial it re-runs failed
    # who ran it
    WORKER_HOST = "worker_host"
    WORKER_PID = "worker_pid"
    DEVICE = "device"
    PRECISION = "precision"  # what training ran in: bf16 or fp32 (scoring is always fp32)
    # what it ran: every hyperparameter, searched and fixed
    HYPERPARAMETERS = "hyperparameters"
    # how it went
    PROBES = "probe_history"  # [ProbePoint.as_dict(), ...]; kept when pruned
    PROGRESS = "progress"  # a running trial's phase, step, total and elapsed seconds
    TRACKING = "kdsearch:tracking"  # {"mlflow_run_id": ..., "tensorboard": log dir}
    PRUNED_BY = "pruned_by"  # the pruning rule that stopped it
    ERROR = "error"  # why it failed
    FAILURE = "kdsearch:failure"  # what failed: a FailureKind value (absent: its worker died)
    ARTIFACTS = "artifacts"  # {file name: artifact id}, teacher's study artifacts included


# ``pruned_by`` of a trial whose student gets no train input right that the teacher gets
# right: sigma is undefined. A deterministic result of its configuration and seed, not a
# crash: the trial ends PRUNED (never retried, never feasible), not FAIL.
DEGENERATE = "degenerate"


class FailureKind:
    """Why a trial is FAIL. Only ``TRIAL`` failures (and dead workers) use up a retry and
    count towards the study's failures in a row: the others are not the trial's doing."""

    TRIAL = "trial"  # its code raised (CUDA OOM, NaN loss, bad data...)
    STOPPED = "stopped"  # its worker was stopped (SIGTERM, Ctrl-C): re-queued
    INFRASTRUCTURE = "infrastructure"  # the artifact store or disk failed: re-queued
    CLAIM = "claim"  # its claim failed halfway (a lost connection): re-queued


@dataclass(frozen=True)
class ProbePoint:
    """One cheap evaluation during training, the pruner's input."""

    epoch: float  # epochs of training done: 1.0 after the first, 1.5 halfway through the 2nd
    epochs: int  # the trial's total epochs
    sigma: float  # on the probe subset of the train split
    accuracy_drop: float  # on dev

    @property
    def progress(self) -> float:
        return self.epoch / self.epochs

    @property
    def at_epoch_end(self) -> bool:
        return float(self.epoch).is_integer()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ProbePoint:
        return cls(raw["epoch"], int(raw["epochs"]), raw["sigma"], raw["accuracy_drop"])


@dataclass(frozen=True)
class TrialOutcome:
    """Everything a finished trial measured. Field names are the user-attr keys."""

    # objectives (also the trial's values)
    sigma: float  # the paper's sigma on the train split (the worst class's, for C > 2)
    accuracy_drop: float  # reference dev accuracy - student dev accuracy, a fraction
    # both readings of the paper's "within 1%", whichever is the objective
    accuracy_drop_teacher: float  # teacher dev accuracy - student dev accuracy
    # confidence figures on train (where sigma is defined) and dev, over both-correct inputs
    train_sigma: float
    train_sigma_per_class: list[float]  # std of p_c differences, one per class
    train_sigma_predicted_class: float  # predicted-class probability instead of p0
    train_mean_abs_delta: float
    train_rms_delta: float
    train_n_kept: int  # inputs both models get right
    train_n_total: int
    dev_sigma: float
    dev_sigma_per_class: list[float]
    dev_sigma_predicted_class: float
    dev_mean_abs_delta: float
    dev_rms_delta: float
    dev_n_kept: int
    dev_n_total: int
    # task metrics: accuracy everywhere (as the paper), GLUE's own metric where it differs
    teacher_dev_accuracy: float
    student_dev_accuracy: float
    teacher_train_accuracy: float
    student_train_accuracy: float
    # calibration: ECE, 10 equal-width bins on the predicted class's confidence
    teacher_train_ece: float
    student_train_ece: float
    teacher_dev_ece: float
    student_dev_ece: float
    # training
    epoch_losses: list[float]
    sigma_bound: float  # sqrt(final mean stage-2 loss): the paper's bound, interpretive
    wall_time_s: float
    teacher_dev_f1: float | None = None  # MRPC, QQP
    student_dev_f1: float | None = None
    teacher_dev_mcc: float | None = None  # CoLA
    student_dev_mcc: float | None = None
    accuracy_drop_baseline: float | None = None  # baseline's (trial 0's) student, once known
    selected_epoch: float | None = None  # training.selection best_dev: the scored evaluation
    stage1_epoch_losses: list[float] | None = None  # when the trial ran stage 1 itself
    peak_memory_mb: float | None = None  # GPU only

    KEYS: ClassVar[frozenset[str]]
    REQUIRED: ClassVar[frozenset[str]]

    def attrs(self) -> dict[str, Any]:
        """The user attrs to write (None fields are left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialOutcome | None:
        """The outcome stored in ``attrs``, or None if the trial did not finish one."""
        if not cls.REQUIRED <= attrs.keys():
            return None
        return cls(**{k: attrs[k] for k in cls.KEYS if k in attrs})


TrialOutcome.KEYS = frozenset(f.name for f in dataclasses.fields(TrialOutcome))
TrialOutcome.REQUIRED = frozenset(
    f.name for f in dataclasses.fields(TrialOutcome) if f.default is dataclasses.MISSING
)
# The two objectives, in the order of the trial's values (and of METRIC_NAMES).
OBJECTIVES = ("sigma", "accuracy_drop")
TRIAL_KEYS: frozenset[str] = TrialOutcome.KEYS | frozenset(
    v for k, v in vars(TrialAttr).items() if k.isupper()
)
STUDY_KEYS: frozenset[str] = frozenset(v for k, v in vars(StudyAttr).items() if k.isupper())


class _AttrStorage(Protocol):
    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None: ...


def check_keys(keys: Mapping[str, Any] | set[str], declared: frozenset[str]) -> None:
    unknown = sorted(set(keys) - declared)
    if unknown:
        raise KeyError(
            f"user attrs {unknown} are not declared in kdsearch.service.record; declare them "
            "there (TrialAttr, StudyAttr or TrialOutcome) before writing them"
        )


def set_trial_attrs(storage: _AttrStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """Write declared trial user attrs, all in one transaction; an undeclared key raises
    before anything is written."""
    check_keys(attrs, TRIAL_KEYS)
    storage.set_trial_user_attrs(trial_id, attrs)


def set_study_attr(study: optuna.Study, key: str, value: Any) -> None:
    check_keys({key}, STUDY_KEYS)
    study.set_user_attr(key, value)


def retry_attrs(failed: FrozenTrial, attempt: int, reason: str) -> dict[str, Any]:
    """The user attrs a re-run of ``failed`` is queued with: it keeps its configuration
    and its seed."""
    kept = (TrialAttr.BASELINE, TrialAttr.CONFIG, TrialAttr.REPLICATE, TrialAttr.SEED)
    keep = {k: failed.user_attrs[k] for k in kept if k in failed.user_attrs}
    return {
        **keep,
        TrialAttr.ATTEMPT: attempt,
        TrialAttr.RETRY_OF: failed.number,
        TrialAttr.RETRY_REASON: reason,
    }


@dataclass(frozen=True)
class TrialRecord:
    """A stored trial, read back typed."""

    number: int
    state: TrialState
    params: dict[str, Any]
    values: tuple[float, ...] | None
    constraints: tuple[float, ...] | None  # <= 0 feasible (Optuna's ``constraints``)
    baseline: bool
    config: str | None  # the configuration this trial is a replicate of
    replicate: int  # 0 for its configuration's first seed
    seed: int | None  # None: the study's seed (a trial from before replicates)
    attempt: int
    retry_of: int | None
    retry_reason: str | None
    hyperparameters: dict[str, Any] | None
    worker_host: str | None
    device: str | None
    precision: str | None
    probes: list[ProbePoint]
    progress: dict[str, Any] | None  # while running: {label, step, total, elapsed_s}
    pruned_by: str | None
    error: str | None
    failure: str | None  # a FailureKind; None for a FAIL trial means its worker died
    artifacts: dict[str, str]
    tracking: dict[str, str]  # its tracking runs: mlflow_run_id, tensorboard folder
    outcome: TrialOutcome | None
    elapsed_s: float | None = field(default=None)  # start to finish (or to now if running)

    @classmethod
    def of(cls, trial: FrozenTrial, now: Any = None) -> TrialRecord:
        a = trial.user_attrs
        constraints = trial.system_attrs.get("constraints")
        elapsed = None
        if trial.datetime_start is not None:
            end = trial.datetime_complete or now
            if end is not None:
                elapsed = round((end - trial.datetime_start).total_seconds(), 1)
        return cls(
            number=trial.number,
            state=trial.state,
            params=dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {})),
            values=tuple(trial.values) if trial.values else None,
            constraints=tuple(constraints) if constraints is not None else None,
            baseline=bool(a.get(TrialAttr.BASELINE)),
            config=a.get(TrialAttr.CONFIG),
            replicate=int(a.get(TrialAttr.REPLICATE, 0)),
            seed=a.get(TrialAttr.SEED),
            attempt=int(a.get(TrialAttr.ATTEMPT, 0)),
            retry_of=a.get(TrialAttr.RETRY_OF),
            retry_reason=a.get(TrialAttr.RETRY_REASON),
            hyperparameters=a.get(TrialAttr.HYPERPARAMETERS),
            worker_host=a.get(TrialAttr.WORKER_HOST),
            device=a.get(TrialAttr.DEVICE),
            precision=a.get(TrialAttr.PRECISION),
            probes=[ProbePoint.from_dict(p) for p in a.get(TrialAttr.PROBES, [])],
            progress=a.get(TrialAttr.PROGRESS),
            pruned_by=a.get(TrialAttr.PRUNED_BY),
            error=a.get(TrialAttr.ERROR),
            failure=a.get(TrialAttr.FAILURE),
            artifacts=dict(a.get(TrialAttr.ARTIFACTS, {})),
            tracking=dict(a.get(TrialAttr.TRACKING, {})),
            outcome=TrialOutcome.from_attrs(a),
            elapsed_s=elapsed,
        )

    def tags(self) -> dict[str, Any]:
        """Who this trial is within the study (tracking runs carry these)."""
        return {
            "trial": self.number,
            "baseline": self.baseline,
            "config": self.config,
            "replicate": self.replicate,
            "seed": self.seed,
            "attempt": self.attempt,
        }

    @property
    def degenerate(self) -> bool:
        """Ended PRUNED because no train input was right for both models (see DEGENERATE)."""
        return self.state == TrialState.PRUNED and self.pruned_by == DEGENERATE

    @property
    def feasible(self) -> bool | None:
        """None until the trial has constraints (finished or pruned)."""
        if self.constraints is None:
            return None
        return all(c <= 0 for c in self.constraints)

    @property
    def sigma(self) -> float | None:
        return self.values[0] if self.values else None

    @property
    def accuracy_drop(self) -> float | None:
        return self.values[1] if self.values else None

    @property
    def on_gpu(self) -> bool:
        return str(self.device or "").startswith("cuda")

    @property
    def charged_failure(self) -> bool:
        """FAIL through the trial's own doing (or its worker's death): uses up a retry."""
        return self.state == TrialState.FAIL and self.failure in (None, FailureKind.TRIAL)


def objectives_for_constraints(trial: FrozenTrial) -> tuple[float, float]:
    """(sigma, accuracy_drop) a trial is judged by: its outcome, else (pruned) its last
    probe, else infinity. NaN sigma (no input right for both models) is never feasible.

    The sampler calls its ``constraints_func`` inside ``tell``, before the trial's values
    are stored, hence the user attrs."""
    attrs = trial.user_attrs
    probes = attrs.get(TrialAttr.PROBES)
    if OBJECTIVES[0] in attrs:
        sigma, drop = (attrs[key] for key in OBJECTIVES)
    elif probes:
        last = ProbePoint.from_dict(probes[-1])
        sigma, drop = last.sigma, last.accuracy_drop
    else:
        sigma = drop = math.inf
    return (math.inf if math.isnan(sigma) else sigma), drop
