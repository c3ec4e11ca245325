"""One trial: distil a fresh student's prediction layer (after stage 1, when the trial runs
it), then score it (setup, train, evaluate, cleanup). ``build_trial`` is the one place a
trial is made from (spec, study assets, params, device): the worker and
``kdsearch export`` both use it.

Evaluations during training serve everything that needs one: the pruning probe (sigma on
a fixed train subset, the accuracy drop on dev) and checkpoint selection (the dev metric,
``training.selection: best_dev``). The last evaluation is the final scoring itself, and
the selected student's dev predictions are reused: no pass over data is made twice.
"""

from __future__ import annotations

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
from kdsearch.service.spec import Hyperparameters, Stage1Spec, StudySpec
from kdsearch.service.study import trial_depth, trial_hyperparameters, trial_stage1
from kdsearch.workers.assets import StudyAssets, run_stage1, student_source
from kdsearch.workers.device import peak_memory
from kdsearch.workers.distill import LogitDistillation
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.intermediate import SCORES_ATTENTION
from kdsearch.workers.metrics import (
    accuracy,
    confidence_stats,
    expected_calibration_error,
    selection_metric,
    task_metrics,
)
from kdsearch.workers.models import load_model, load_student
from kdsearch.workers.training import LoopSettings, fit

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
    """One hyperparameter setting, from a fresh student to its scored outcome.

    ``on_probe`` receives a ``ProbePoint`` at every evaluation (each epoch end, and every
    ``training.eval_every_steps`` / ``pruning.probe_every_steps`` steps); it records it and
    may raise ``optuna.TrialPruned``. ``reference_accuracy``: the dev accuracy the drop is
    measured against (the teacher's, or the baseline's with ``accuracy_reference:
    baseline``); ``baseline_accuracy`` adds the drop against the baseline whatever the
    reference, once the baseline has finished.
    """

    def __init__(
        self,
        spec: StudySpec,
        assets: StudyAssets,
        hparams: Hyperparameters,
        device: torch.device,
        seed: int,
        on_probe: Callable[[ProbePoint], None] | None = None,
        stage1: Stage1Spec | None = None,
        depth: int | None = None,
        baseline_accuracy: float | None = None,
        is_baseline: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``stage1``: run stage 1 in this trial with these settings; otherwise the trial
        starts from the study's shared stage-1 student when it has one
        (``assets.stage1_student``). ``depth``: the student's layers, when it is made
        from the teacher's."""
        self.spec = spec
        self.assets = assets
        self.hparams = hparams
        self.device = device
        self.seed = seed
        self.on_probe = on_probe
        self.stage1 = stage1
        self.depth = depth
        self.dtype = dtype  # training and evaluations during it; final scoring is fp32
        self.baseline_accuracy = baseline_accuracy
        self.is_baseline = is_baseline
        # None: the baseline measured against itself (known once it is scored).
        self.reference_accuracy: float | None = assets.teacher_dev_accuracy
        if spec.thresholds.accuracy_reference == "baseline":
            self.reference_accuracy = None if is_baseline else baseline_accuracy
            if not is_baseline and baseline_accuracy is None:
                raise ValueError("accuracy_reference is 'baseline' but the baseline has no result")
        self.stage1_losses: list[float] | None = None
        self.student: PreTrainedModel | None = None
        self.inputs = assets.student_inputs
        self.probe_index = probe_indices(len(self.inputs.train), spec.pruning.probe_size, spec.seed)
        self.probe_data = self.inputs.train.subset(self.probe_index)
        self.probe_teacher = assets.teacher_probs_train[self.probe_index]
        self.evaluations: list[_Evaluation] = []
        self.best: _Evaluation | None = None

    # --- setup -----------------------------------------------------------------------

    def setup(self) -> None:
        spec, assets = self.spec, self.assets
        if assets.stage1_student is not None:
            # The study's stage-1 student, distilled once; its classifier head (untouched
            # by stage 1) is drawn again from the trial's seed, as a fresh student's is,
            # and the seed is set again before stage 2: deterministic on this path too.
            self.student = load_model(
                str(assets.stage1_student),
                "stage-1 student",
                assets.num_labels,
                safetensors_only=True,
            )
            torch.manual_seed(self.seed)
            self.student.classifier.apply(self.student._init_weights)
            return
        attention = SCORES_ATTENTION if self.stage1 is not None else None
        self.student = load_student(
            spec.student,
            student_source(spec, assets),
            assets.num_labels,
            self.seed,
            attention=attention,
            layers=self.depth,
        )
        if self.stage1 is not None:
            self.stage1_losses = run_stage1(
                spec, assets, self.student, self.stage1, self.device, self.seed, self.dtype
            )

    # --- train -----------------------------------------------------------------------

    def loop_settings(self) -> LoopSettings:
        h, training = self.hparams, self.spec.training
        periods = (training.eval_every_steps, self.spec.pruning.probe_every_steps)
        return LoopSettings(
            learning_rate=h.learning_rate,
            batch_size=h.batch_size,
            epochs=h.epochs,
            weight_decay=h.weight_decay,
            warmup_proportion=h.warmup_proportion,
            eval_every_steps=tuple(sorted({p for p in periods if p})),
            optimizer=training.optimizer,
            dtype=self.dtype,
        )

    @property
    def training_data(self) -> Any:
        """What stage 2 trains on: the augmented train split when the spec has one."""
        return self.inputs.train_augmented or self.inputs.train

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.training_data) / self.hparams.batch_size)

    def train(self) -> list[float]:
        assert self.student is not None, "call setup() first"
        data = self.training_data
        objective = LogitDistillation(self.assets.distill_targets, self.hparams.temperature)
        torch.manual_seed(self.seed)  # dropout masks: the same on every path and process
        return fit(
            self.student,
            data,
            objective,
            self.loop_settings(),
            self.device,
            seed=self.seed,
            pad_id=self.inputs.pad_id,
            on_eval=self.evaluate_at,
            label="distillation",
        )

    # --- evaluate --------------------------------------------------------------------

    def _logits(self, data: Any, scoring: bool = False) -> torch.Tensor:
        """The student's logits on ``data``: in fp32 for the final scoring, else at the
        training precision."""
        assert self.student is not None
        batch, pad = self.spec.eval_batch_size, self.inputs.pad_id
        dtype = None if scoring else self.dtype
        return predict_logits(self.student, data, batch, self.device, pad, dtype=dtype)

    def evaluate_at(self, epoch: float) -> None:
        """One evaluation after ``epoch`` epochs of training: dev for the drop and the
        selection metric, the probe subset for the probe's sigma; at the last epoch end,
        the whole train split instead (it is the final scoring, and holds the probe)."""
        final = epoch == self.hparams.epochs
        selecting = self.spec.training.selection == "best_dev"
        if not (final or selecting or self.on_probe is not None):
            return  # nobody reads this evaluation (export re-trains with selection: last)
        # The last evaluation is the final scoring: fp32, and the whole train split.
        dev_logits = self._logits(self.inputs.dev, scoring=final)
        train_logits = self._logits(self.inputs.train, scoring=True) if final else None
        probe_logits = train_logits[self.probe_index] if final else self._logits(self.probe_data)
        dev_probs = probabilities(dev_logits)
        labels_dev = self.assets.labels_dev
        evaluation = _Evaluation(
            epoch, dev_logits, train_logits, selection_metric(self.spec.task, dev_probs, labels_dev)
        )
        self.evaluations.append(evaluation)
        if selecting and (self.best is None or evaluation.metric > self.best.metric):
            # A copy of the weights: the best student so far, to score at the end.
            assert self.student is not None
            evaluation.state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            if self.best is not None:
                self.best.state = None
            self.best = evaluation
        if self.on_probe is None:
            return
        point = ProbePoint(
            epoch=epoch,
            epochs=self.hparams.epochs,
            sigma=confidence_stats(
                self.probe_teacher,
                probabilities(probe_logits),
                self.assets.labels_train[self.probe_index],
            ).sigma,
            accuracy_drop=(self.reference_accuracy or self.assets.teacher_dev_accuracy)
            - accuracy(dev_probs, labels_dev),
        )
        logger.info(
            "evaluation after epoch %.4g: probe sigma %.6f, accuracy_drop %.4f, %s %.4f",
            epoch, point.sigma, point.accuracy_drop, "dev metric", evaluation.metric,
        )  # fmt: skip
        self.on_probe(point)

    def scored_logits(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(train logits, dev logits, the epoch they are from when selected): the student
        after the last epoch, or the best evaluation's, reusing what was computed."""
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
        outcome = score(
            self.spec,
            self.assets,
            probs_train,
            probs_dev,
            epoch_losses=losses,
            wall_time_s=time.perf_counter() - start,
            reference_accuracy=self.reference_accuracy,
            baseline_accuracy=self.baseline_accuracy,
            is_baseline=self.is_baseline,
            selected_epoch=selected,
            stage1_epoch_losses=self.stage1_losses,
            peak_memory_mb=memory.get("peak_memory_mb"),
        )
        return TrialResult(outcome, probs_train, probs_dev)


def build_trial(
    spec: StudySpec,
    assets: StudyAssets,
    params: dict[str, Any],
    device: torch.device,
    on_probe: Callable[[ProbePoint], None] | None = None,
    baseline_accuracy: float | None = None,
    is_baseline: bool = False,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> DistillationTrial:
    """The trial for ``params`` (the searched values; the rest from the spec), trained
    with ``seed`` (a replicate's; default the study's). ``baseline_accuracy``: the
    baseline student's dev accuracy, once known."""
    return DistillationTrial(
        spec,
        assets,
        trial_hyperparameters(spec, params),
        device,
        seed=spec.seed if seed is None else seed,
        on_probe=on_probe,
        stage1=trial_stage1(spec, params),
        depth=trial_depth(spec, params),
        baseline_accuracy=baseline_accuracy,
        is_baseline=is_baseline,
        dtype=dtype,
    )


def score(
    spec: StudySpec,
    assets: StudyAssets,
    probs_train: np.ndarray,
    probs_dev: np.ndarray,
    epoch_losses: list[float],
    wall_time_s: float,
    reference_accuracy: float | None = None,
    baseline_accuracy: float | None = None,
    is_baseline: bool = False,
    selected_epoch: float | None = None,
    stage1_epoch_losses: list[float] | None = None,
    peak_memory_mb: float | None = None,
) -> TrialOutcome:
    """Every figure of a trial from the student's probabilities on train and dev."""
    labels_train, labels_dev = assets.labels_train, assets.labels_dev
    teacher_train, teacher_dev = assets.teacher_probs_train, assets.teacher_probs_dev
    on_train = confidence_stats(teacher_train, probs_train, labels_train)
    on_dev = confidence_stats(teacher_dev, probs_dev, labels_dev)
    teacher_metrics = assets.teacher_metrics
    student_metrics = task_metrics(spec.task, probs_dev, labels_dev)
    student_accuracy = student_metrics["accuracy"]
    if is_baseline:  # the baseline is its own reference: drop 0 against itself
        baseline_accuracy = student_accuracy
    if reference_accuracy is None:
        reference_accuracy = (
            student_accuracy
            if is_baseline and spec.thresholds.accuracy_reference == "baseline"
            else assets.teacher_dev_accuracy
        )
    reference = reference_accuracy
    return TrialOutcome(
        sigma=on_train.sigma,
        accuracy_drop=reference - student_accuracy,
        accuracy_drop_teacher=assets.teacher_dev_accuracy - student_accuracy,
        accuracy_drop_baseline=None
        if baseline_accuracy is None
        else baseline_accuracy - student_accuracy,
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
        epoch_losses=epoch_losses,
        # Interpretive bound of the paper (sec. 1.4): sqrt(beta / |X_train|) with beta the
        # final stage-2 loss summed over the train set, i.e. sqrt(mean final loss).
        sigma_bound=float(np.sqrt(epoch_losses[-1])) if epoch_losses else float("nan"),
        wall_time_s=wall_time_s,
        selected_epoch=selected_epoch,
        stage1_epoch_losses=stage1_epoch_losses,
        peak_memory_mb=peak_memory_mb,
    )
