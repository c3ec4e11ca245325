"""One trial: distil a fresh student's prediction layer, then score it (setup, train,
evaluate, cleanup). ``build_trial`` is the one place a trial is made from
(spec, study assets, params, device): the worker and ``kdsearch export`` both use it.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from kdsearch.service.record import ProbePoint, TrialOutcome
from kdsearch.service.spec import Hyperparameters, Stage1Spec, StudySpec
from kdsearch.service.study import trial_hyperparameters, trial_stage1
from kdsearch.workers.assets import StudyAssets, run_stage1
from kdsearch.workers.data import NUM_LABELS
from kdsearch.workers.device import peak_memory
from kdsearch.workers.distill import LogitDistillation
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.intermediate import SCORES_ATTENTION
from kdsearch.workers.metrics import (
    accuracy,
    confidence_stats,
    expected_calibration_error,
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


class DistillationTrial:
    """TinyBERT stage 2 (after stage 1, when the trial runs it) for one hyperparameter
    setting.

    ``on_probe`` receives a ``ProbePoint`` after every epoch, and every
    ``pruning.probe_every_steps`` steps when set (sigma on the probe subset of train,
    accuracy_drop on dev); it records it and may raise ``optuna.TrialPruned``.
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
    ) -> None:
        """``stage1``: run stage 1 in this trial with these settings (stage-1
        hyperparameters searched); otherwise the trial starts from the study's shared
        stage-1 student when it has one (``assets.stage1_student``)."""
        self.spec = spec
        self.assets = assets
        self.hparams = hparams
        self.device = device
        self.seed = seed
        self.on_probe = on_probe
        self.stage1 = stage1
        self.stage1_losses: list[float] | None = None
        self.student: PreTrainedModel | None = None
        index = probe_indices(len(assets.train), spec.pruning.probe_size, spec.seed)
        self.probe_data = assets.train.subset(index)
        self.probe_teacher = assets.teacher_probs_train[index]

    def setup(self) -> None:
        spec, assets = self.spec, self.assets
        if assets.stage1_student is not None:
            # The study's stage-1 student, distilled once with the study seed; the seed is
            # set again before the new head and stage 2, so the trial is deterministic.
            torch.manual_seed(self.seed)
            self.student = load_model(
                str(assets.stage1_student), "stage-1 student", NUM_LABELS, safetensors_only=True
            )
            return
        attention = SCORES_ATTENTION if self.stage1 is not None else None
        self.student = load_student(
            spec.student, spec.teacher.model, NUM_LABELS, self.seed, attention=attention
        )
        if self.stage1 is not None:
            self.stage1_losses = run_stage1(
                spec, assets, self.student, self.stage1, self.device, self.seed
            )

    def train(self) -> list[float]:
        assert self.student is not None, "call setup() first"
        h = self.hparams
        loop = LoopSettings(
            learning_rate=h.learning_rate,
            batch_size=h.batch_size,
            epochs=h.epochs,
            weight_decay=h.weight_decay,
            warmup_proportion=h.warmup_proportion,
            eval_every_steps=self.spec.pruning.probe_every_steps,
        )
        torch.manual_seed(self.seed)  # dropout masks: the same on every path and process
        return fit(
            self.student,
            self.assets.train,
            LogitDistillation(self.assets.teacher_logits_train, h.temperature),
            loop,
            self.device,
            seed=self.seed,
            pad_id=self.assets.pad_id,
            on_eval=self.probe if self.on_probe is not None else None,
            label="distillation",
        )

    def probe(self, epoch: float) -> None:
        """The cheap evaluation the pruner decides from, after ``epoch`` epochs of
        training (fractional for probes every N steps)."""
        assert self.student is not None and self.on_probe is not None
        batch, pad = self.spec.eval_batch_size, self.assets.pad_id
        probe_logits = predict_logits(self.student, self.probe_data, batch, self.device, pad)
        dev_logits = predict_logits(self.student, self.assets.dev, batch, self.device, pad)
        sigma = confidence_stats(
            self.probe_teacher, probabilities(probe_logits), self.probe_data.labels.numpy()
        ).sigma
        student_dev = accuracy(probabilities(dev_logits), self.assets.dev.labels.numpy())
        point = ProbePoint(
            epoch=epoch,
            epochs=self.hparams.epochs,
            sigma=sigma,
            accuracy_drop=self.assets.teacher_dev_accuracy - student_dev,
        )
        logger.info(
            "probe after epoch %.4g: sigma %.6f, accuracy_drop %.4f",
            epoch, sigma, point.accuracy_drop,
        )  # fmt: skip
        self.on_probe(point)

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """Student probabilities at T = 1 on train and dev: (N_train, C), (N_dev, C)."""
        assert self.student is not None, "call setup() first"
        batch, pad = self.spec.eval_batch_size, self.assets.pad_id
        return (
            probabilities(predict_logits(self.student, self.assets.train, batch, self.device, pad)),
            probabilities(predict_logits(self.student, self.assets.dev, batch, self.device, pad)),
        )

    def cleanup(self) -> None:
        self.student = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, keep_student: bool = False) -> TrialResult:
        """setup, train, evaluate, cleanup. ``keep_student`` leaves the trained student
        in ``self.student`` (for export); the caller then calls ``cleanup()``."""
        start = time.perf_counter()
        memory: dict[str, float] = {}
        try:
            with peak_memory(self.device, memory):
                self.setup()
                losses = self.train()
                probs_train, probs_dev = self.evaluate()
        finally:
            if not keep_student:
                self.cleanup()
        outcome = score(
            self.spec,
            self.assets,
            probs_train,
            probs_dev,
            epoch_losses=losses,
            wall_time_s=time.perf_counter() - start,
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
) -> DistillationTrial:
    """The trial for ``params`` (the searched values; the rest from the spec)."""
    return DistillationTrial(
        spec,
        assets,
        trial_hyperparameters(spec, params),
        device,
        seed=spec.seed,
        on_probe=on_probe,
        stage1=trial_stage1(spec, params),
    )


def score(
    spec: StudySpec,
    assets: StudyAssets,
    probs_train: np.ndarray,
    probs_dev: np.ndarray,
    epoch_losses: list[float],
    wall_time_s: float,
    stage1_epoch_losses: list[float] | None = None,
    peak_memory_mb: float | None = None,
) -> TrialOutcome:
    """Every figure of a trial from the student's probabilities on train and dev."""
    labels_train = assets.train.labels.numpy()
    labels_dev = assets.dev.labels.numpy()
    teacher_train, teacher_dev = assets.teacher_probs_train, assets.teacher_probs_dev
    on_train = confidence_stats(teacher_train, probs_train, labels_train)
    on_dev = confidence_stats(teacher_dev, probs_dev, labels_dev)
    teacher_metrics = assets.teacher_metrics
    student_metrics = task_metrics(spec.task, probs_dev, labels_dev)
    return TrialOutcome(
        sigma=on_train.sigma,
        accuracy_drop=assets.teacher_dev_accuracy - student_metrics["accuracy"],
        **on_train.as_dict("train_"),
        **on_dev.as_dict("dev_"),
        teacher_dev_accuracy=teacher_metrics["accuracy"],
        student_dev_accuracy=student_metrics["accuracy"],
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
        stage1_epoch_losses=stage1_epoch_losses,
        peak_memory_mb=peak_memory_mb,
    )
