"""What one trial runs, resolved once on the study side.

A study's spec says what may vary (``search_space``) and what is fixed (``defaults``,
``stage1``, ``student``); a trial's searched values (Optuna's ``params``) and its place in
the study (configuration, replicate, seed, role) pick one point. ``resolve`` turns them
into a typed ``TrialConfig``: every hyperparameter, the stage-1 settings when the trial
runs stage 1 itself, the student's depth, the seed, the role, the accuracy reference and
the training precision. The claim resolves it, records it on the trial
(``TrialAttr.TRIAL_CONFIG``) and hands it down as is; ``kdsearch export`` rebuilds the
trial from the recorded one. Nothing below reads these values back or rebuilds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from kdsearch.service.hashing import stable_hash, stable_int
from kdsearch.service.spec import (
    DEPTH,
    INTEGER_HYPERPARAMETERS,
    STAGE1_PREFIX,
    Hyperparameters,
    Stage1Spec,
    StudySpec,
)

Precision = Literal["fp32", "bf16"]


class Role(StrEnum):
    """Why a trial runs."""

    BASELINE = "baseline"  # the paper's default configuration, every trial's comparison
    SEARCH = "search"  # a configuration the search sampled, or one of its racing seeds
    CONFIRMATION = "confirmation"  # a held-out seed of the search's pick (the answer's test)


@dataclass(frozen=True)
class Reference:
    """What a trial's accuracy drop is measured against: the teacher's dev accuracy, or
    the baseline's (its students' mean dev accuracy over the seeds finished when the trial
    was claimed). ``accuracy`` is None only for the baseline's first seed with a baseline
    reference: it is its own reference (a drop of 0)."""

    kind: Literal["teacher", "baseline"]
    accuracy: float | None

    def drop(self, student_accuracy: float) -> float:
        if self.accuracy is None:
            return 0.0
        return self.accuracy - student_accuracy

    @property
    def description(self) -> str:
        if self.accuracy is None:
            return "its own (the baseline's first seed)"
        return f"the {self.kind}'s dev accuracy {self.accuracy:.4f}"


@dataclass(frozen=True)
class Placement:
    """Where a trial sits in the study: its configuration, which of its seeds, and why."""

    config: str
    replicate: int
    seed: int
    role: Role


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial runs with, typed. Recorded on the trial as ``to_attr()``."""

    config: str  # the configuration id (stable hash of the searched values)
    replicate: int  # which of the configuration's seeds (0: the first)
    seed: int  # the training seed: the new head, dropout, the data order
    role: Role
    hyperparameters: Hyperparameters  # stage 2, every key (searched and fixed)
    stage1: Stage1Spec | None  # stage 1 in this trial with these settings, or None
    depth: int | None  # the student's depth when made of teacher layers
    reference: Reference
    baseline_accuracy: float | None  # the baseline's mean dev accuracy, when known
    precision: Precision  # training (and evaluations during it); scoring is always fp32

    @property
    def protected(self) -> bool:
        """Never pruned: the baseline (every trial's point of comparison), the further
        seeds of a configuration (it earned them) and confirmation seeds."""
        return self.role != Role.SEARCH or self.replicate > 0

    @property
    def is_baseline_reference(self) -> bool:
        """The baseline's first seed under a baseline reference: its own reference."""
        return self.reference.kind == "baseline" and self.reference.accuracy is None

    def to_attr(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "replicate": self.replicate,
            "seed": self.seed,
            "role": self.role.value,
            "hyperparameters": self.hyperparameters.model_dump(),
            "stage1": self.stage1.model_dump() if self.stage1 is not None else None,
            "depth": self.depth,
            "reference": {"kind": self.reference.kind, "accuracy": self.reference.accuracy},
            "baseline_accuracy": self.baseline_accuracy,
            "precision": self.precision,
        }

    @classmethod
    def from_attr(cls, raw: Mapping[str, Any] | None) -> TrialConfig | None:
        if not raw:
            return None
        stage1 = raw.get("stage1")
        return cls(
            config=str(raw["config"]),
            replicate=int(raw["replicate"]),
            seed=int(raw["seed"]),
            role=Role(raw["role"]),
            hyperparameters=Hyperparameters.model_validate(raw["hyperparameters"]),
            stage1=Stage1Spec.model_validate(stage1) if stage1 is not None else None,
            depth=raw.get("depth"),
            reference=Reference(raw["reference"]["kind"], raw["reference"]["accuracy"]),
            baseline_accuracy=raw.get("baseline_accuracy"),
            precision=raw["precision"],
        )


def config_id(params: Mapping[str, Any]) -> str:
    """A configuration's name: the stable hash of its searched values."""
    return stable_hash({k: params[k] for k in sorted(params)}, length=12)


def replicate_seed(study_seed: int, replicate: int) -> int:
    """The training seed of replicate ``replicate`` of every configuration: the study's
    seed for the first, then a fixed sequence derived from it (the same for every
    configuration: common random numbers)."""
    if replicate == 0:
        return study_seed
    return stable_int([study_seed, "replicate", replicate], bits=32)


def confirmation_seed(study_seed: int, index: int) -> int:
    """The ``index``-th held-out seed: a sequence of its own, so no search replicate of any
    configuration ever trains with one of them."""
    return stable_int([study_seed, "confirmation", index], bits=32)


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The paper's default configuration, restricted to the searched hyperparameters."""
    values = {**spec.defaults.model_dump(), DEPTH: spec.student.teacher_layers}
    if spec.stage1 is not None:
        values.update({STAGE1_PREFIX + k: v for k, v in spec.stage1.model_dump().items()})
    return {name: values[name] for name in spec.search_space}


def _typed(name: str, value: Any) -> Any:
    return int(value) if name in INTEGER_HYPERPARAMETERS else float(value)


def trial_hyperparameters(spec: StudySpec, params: Mapping[str, Any]) -> Hyperparameters:
    """The full, typed stage-2 hyperparameters of a trial: searched values over the defaults."""
    values = spec.defaults.model_dump()
    values.update({k: _typed(k, v) for k, v in params.items() if k in Hyperparameters.model_fields})
    return Hyperparameters(**values)


def trial_stage1(spec: StudySpec, params: Mapping[str, Any]) -> Stage1Spec | None:
    """The trial's stage-1 settings when it runs stage 1 itself (its settings or the
    student's depth searched, or ``stage1.per_seed``); None otherwise."""
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


def trial_depth(spec: StudySpec, params: Mapping[str, Any]) -> int | None:
    """The student's depth in this trial (built from the teacher's first layers), or
    None for a student checkpoint."""
    if DEPTH in params:
        return int(params[DEPTH])
    return spec.student.teacher_layers


@dataclass(frozen=True)
class KnownAccuracies:
    """The dev accuracies a trial's drop can be measured against, as the study knows them
    when the trial is claimed."""

    teacher: float | None  # the study's teacher (StudyAttr.TEACHER), once its assets exist
    baseline: float | None  # the baseline's students, mean over its finished seeds


def reference_for(spec: StudySpec, placement: Placement, known: KnownAccuracies) -> Reference:
    """The trial's accuracy reference (``thresholds.accuracy_reference``)."""
    if spec.thresholds.accuracy_reference == "teacher":
        if known.teacher is None:
            raise ValueError("the teacher's dev accuracy is not recorded yet (no study assets)")
        return Reference("teacher", known.teacher)
    if known.baseline is None and placement.role != Role.BASELINE:
        raise ValueError("accuracy_reference is 'baseline' but the baseline has no result")
    return Reference("baseline", known.baseline)


def resolve(
    spec: StudySpec,
    placement: Placement,
    params: Mapping[str, Any],
    known: KnownAccuracies,
    precision: Precision,
) -> TrialConfig:
    """The trial config of the trial at ``placement`` with searched values ``params``.
    Raises pydantic's ValidationError for values outside the schema (an enqueued trial
    the schema refuses: the trial fails with that error)."""
    return TrialConfig(
        config=placement.config,
        replicate=placement.replicate,
        seed=placement.seed,
        role=placement.role,
        hyperparameters=trial_hyperparameters(spec, params),
        stage1=trial_stage1(spec, params),
        depth=trial_depth(spec, params),
        reference=reference_for(spec, placement, known),
        baseline_accuracy=known.baseline,
        precision=precision,
    )
