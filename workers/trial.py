"""One trial: distil a fresh student's prediction layer (after stage 1, when the trial runs
it), then score it (setup, train, evaluate, cleanup). A trial is made from what the claim
resolved (``TrialConfig``), the spec sections it needs (``Recipe``), the study assets and
a device: the worker and ``kdsearch export`` both make it that way.

Evaluations during training serve everything that needs one: the pruning probe (sigma on
a fixed train subset, the accuracy drop on dev) and checkpoint selection (the dev metric,
``training.selection: best_dev``). With kdsearch's evaluation grid the last evaluation is
the final scoring itself, and the selected student's dev predictions are reused: no pass
over data is made twice.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from kdsearch.service.record import ProbePoint, TrialOutcome
from kdsearch.service.trial_config import Precision, TrialConfig
from kdsearch.workers.assets import StudyAssets
from kdsearch.workers.batching import consume_dataloader_draw
from kdsearch.workers.device import dtype_of, peak_memory
from kdsearch.workers.distill import CachedTargets, DropoutTargets
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.intermediate import SCORES_ATTENTION
from kdsearch.workers.metrics import (
    accuracy,
    confidence_stats,
    expected_calibration_error,
    selection_metric,
    task_metrics,
)
from kdsearch.workers.models import Loading, fresh_student
from kdsearch.workers.stages import (
    IntermediateLayers,
    PredictionLayer,
    Recipe,
    run_stage,
    student_loading,
    study_teacher,
)
from kdsearch.workers.training import FitHooks

logger = logging.getLogger(__name__)


@dataclass
class TrialResult:
    outcome: TrialOutcome
    student_probs_train: np.ndarray = field(repr=False)  # (N_train, C)
    student_probs_dev: np.ndarray = field(repr=False)  # (N_dev, C)

    @property
    def sigma(self) -> float:
        return self.outcome.sigma

    @property
    def accuracy_drop(self) -> float:
        return self.outcome.accuracy_drop


@dataclass(frozen=True)
class TrialHooks:
    """What a trial tells its session while it runs."""

    on_probe: Callable[[ProbePoint], None] | None = None
    """Receives a ``ProbePoint`` at every evaluation; may raise ``optuna.TrialPruned``."""
    cancelled: Callable[[], bool] | None = None
    """Asked after every training step; True stops the trial (``training.Cancelled``)."""


def probe_indices(n_train: int, size: int, seed: int) -> list[int]:
    """A fixed, seeded subset of train rows: every trial's probe sees the same inputs."""
    if size >= n_train:
        return list(range(n_train))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_train, generator=generator)[:size].tolist())


@dataclass
class _Evaluation:
    epoch: float
    dev_logits: torch.Tensor  # (N_dev, C)
    train_logits: torch.Tensor | None  # (N_train, C): only at the last epoch end
    metric: float  # the selection metric on dev
    state: dict[str, torch.Tensor] | None = None  # the student's weights (best_dev only)


class DistillationTrial:
    """One trial config, from a fresh student to its scored outcome."""

    def __init__(
        self,
        config: TrialConfig,
        recipe: Recipe,
        assets: StudyAssets,
        device: torch.device,
        hooks: TrialHooks = TrialHooks(),
    ) -> None:
        """Stage 1 runs in this trial when ``config.stage1`` is set; otherwise the trial
        starts from the study's shared stage-1 student when it has one."""
        self.config = config
        self.recipe = recipe
        self.assets = assets
        self.device = device
        self.hooks = hooks
        self.dtype = dtype_of(config.precision)  # training and evaluations during it
        self.stage1_losses: list[float] | None = None
        self.student: PreTrainedModel | None = None
        self.inputs = assets.student_inputs
        self.probe_index = probe_indices(
            len(self.inputs.train), recipe.probe_size, recipe.probe_seed
        )
        self.probe_data = self.inputs.train.subset(self.probe_index)
        self.probe_teacher = assets.teacher_probs_train[self.probe_index]
        self.evaluations: list[_Evaluation] = []
        self.best: _Evaluation | None = None
        self.stage = PredictionLayer(
            config, recipe.training, recipe.probe_every_steps, self.inputs.training,
            self._targets(), recipe.max_seq_length, self.dtype,
        )  # fmt: skip

    def _targets(self) -> CachedTargets | DropoutTargets:
        if self.recipe.training.teacher_targets == "dropout":
            return DropoutTargets(study_teacher(self.assets))
        return CachedTargets(self.assets.distill_targets)

    @property
    def steps_per_epoch(self) -> int:
        return self.stage.steps_per_epoch

    # --- setup -----------------------------------------------------------------------

    def setup(self) -> None:
        config, assets, recipe = self.config, self.assets, self.recipe
        head = recipe.training.student_head
        if assets.stage1_student is not None and config.stage1 is None:
            # The study's stage-1 student, distilled once; its classifier head (untouched
            # by stage 1) is drawn again from the trial's seed, as a fresh student's is,
            # and the seed is set again before stage 2: deterministic on this path too.
            loading = Loading(safetensors_only=True, head=head, labels=assets.label_names)
            self.student = fresh_student(
                str(assets.stage1_student), assets.num_labels, config.seed, loading
            )
            torch.manual_seed(config.seed)
            self.student.classifier.apply(self.student._init_weights)
            return
        attention = SCORES_ATTENTION if config.stage1 is not None else None
        loading = student_loading(recipe, assets, attention, config.depth)
        self.student = fresh_student(assets.student_source, assets.num_labels, config.seed, loading)
        if config.stage1 is not None:
            stage = IntermediateLayers(
                config.stage1, recipe.training, assets.teacher_inputs.training,
                study_teacher(assets, SCORES_ATTENTION), recipe.student_checkpoint,
                config.seed, recipe.max_seq_length, self.dtype,
            )  # fmt: skip
            self.stage1_losses = run_stage(stage, self.student, self.device, self._fit_hooks())
            self.student.set_attn_implementation("sdpa")  # stage 2 needs no scores

    def _fit_hooks(self, on_eval: Callable[[float], None] | None = None) -> FitHooks:
        return FitHooks(on_eval=on_eval, cancelled=self.hooks.cancelled)

    # --- train -----------------------------------------------------------------------

    def train(self) -> list[float]:
        assert self.student is not None, "call setup() first"
        return run_stage(self.stage, self.student, self.device, self._fit_hooks(self.evaluate_at))

    # --- evaluate --------------------------------------------------------------------

    def _logits(self, data: Any, scoring: bool = False) -> torch.Tensor:
        """The student's logits on ``data``: in fp32 for the final scoring, else at the
        training precision."""
        assert self.student is not None
        dtype = None if scoring else self.dtype
        return predict_logits(
            self.student, data, self.device, self.recipe.eval_batch_size, dtype=dtype
        )

    @property
    def _selecting(self) -> bool:
        return self.recipe.training.selection == "best_dev"

    def evaluate_at(self, epoch: float) -> None:
        """One evaluation after ``epoch`` epochs of training: dev for the drop and the
        selection metric, the probe subset for the probe's sigma; at the last epoch end,
        the whole train split instead (it is the final scoring, and holds the probe)."""
        final = epoch == self.config.hyperparameters.epochs
        if self.recipe.training.eval_grid == "tinybert":
            consume_dataloader_draw()  # TinyBERT's dev DataLoader, at each of its evaluations
        if not (final or self._selecting or self.hooks.on_probe is not None):
            return  # nobody reads this evaluation (export re-trains with selection: last)
        # The last evaluation is the final scoring: fp32, and the whole train split.
        dev_logits = self._logits(self.inputs.dev, scoring=final)
        train_logits = self._logits(self.inputs.train, scoring=True) if final else None
        probe_logits = train_logits[self.probe_index] if final else self._logits(self.probe_data)
        dev_probs = probabilities(dev_logits)
        labels_dev = self.assets.labels_dev
        metric = selection_metric(self.recipe.task, dev_probs, labels_dev)
        evaluation = _Evaluation(epoch, dev_logits, train_logits, metric)
        self.evaluations.append(evaluation)
        # TinyBERT keeps a checkpoint only when its metric beats the best so far, starting
        # from 0: on its grid, a student that never beats 0 has no candidate.
        floor = 0.0 if self.recipe.training.eval_grid == "tinybert" else -math.inf
        best = self.best.metric if self.best is not None else floor
        if self._selecting and evaluation.metric > best:
            # A copy of the weights: the best student so far, to score at the end.
            assert self.student is not None
            evaluation.state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            if self.best is not None:
                self.best.state = None
            self.best = evaluation
        if self.hooks.on_probe is None:
            return
        sigma = confidence_stats(
            self.probe_teacher,
            probabilities(probe_logits),
            self.assets.labels_train[self.probe_index],
        ).sigma
        drop = self.config.reference.drop(accuracy(dev_probs, labels_dev))
        point = ProbePoint(epoch=epoch, epochs=self.config.hyperparameters.epochs, sigma=sigma,
                           accuracy_drop=drop)  # fmt: skip
        logger.info(
            "evaluation after epoch %.4g: probe sigma %.6f, accuracy_drop %.4f against %s, "
            "dev metric %.4f",
            epoch, point.sigma, point.accuracy_drop, self.config.reference.description, metric,
        )  # fmt: skip
        self.hooks.on_probe(point)

    def scored_logits(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(train logits, dev logits, the epoch they are from when selected): the student
        after training, or the best evaluation's, reusing what was computed."""
        assert self.student is not None
        last = self.evaluations[-1] if self.evaluations else None
        best = self.best
        if best is not None and best is not last:
            assert best.state is not None
            self.student.load_state_dict(best.state)
            # Its dev logits from the evaluation are reused unless they were bf16 ones.
            dev = best.dev_logits if self.dtype is None else self._logits(self.inputs.dev, True)
            return self._logits(self.inputs.train, scoring=True), dev, best.epoch
        selected = best.epoch if best is not None else None
        if last is not None and last.train_logits is not None:
            return last.train_logits, last.dev_logits, selected
        train = self._logits(self.inputs.train, scoring=True)
        return train, self._logits(self.inputs.dev, scoring=True), selected

    # --- cleanup ---------------------------------------------------------------------

    def cleanup(self) -> None:
        self.student = None
        self.evaluations.clear()
        self.best = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, keep_student: bool = False) -> TrialResult:
        """setup, train, evaluate, cleanup. ``keep_student`` leaves the scored student in
        ``self.student`` (for export); the caller then calls ``cleanup()``."""
        start = time.perf_counter()
        memory: dict[str, float] = {}
        try:
            with peak_memory(self.device, memory):
                self.setup()
                losses = self.train()
                train_logits, dev_logits, selected = self.scored_logits()
        finally:
            if not keep_student:
                self.cleanup()
        probs_train, probs_dev = probabilities(train_logits), probabilities(dev_logits)
        outcome = self.score(
            probs_train,
            probs_dev,
            Training(losses, time.perf_counter() - start, selected, self.stage1_losses,
                     memory.get("peak_memory_mb")),
        )  # fmt: skip
        return TrialResult(outcome, probs_train, probs_dev)

    def score(
        self, probs_train: np.ndarray, probs_dev: np.ndarray, training: Training
    ) -> TrialOutcome:
        """Every figure of the trial from the student's probabilities on train and dev."""
        return score(self.config, self.assets, self.recipe.task, (probs_train, probs_dev), training)


@dataclass(frozen=True)
class Training:
    """What a trial's training produced besides the student."""

    epoch_losses: list[float]
    wall_time_s: float
    selected_epoch: float | None = None
    stage1_epoch_losses: list[float] | None = None
    peak_memory_mb: float | None = None


def score(
    config: TrialConfig,
    assets: StudyAssets,
    task: str,
    probs: tuple[np.ndarray, np.ndarray],
    training: Training,
) -> TrialOutcome:
    """Every figure of a trial from the student's probabilities on (train, dev)."""
    probs_train, probs_dev = probs
    labels_train, labels_dev = assets.labels_train, assets.labels_dev
    teacher_train, teacher_dev = assets.teacher_probs_train, assets.teacher_probs_dev
    on_train = confidence_stats(teacher_train, probs_train, labels_train)
    on_dev = confidence_stats(teacher_dev, probs_dev, labels_dev)
    teacher_metrics = assets.teacher_metrics
    student_metrics = task_metrics(task, probs_dev, labels_dev)
    student_accuracy = student_metrics["accuracy"]
    baseline = config.baseline_accuracy
    if config.is_baseline_reference:  # the baseline's first seed: its own reference
        baseline = student_accuracy
    return TrialOutcome(
        sigma=on_train.sigma,
        accuracy_drop=config.reference.drop(student_accuracy),
        accuracy_drop_teacher=assets.teacher_dev_accuracy - student_accuracy,
        accuracy_drop_baseline=None if baseline is None else baseline - student_accuracy,
        **on_train.as_dict("train_"),
        **on_dev.as_dict("dev_"),
        teacher_dev_accuracy=teacher_metrics["accuracy"],
        student_dev_accuracy=student_accuracy,
        teacher_dev_f1=teacher_metrics.get("f1"),
        student_dev_f1=student_metrics.get("f1"),
        teacher_dev_mcc=teacher_metrics.get("mcc"),
        student_dev_mcc=student_metrics.get("mcc"),
        teacher_train_accuracy=assets.teacher_train_accuracy,
        student_train_accuracy=accuracy(probs_train, labels_train),
        teacher_train_ece=expected_calibration_error(teacher_train, labels_train),
        student_train_ece=expected_calibration_error(probs_train, labels_train),
        teacher_dev_ece=expected_calibration_error(teacher_dev, labels_dev),
        student_dev_ece=expected_calibration_error(probs_dev, labels_dev),
        epoch_losses=training.epoch_losses,
        # Interpretive bound of the paper (sec. 1.4): sqrt(beta / |X_train|) with beta the
        # final stage-2 loss summed over the train set, i.e. sqrt(mean final loss).
        sigma_bound=float(np.sqrt(training.epoch_losses[-1]))
        if training.epoch_losses
        else math.nan,
        wall_time_s=training.wall_time_s,
        selected_epoch=training.selected_epoch,
        stage1_epoch_losses=training.stage1_epoch_losses,
        peak_memory_mb=training.peak_memory_mb,
        majority_dev_accuracy=assets.majority_dev_accuracy,
    )


def standalone_config(
    spec: Any, assets: StudyAssets, params: dict[str, Any], seed: int | None = None
) -> TrialConfig:
    """The config of a trial outside any study's claims (benchmarks, experiments, tests):
    a search trial of ``params`` with ``seed`` (default: the study's), measured against
    the teacher, trained in fp32."""
    from kdsearch.service.trial_config import (
        KnownAccuracies,
        Placement,
        Role,
        config_id,
        resolve,
    )

    placement = Placement(config_id(params), 0, spec.seed if seed is None else seed, Role.SEARCH)
    teacher_spec = spec.model_copy(
        update={"thresholds": spec.thresholds.model_copy(update={"accuracy_reference": "teacher"})}
    )
    known = KnownAccuracies(teacher=assets.teacher_dev_accuracy, baseline=None)
    return resolve(teacher_spec, placement, params, known, "fp32")


def standalone_trial(
    spec: Any,
    assets: StudyAssets,
    params: dict[str, Any],
    device: torch.device,
    seed: int | None = None,
    precision: Precision = "fp32",
) -> DistillationTrial:
    """A trial of ``params`` outside any claim (``standalone_config``), as a worker would
    run it: ``standalone_trial(spec, assets, params, device).run()`` (its ``hooks`` may be
    set before it runs)."""
    config = dataclasses.replace(standalone_config(spec, assets, params, seed), precision=precision)
    return DistillationTrial(config, Recipe.of(spec), assets, device)
