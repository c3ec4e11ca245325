"""One trial: distil a fresh student's prediction layer, then score it (setup, train,
evaluate, cleanup)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kdsearch.service.pruning import ProbePoint
from kdsearch.service.spec import Hyperparameters, Stage1Spec, StudySpec
from kdsearch.workers.assets import StudyAssets, run_stage1
from kdsearch.workers.data import NUM_LABELS
from kdsearch.workers.device import peak_memory
from kdsearch.workers.distill import SoftCrossEntropy, fit, predict_logits
from kdsearch.workers.metrics import (
    accuracy,
    confidence_stats,
    expected_calibration_error,
    task_metrics,
)
from kdsearch.workers.models import load_student, load_teacher
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass
class TrialResult:
    sigma: float
    accuracy_drop: float
    attrs: dict[str, Any]  # every figure worth keeping, stored as trial user attrs
    student_probs_train: np.ndarray = field(repr=False)  # (N_train, C)
    student_probs_dev: np.ndarray = field(repr=False)  # (N_dev, C)


def probe_indices(n_train: int, size: int, seed: int) -> list[int]:
    """A fixed, seeded subset of train rows: every trial's probe sees the same inputs."""
    if size >= n_train:
        return list(range(n_train))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_train, generator=generator)[:size].tolist())


class DistillationTrial:
    """TinyBERT stage 2 for one hyperparameter setting.

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
        on_probe: Callable[[ProbePoint], None] | None = None,
        stage1: Stage1Spec | None = None,
        stage1_student: Path | None = None,
    ) -> None:
        """``stage1``: run stage 1 in this trial with these settings (stage-1
        hyperparameters searched); ``stage1_student``: start from the study's shared
        stage-1 student instead of the student checkpoint."""
        self.spec = spec
        self.assets = assets
        self.hparams = hparams
        self.device = device
        self.on_probe = on_probe
        self.stage1 = stage1
        self.stage1_student = stage1_student
        self.stage1_losses: list[float] = []
        self.student: PreTrainedModel | None = None
        index = probe_indices(len(assets.train), spec.pruning.probe_size, spec.seed)
        self.probe_data = assets.train.subset(index)
        self.probe_teacher = assets.teacher_probs_train[index]

    def setup(self) -> None:
        spec = self.spec
        if self.stage1_student is not None:
            self.student = load_teacher(str(self.stage1_student), NUM_LABELS)
            return
        self.student = load_student(
            spec.student, spec.teacher.model, NUM_LABELS, seed=spec.seed, eager=bool(self.stage1)
        )
        if self.stage1 is not None:
            self.stage1_losses = run_stage1(
                spec, self.assets, self.student, self.stage1, self.device
            )

    def train(self) -> list[float]:
        assert self.student is not None, "call setup() first"
        return fit(
            self.student,
            self.assets.train,
            self.assets.teacher_logits_train,
            SoftCrossEntropy(self.hparams.temperature),
            self.hparams,
            self.device,
            seed=self.spec.seed,
            pad_id=self.assets.pad_id,
            on_probe=self.probe if self.on_probe is not None else None,
            probe_every_steps=self.spec.pruning.probe_every_steps,
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
            self.probe_teacher,
            torch.softmax(probe_logits, -1).numpy(),
            self.probe_data.labels.numpy(),
        ).sigma
        student_dev = accuracy(
            torch.softmax(dev_logits, -1).numpy(), self.assets.dev.labels.numpy()
        )
        point = ProbePoint(
            epoch=epoch,
            epochs=self.hparams.epochs,
            sigma=sigma,
            accuracy_drop=self.assets.teacher_dev_accuracy - student_dev,
        )
        logger.info(
            "probe after epoch %.4g: sigma %.6f, accuracy_drop %.4f",
            epoch,
            sigma,
            point.accuracy_drop,
        )
        self.on_probe(point)

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """Student probabilities at T = 1 on train and dev: (N_train, C), (N_dev, C)."""
        assert self.student is not None, "call setup() first"
        probs = []
        for data in (self.assets.train, self.assets.dev):
            logits = predict_logits(
                self.student, data, self.spec.eval_batch_size, self.device, self.assets.pad_id
            )
            probs.append(torch.softmax(logits, -1).numpy())
        return probs[0], probs[1]

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
        result = score(self.spec, self.assets, probs_train, probs_dev, losses, start)
        result.attrs.update(memory)
        if self.stage1 is not None:
            result.attrs["stage1_epoch_losses"] = self.stage1_losses
        return result


def score(
    spec: StudySpec,
    assets: StudyAssets,
    probs_train: np.ndarray,
    probs_dev: np.ndarray,
    epoch_losses: list[float],
    start: float,
) -> TrialResult:
    labels_train = assets.train.labels.numpy()
    labels_dev = assets.dev.labels.numpy()
    teacher_train, teacher_dev = assets.teacher_probs_train, assets.teacher_probs_dev
    on_train = confidence_stats(teacher_train, probs_train, labels_train)
    on_dev = confidence_stats(teacher_dev, probs_dev, labels_dev)
    student_dev = task_metrics(spec.task, probs_dev, labels_dev)
    accuracy_drop = assets.teacher_dev_accuracy - student_dev["accuracy"]
    attrs: dict[str, Any] = {
        "sigma": on_train.sigma,
        "accuracy_drop": accuracy_drop,
        **on_train.as_dict("train_"),
        **on_dev.as_dict("dev_"),
        **{f"teacher_dev_{k}": v for k, v in assets.teacher_metrics.items()},
        **{f"student_dev_{k}": v for k, v in student_dev.items()},
        "teacher_train_accuracy": assets.teacher_train_accuracy,
        "student_train_accuracy": float(np.mean(probs_train.argmax(1) == labels_train)),
        "teacher_train_ece": expected_calibration_error(teacher_train, labels_train),
        "student_train_ece": expected_calibration_error(probs_train, labels_train),
        "teacher_dev_ece": expected_calibration_error(teacher_dev, labels_dev),
        "student_dev_ece": expected_calibration_error(probs_dev, labels_dev),
        "epoch_losses": epoch_losses,
        # Interpretive bound of the paper (sec. 1.4): sqrt(beta / |X_train|) with beta the
        # final stage-2 loss summed over the train set, i.e. sqrt(mean final loss).
        "sigma_bound": float(np.sqrt(epoch_losses[-1])) if epoch_losses else float("nan"),
        "wall_time_s": time.perf_counter() - start,
    }
    return TrialResult(on_train.sigma, accuracy_drop, attrs, probs_train, probs_dev)
