"""The stages of a distillation, one lifecycle over the one training loop.

A ``Stage`` names its rows, builds its objective for the model it trains, and builds its
``LoopSettings`` from its own spec section; ``run_stage`` seeds the dropout masks and runs
``training.fit``:

- ``TeacherFinetuning`` (``teacher.finetune``): the teacher on the labels, AdamW with
  warmup, once per study;
- ``IntermediateLayers`` (``stage1``): TinyBERT stage 1, attention-score and hidden-state
  MSE, constant learning rate; once per study (``shared_stage1_student``) or in every
  trial that searches its settings or the depth, or asks for it per seed;
- ``PredictionLayer`` (the trial's hyperparameters): TinyBERT stage 2, the soft
  cross-entropy against the teacher's cached logits or its train-mode forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel

from kdsearch.service.hashing import stable_hash
from kdsearch.service.spec import FinetuneSpec, Stage1Spec, StudySpec, TrainingSpec
from kdsearch.service.trial_config import TrialConfig
from kdsearch.workers.assets import StudyAssets
from kdsearch.workers.batching import Batching, Encoded
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.distill import CachedTargets, DropoutTargets, LogitDistillation
from kdsearch.workers.intermediate import (
    SCORES_ATTENTION,
    IntermediateDistillation,
    trained_fit_dense,
)
from kdsearch.workers.models import Loading, fresh_student, shared_teacher
from kdsearch.workers.packages import resolve_model_ref
from kdsearch.workers.training import (
    EvalGrid,
    FitHooks,
    LabelCrossEntropy,
    LoopSettings,
    Objective,
    fit,
)

logger = logging.getLogger(__name__)


class Stage(Protocol):
    label: str

    def rows(self) -> Encoded: ...

    def objective(self, model: PreTrainedModel) -> Objective: ...

    def loop_settings(self) -> LoopSettings: ...


_NO_HOOKS = FitHooks()


def run_stage(
    stage: Stage, model: PreTrainedModel, device: torch.device, hooks: FitHooks = _NO_HOOKS
) -> list[float]:
    """Train ``model`` through ``stage``; returns each epoch's mean loss."""
    settings = stage.loop_settings()
    objective = stage.objective(model)
    torch.manual_seed(settings.seed)  # dropout masks: the same on every path and process
    return fit(model, stage.rows(), objective, settings, device, replace(hooks, label=stage.label))


@dataclass(frozen=True)
class TeacherFinetuning:
    """The teacher fine-tuned on the labels (``teacher.finetune``)."""

    settings: FinetuneSpec
    train: Encoded
    seed: int
    label: str = "teacher fine-tuning"

    def rows(self) -> Encoded:
        return self.train

    def objective(self, model: PreTrainedModel) -> Objective:
        return LabelCrossEntropy(self.train.labels)

    def loop_settings(self) -> LoopSettings:
        s = self.settings
        return LoopSettings(
            learning_rate=s.learning_rate, batch_size=s.batch_size, epochs=s.epochs,
            weight_decay=s.weight_decay, warmup_proportion=s.warmup_proportion, seed=self.seed,
        )  # fmt: skip


def tinybert_batching(max_seq_length: int) -> Batching:
    """TinyBERT's batches: its DataLoader's shuffle (drawn from the global generator, as
    ``RandomSampler`` does), padded to max_seq_length, the last, smaller batch of an epoch
    skipped."""
    return Batching(order="dataloader", pad_to=max_seq_length, drop_last=True)


@dataclass(frozen=True)
class IntermediateLayers:
    """TinyBERT stage 1 on a student loaded with ``SCORES_ATTENTION``."""

    settings: Stage1Spec
    training: TrainingSpec
    train: Encoded  # the training rows (augmented ones when the spec has them)
    teacher: PreTrainedModel  # loaded with SCORES_ATTENTION
    checkpoint: str | None  # the student checkpoint, whose trained fit_dense starts stage 1
    seed: int
    max_seq_length: int
    dtype: torch.dtype | None
    label: str = "stage 1"

    def rows(self) -> Encoded:
        return self.train

    def objective(self, model: PreTrainedModel) -> Objective:
        objective = IntermediateDistillation(
            model, self.teacher, self.settings.matching, self.training.teacher_targets == "dropout"
        )
        fit_dense = (
            trained_fit_dense(resolve_model_ref(self.checkpoint)) if self.checkpoint else None
        )
        if fit_dense is not None:
            objective.loss.fit_dense.load_state_dict(fit_dense)
            logger.info("stage 1 starts from the checkpoint's trained fit_dense")
        else:
            torch.manual_seed(self.seed)  # a new fit_dense, initialised from the seed
            objective.loss.fit_dense.reset_parameters()
        return objective

    def loop_settings(self) -> LoopSettings:
        s = self.settings
        batching = tinybert_batching(self.max_seq_length) if s.matching == "padded" else Batching()
        return LoopSettings(
            learning_rate=s.learning_rate, batch_size=s.batch_size, epochs=s.epochs,
            weight_decay=s.weight_decay, schedule="constant", optimizer=self.training.optimizer,
            dtype=self.dtype, seed=self.seed, batching=batching,
        )  # fmt: skip


@dataclass(frozen=True)
class PredictionLayer:
    """TinyBERT stage 2 with one trial's hyperparameters."""

    config: TrialConfig
    training: TrainingSpec
    probe_every_steps: int | None
    train: Encoded
    targets: CachedTargets | DropoutTargets
    max_seq_length: int
    dtype: torch.dtype | None
    label: str = "distillation"

    def rows(self) -> Encoded:
        return self.train

    def objective(self, model: PreTrainedModel) -> Objective:
        return LogitDistillation(self.targets, self.config.hyperparameters.temperature)

    def loop_settings(self) -> LoopSettings:
        h, training = self.config.hyperparameters, self.training
        periods = (training.eval_every_steps, self.probe_every_steps)
        grid = EvalGrid(tuple(sorted({p for p in periods if p})), training.eval_grid == "tinybert")
        batching = (
            tinybert_batching(self.max_seq_length)
            if training.batching == "tinybert"
            else Batching()
        )
        return LoopSettings(
            learning_rate=h.learning_rate, batch_size=h.batch_size, epochs=h.epochs,
            weight_decay=h.weight_decay, warmup_proportion=h.warmup_proportion, grid=grid,
            optimizer=training.optimizer, dtype=self.dtype, seed=self.config.seed,
            batching=batching,
        )  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        settings = self.loop_settings()
        return settings.batching.steps_per_epoch(len(self.train), settings.batch_size)


def study_teacher(assets: StudyAssets, attention: str | None = None) -> PreTrainedModel:
    """The teacher the trials distil from, read once per process: the study's fine-tuned
    copy from the cache (safetensors only: other machines write the cache) or the spec's."""
    own = Path(assets.teacher) == assets.folder / "teacher"
    loading = Loading(attention=attention, safetensors_only=own)
    return shared_teacher(assets.teacher, assets.num_labels, loading)


def shared_stage1_student(
    spec: StudySpec,
    assets: StudyAssets,
    cache: AssetCache,
    device: torch.device,
    dtype: torch.dtype | None,
) -> Path:
    """The study's stage-1 student, distilled once (fixed stage-1 settings) and shared."""
    assert spec.stage1 is not None
    stage1 = spec.stage1
    key = stable_hash(
        {
            "assets": assets.folder.name,
            "student": spec.student.model_dump(mode="json"),
            "stage1": stage1.model_dump(),
            "training": {
                "optimizer": spec.training.optimizer,
                "teacher_targets": spec.training.teacher_targets,
            },
            "seed": spec.seed,
        }
    )

    def build(tmp: Path) -> None:
        student = fresh_student(
            assets.student_source,
            assets.num_labels,
            spec.seed,
            student_loading(Recipe.of(spec), assets, SCORES_ATTENTION, spec.student.teacher_layers),
        )
        stage = IntermediateLayers(
            stage1, spec.training, assets.teacher_inputs.training,
            study_teacher(assets, SCORES_ATTENTION), spec.student.model, spec.seed,
            spec.max_seq_length, dtype,
        )  # fmt: skip
        run_stage(stage, student, device)
        student.save_pretrained(tmp)

    return cache.folder(f"stage1-{key}", "the stage-1 student", build)


@dataclass(frozen=True)
class Recipe:
    """The spec sections a trial trains and scores with, typed and passed down (the
    compute side never reads the whole spec)."""

    task: str
    training: TrainingSpec
    stage1: Stage1Spec | None
    student_checkpoint: str | None  # student.model (its fit_dense starts stage 1)
    max_seq_length: int
    eval_batch_size: int
    probe_size: int
    probe_every_steps: int | None
    probe_seed: int  # the study's seed: every trial probes the same rows

    @classmethod
    def of(cls, spec: StudySpec) -> Recipe:
        return cls(
            task=spec.task,
            training=spec.training,
            stage1=spec.stage1,
            student_checkpoint=spec.student.model,
            max_seq_length=spec.max_seq_length,
            eval_batch_size=spec.eval_batch_size,
            probe_size=spec.pruning.probe_size,
            probe_every_steps=spec.pruning.probe_every_steps,
            probe_seed=spec.seed,
        )


def student_loading(
    recipe: Recipe, assets: StudyAssets, attention: str | None, depth: int | None
) -> Loading:
    """How the study's students load: the first ``depth`` layers of the source (made of
    teacher layers), safetensors only from kdsearch's own cache, the spec's head."""
    own = Path(assets.student_source) == assets.folder / "teacher"
    return Loading(
        attention=attention,
        safetensors_only=own,
        layers=depth if recipe.student_checkpoint is None else None,
        head=recipe.training.student_head,
        labels=assets.label_names,
    )
