"""The trial record: every attribute kdsearch stores on a study or a trial, in one place.

Optuna keeps a trial's objectives (``values``), ``params`` and ``state``; everything else
kdsearch needs (the figures users read, the probes the pruner decides from, retries,
artifacts) travels as user attrs. This module owns their names and types:

- ``StudyAttr`` and ``TrialAttr`` declare every user-attr key, ``SystemAttr`` the Optuna
  system attrs kdsearch reads or writes, ``ArtifactName`` the file names of the artifacts;
  ``set_trial_attrs`` refuses a key that is not declared, so a new figure cannot be
  written without being declared here.
- ``TrialOutcome`` is the typed result of a finished trial (objectives, confidence
  figures, task metrics, calibration, timing). Its field names *are* the user-attr keys,
  flat, so optuna-dashboard shows each figure as it is.
- ``ProgressSnapshot``, ``TeacherArtifacts``, ``TeacherFigures``, ``TrackingIds`` and
  ``Answer`` are the structured values stored under one key each.
- ``TrialRecord.of(frozen)`` reads a stored trial back, typed: the sampler's constraints,
  status, report, export and the pruning replay all read through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from optuna.trial import FrozenTrial, TrialState

from kdsearch.service.trial_config import Role, TrialConfig

if TYPE_CHECKING:
    import optuna

# The two objectives, in the order of every trial's values (and of the study's metric names).
OBJECTIVES = ("sigma", "accuracy_drop")


class StudyAttr:
    """Study user attrs."""

    SPEC = "kdsearch:spec"  # the resolved StudySpec (JSON), written once at creation
    TEACHER_ARTIFACTS = "kdsearch:teacher_artifacts"  # TeacherArtifacts
    TEACHER = "kdsearch:teacher"  # TeacherFigures: the teacher's dev accuracy, once assets exist
    ARTIFACTS = "kdsearch:artifacts"  # where the study's artifacts are (a folder or s3://...)
    HALTED = "kdsearch:halted"  # why the study stopped every worker (failures in a row), or None
    UNHALTED_AFTER = "kdsearch:unhalted_after"  # failures up to this trial number no longer count
    TRACKING = "kdsearch:tracking"  # {MLflow tracking URI: the study's parent run id}
    ANSWER = "kdsearch:answer"  # Answer: the configuration the study names, and on what


class TrialAttr:
    """Trial user attrs other than the outcome's figures (see ``TrialOutcome``)."""

    # bookkeeping, prefixed: not figures
    ROLE = "kdsearch:role"  # a Role: baseline, search or confirmation
    LEGACY_BASELINE = "kdsearch:baseline"  # before roles: True on the baseline's trials
    # Shown, never stored: ``kdsearch dashboard`` adds it to the trials of the study's
    # answer (its configuration's seeds), "confirmed answer" or "best candidate (not
    # confirmed)", so the dashboard names the answer report, status and export name.
    ANSWER = "kdsearch:answer"
    CONFIG = "kdsearch:config"  # the configuration (its hyperparameters' stable hash)
    REPLICATE = "kdsearch:replicate"  # 0 for a configuration's first seed, k for its k+1-th
    SEED = "kdsearch:seed"  # the training seed of this replicate
    TRIAL_CONFIG = "kdsearch:trial_config"  # the TrialConfig the claim resolved: what ran
    ATTEMPT = "kdsearch:attempt"  # 0 for a first run, n for the n-th retry
    RETRY_OF = "kdsearch:retry_of"  # number of the trial this one re-runs
    RETRY_REASON = "kdsearch:retry_reason"  # why the trial it re-runs failed
    # who ran it
    WORKER_HOST = "worker_host"
    WORKER_PID = "worker_pid"
    DEVICE = "device"
    LEGACY_PRECISION = "precision"  # before trial configs: bf16 or fp32
    LEGACY_HYPERPARAMETERS = "hyperparameters"  # before trial configs: every hyperparameter
    # how it went
    PROBES = "probe_history"  # [ProbePoint.as_dict(), ...]; kept when pruned
    PROGRESS = "progress"  # a running trial's ProgressSnapshot
    TRACKING = "kdsearch:tracking"  # TrackingIds
    PRUNED_BY = "pruned_by"  # the pruning rule that stopped it
    ERROR = "error"  # why it failed
    FAILURE = "kdsearch:failure"  # what failed: a FailureKind value (absent: its worker died)
    ARTIFACTS = "artifacts"  # {file name: artifact id}, teacher's study artifacts included


class SystemAttr:
    """Optuna's system attrs that kdsearch reads (and, for constraints, writes)."""

    FIXED_PARAMS = "fixed_params"  # an enqueued trial's hyperparameters, before it runs
    CONSTRAINTS = "constraints"  # the list format of constraints (optuna < 5, the dashboard)
    CONSTRAINT_PREFIX = "constraints:"  # optuna 5's ``trial.set_constraint(key, value)``
    ARTIFACT_PREFIX = "artifacts:"  # optuna's artifact metadata, one key per artifact


class ArtifactName:
    """File names of the artifacts: the paper's prediction CSVs and the trial figures."""

    TEACHER_TRAIN = "teacher_train.csv"
    TEACHER_DEV = "teacher_dev.csv"
    STUDENT_TRAIN = "student_train.csv"
    STUDENT_DEV = "student_dev.csv"
    HISTOGRAM = "confidence_delta_histogram.png"
    SCATTER = "confidence_scatter.png"
    RELIABILITY = "reliability_diagram.png"
    PROBE_CURVE = "probe_curve.png"
    TEACHER_FILES = (TEACHER_TRAIN, TEACHER_DEV)

    @staticmethod
    def predictions(who: str, split: str) -> str:
        """``teacher_train.csv``, ``student_dev.csv``, ...: who in teacher|student."""
        name = f"{who}_{split}.csv"
        if name not in (
            ArtifactName.TEACHER_TRAIN,
            ArtifactName.TEACHER_DEV,
            ArtifactName.STUDENT_TRAIN,
            ArtifactName.STUDENT_DEV,
        ):
            raise ValueError(f"no prediction file for {who!r} on split {split!r}")
        return name


# ``pruned_by`` of a trial whose student gets no train input right that the teacher gets
# right: sigma is undefined. A deterministic result of its configuration and seed, not a
# crash: the trial ends PRUNED (never retried, never feasible), not FAIL.
DEGENERATE = "degenerate"


class FailureKind(StrEnum):
    """Why a trial is FAIL. Only ``TRIAL`` failures (and dead workers) use up a retry and
    count towards the study's failures in a row: the others are not the trial's doing."""

    TRIAL = "trial"  # its code raised (CUDA OOM, NaN loss, bad data...)
    STOPPED = "stopped"  # its worker was stopped (SIGTERM, Ctrl-C): re-queued
    INFRASTRUCTURE = "infrastructure"  # the artifact store, cache or disk failed: re-queued
    CLAIM = "claim"  # its claim failed halfway (a lost connection): re-queued


@dataclass(frozen=True)
class ProbePoint:
    """One cheap evaluation during training, the pruner's input."""

    epoch: float  # epochs of training done: 1.0 after the first, 1.5 halfway through the 2nd
    epochs: int  # the trial's total epochs
    sigma: float  # on the probe subset of the train split
    accuracy_drop: float  # on dev, against the trial's reference (TrialConfig.reference)

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
class ProgressSnapshot:
    """Where a running trial's training is: published by its worker's heartbeat."""

    label: str  # the running stage: "distillation", "stage 1", ...
    step: int
    total: int
    elapsed_s: float

    @property
    def share(self) -> float:
        return self.step / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ProgressSnapshot | None:
        if not raw:
            return None
        return cls(str(raw["label"]), int(raw["step"]), int(raw["total"]), raw["elapsed_s"])


@dataclass(frozen=True)
class TeacherArtifacts:
    """The teacher's prediction files, uploaded once per study and artifact location."""

    location: str
    ids: dict[str, str]  # {ArtifactName: artifact id}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> TeacherArtifacts | None:
        return None if not raw else cls(str(raw["location"]), dict(raw["ids"]))


@dataclass(frozen=True)
class TeacherFigures:
    """The study's teacher on the study's data (written once its assets exist): the
    reference of ``accuracy_reference: teacher``, resolved by the claim."""

    dev_accuracy: float
    train_accuracy: float
    n_dev: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> TeacherFigures | None:
        if not raw:
            return None
        return cls(float(raw["dev_accuracy"]), float(raw["train_accuracy"]), int(raw["n_dev"]))


def teacher_accuracy(study_attrs: Mapping[str, Any]) -> float | None:
    """The teacher's dev accuracy as the study recorded it (None before any assets)."""
    figures = TeacherFigures.from_dict(study_attrs.get(StudyAttr.TEACHER))
    return figures.dev_accuracy if figures else None


@dataclass(frozen=True)
class TrackingIds:
    """Where a trial's tracking runs are."""

    mlflow_run_id: str | None = None
    tensorboard: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> TrackingIds:
        raw = raw or {}
        return cls(raw.get("mlflow_run_id"), raw.get("tensorboard"))


@dataclass(frozen=True)
class Answer:
    """The configuration a study names (report, status, note, export and the API), and
    what it rests on. ``confirmed``: its held-out seeds' bounds are within the thresholds;
    otherwise it is the best candidate so far, not confirmed."""

    config: str
    confirmed: bool
    trials: list[int]  # the trials its figures come from (the held-out seeds once confirmed)
    sigma: float  # mean over those trials
    accuracy_drop: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Answer | None:
        if not raw:
            return None
        return cls(
            str(raw["config"]),
            bool(raw["confirmed"]),
            [int(t) for t in raw["trials"]],
            float(raw["sigma"]),
            float(raw["accuracy_drop"]),
        )


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
    accuracy_drop_baseline: float | None = None  # baseline's (mean) student, once known
    selected_epoch: float | None = None  # training.selection best_dev: the scored evaluation
    stage1_epoch_losses: list[float] | None = None  # when the trial ran stage 1 itself
    peak_memory_mb: float | None = None  # GPU only
    majority_dev_accuracy: float | None = None  # always predicting dev's most common class

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

    @property
    def below_majority(self) -> bool:
        """The student is less accurate on dev than always answering dev's commonest class."""
        return (
            self.majority_dev_accuracy is not None
            and self.student_dev_accuracy < self.majority_dev_accuracy
        )


TrialOutcome.KEYS = frozenset(f.name for f in dataclasses.fields(TrialOutcome))
TrialOutcome.REQUIRED = frozenset(
    f.name for f in dataclasses.fields(TrialOutcome) if f.default is dataclasses.MISSING
)
TRIAL_KEYS: frozenset[str] = TrialOutcome.KEYS | frozenset(
    v for k, v in vars(TrialAttr).items() if k.isupper()
)
STUDY_KEYS: frozenset[str] = frozenset(v for k, v in vars(StudyAttr).items() if k.isupper())


class _AttrStorage(Protocol):
    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None: ...

    def write_trial(
        self, trial_id: int, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
    ) -> None: ...


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


def write_trial_attrs(
    storage: _AttrStorage,
    trial_id: int,
    attrs: Mapping[str, Any],
    artifacts: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """A trial's declared user attrs and the metadata of its stored artifacts (by file
    name, as ``artifacts.store_files`` gives it), in one transaction; ``ARTIFACTS`` maps
    each file name to its artifact id. Optuna-dashboard lists a trial's artifacts from
    that metadata (``artifacts:<id>``)."""
    check_keys(attrs, TRIAL_KEYS)
    system = {
        SystemAttr.ARTIFACT_PREFIX + meta["artifact_id"]: json.dumps(dict(meta))
        for meta in (artifacts or {}).values()
    }
    storage.write_trial(trial_id, attrs, system)


def set_study_attr(study: optuna.Study, key: str, value: Any) -> None:
    check_keys({key}, STUDY_KEYS)
    study.set_user_attr(key, value)


def placement_attrs(config: str, replicate: int, seed: int, role: Role) -> dict[str, Any]:
    """The user attrs naming a trial's configuration, replicate, seed and role: written
    when it is queued (or, for a newly sampled one, claimed)."""
    return {
        TrialAttr.CONFIG: config,
        TrialAttr.REPLICATE: replicate,
        TrialAttr.SEED: seed,
        TrialAttr.ROLE: role.value,
    }


def retry_attrs(failed: TrialRecord, attempt: int, reason: str) -> dict[str, Any]:
    """The user attrs a re-run of ``failed`` is queued with: it keeps its configuration,
    seed and role."""
    attrs = {
        TrialAttr.ATTEMPT: attempt,
        TrialAttr.RETRY_OF: failed.number,
        TrialAttr.RETRY_REASON: reason,
    }
    if failed.config is not None:
        attrs.update({TrialAttr.CONFIG: failed.config, TrialAttr.REPLICATE: failed.replicate})
    if failed.seed is not None:
        attrs[TrialAttr.SEED] = failed.seed
    attrs[TrialAttr.ROLE] = failed.role.value
    return attrs


def constraints_of(system_attrs: Mapping[str, Any]) -> tuple[float, ...] | None:
    """A trial's constraint values in objective order (<= 0 feasible): optuna 5's keyed
    ``constraints:sigma`` / ``constraints:accuracy_drop``, or the list earlier versions of
    kdsearch (through ``constraints_func``) wrote; None when it has none."""
    keyed = [system_attrs.get(SystemAttr.CONSTRAINT_PREFIX + name) for name in OBJECTIVES]
    if all(v is not None for v in keyed):
        return tuple(float(v) for v in keyed)  # type: ignore[arg-type]
    listed = system_attrs.get(SystemAttr.CONSTRAINTS)
    return tuple(listed) if listed is not None else None


@dataclass(frozen=True)
class TrialRecord:
    """A stored trial, read back typed."""

    number: int
    state: TrialState
    params: dict[str, Any]
    values: tuple[float, ...] | None
    constraints: tuple[float, ...] | None  # <= 0 feasible, in objective order
    role: Role
    config: str | None  # the configuration this trial is a replicate of
    replicate: int  # 0 for its configuration's first seed
    seed: int | None  # None: the study's seed (a trial from before replicates)
    attempt: int
    retry_of: int | None
    retry_reason: str | None
    trial_config: TrialConfig | None  # what it ran (None: queued, or before trial configs)
    hyperparameters: dict[str, Any] | None
    worker_host: str | None
    device: str | None
    precision: str | None
    probes: list[ProbePoint]
    progress: ProgressSnapshot | None  # while running
    pruned_by: str | None
    error: str | None
    failure: str | None  # a FailureKind; None for a FAIL trial means its worker died
    artifacts: dict[str, str]
    tracking: TrackingIds
    outcome: TrialOutcome | None
    trial_id: int = -1
    completed_at: Any = None  # datetime_complete
    elapsed_s: float | None = field(default=None)  # start to finish (or to now if running)

    @classmethod
    def of(cls, trial: FrozenTrial, now: Any = None) -> TrialRecord:
        a = trial.user_attrs
        elapsed = None
        if trial.datetime_start is not None:
            end = trial.datetime_complete or now
            if end is not None:
                elapsed = round((end - trial.datetime_start).total_seconds(), 1)
        config = TrialConfig.from_attr(a.get(TrialAttr.TRIAL_CONFIG))
        hyper = config.hyperparameters.model_dump() if config else None
        return cls(
            number=trial.number,
            state=trial.state,
            params=dict(trial.params) or dict(trial.system_attrs.get(SystemAttr.FIXED_PARAMS, {})),
            values=tuple(trial.values) if trial.values else None,
            constraints=constraints_of(trial.system_attrs),
            role=_role(a),
            config=a.get(TrialAttr.CONFIG),
            replicate=int(a.get(TrialAttr.REPLICATE, 0)),
            seed=a.get(TrialAttr.SEED),
            attempt=int(a.get(TrialAttr.ATTEMPT, 0)),
            retry_of=a.get(TrialAttr.RETRY_OF),
            retry_reason=a.get(TrialAttr.RETRY_REASON),
            trial_config=config,
            hyperparameters=hyper or a.get(TrialAttr.LEGACY_HYPERPARAMETERS),
            worker_host=a.get(TrialAttr.WORKER_HOST),
            device=a.get(TrialAttr.DEVICE),
            precision=config.precision if config else a.get(TrialAttr.LEGACY_PRECISION),
            probes=[ProbePoint.from_dict(p) for p in a.get(TrialAttr.PROBES, [])],
            progress=ProgressSnapshot.from_dict(a.get(TrialAttr.PROGRESS)),
            pruned_by=a.get(TrialAttr.PRUNED_BY),
            error=a.get(TrialAttr.ERROR),
            failure=a.get(TrialAttr.FAILURE),
            artifacts=dict(a.get(TrialAttr.ARTIFACTS, {})),
            tracking=TrackingIds.from_dict(a.get(TrialAttr.TRACKING)),
            outcome=TrialOutcome.from_attrs(a),
            trial_id=trial._trial_id,
            completed_at=trial.datetime_complete,
            elapsed_s=elapsed,
        )

    @property
    def baseline(self) -> bool:
        return self.role == Role.BASELINE

    @property
    def confirmation(self) -> bool:
        return self.role == Role.CONFIRMATION

    @property
    def unsampled(self) -> bool:
        """A new sample whose values are being drawn (the worker samples them after the
        claim's critical section, one parameter at a time, then records its
        configuration): it belongs to no configuration yet, and its parameters so far
        name none."""
        return self.state == TrialState.RUNNING and self.config is None and not self.baseline

    def tags(self) -> dict[str, Any]:
        """Who this trial is within the study (tracking runs carry these)."""
        return {
            "trial": self.number,
            "role": self.role.value,
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


def _role(attrs: Mapping[str, Any]) -> Role:
    raw = attrs.get(TrialAttr.ROLE)
    if raw is not None:
        return Role(raw)
    return Role.BASELINE if attrs.get(TrialAttr.LEGACY_BASELINE) else Role.SEARCH


def judged_objectives(
    outcome: TrialOutcome | None, probes: list[ProbePoint]
) -> tuple[float, float]:
    """(sigma, accuracy_drop) a trial is judged by: its outcome, else (pruned) its last
    probe, else infinity. NaN sigma (no input right for both models) is never feasible."""
    if outcome is not None:
        sigma, drop = outcome.sigma, outcome.accuracy_drop
    elif probes:
        sigma, drop = probes[-1].sigma, probes[-1].accuracy_drop
    else:
        sigma = drop = math.inf
    return (math.inf if math.isnan(sigma) else sigma), drop
