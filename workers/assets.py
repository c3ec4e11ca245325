"""Study assets, prepared once per study and reused by every trial and worker.

Tokenised train/dev splits, the (optionally fine-tuned) teacher's logits on both, and
its predictions in the paper's CSV format. The first worker to need them computes them
under a lock; the others wait and load the result (from a shared folder, or fetched
from S3 into their machine's cache). The cache key covers everything
the assets depend on (teacher, fine-tuning, data contents, task, max_seq_length, seed),
so a change computes new assets instead of reusing stale ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from kdsearch.service.artifacts import ArtifactLocation, S3Bucket
from kdsearch.service.spec import Stage1Spec, StudySpec
from kdsearch.service.storage import assets_lock, file_lock
from kdsearch.workers.data import NUM_LABELS, data_fingerprint, load_split
from kdsearch.workers.distill import Encoded, encode, fit, predict_logits
from kdsearch.workers.intermediate import distill_intermediate
from kdsearch.workers.metrics import task_metrics
from kdsearch.workers.models import load_student, load_teacher, load_tokenizer
from kdsearch.workers.predictions import write_predictions
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyAssets:
    train: Encoded
    dev: Encoded
    teacher_logits_train: torch.Tensor  # (N_train, C)
    teacher_logits_dev: torch.Tensor  # (N_dev, C)
    teacher_metrics: dict[str, float]  # dev metrics of the teacher (accuracy, f1/mcc)
    teacher_train_accuracy: float
    pad_id: int
    folder: Path

    @property
    def teacher_dev_accuracy(self) -> float:
        return self.teacher_metrics["accuracy"]

    @functools.cached_property
    def teacher_probs_train(self) -> np.ndarray:
        """(N_train, C) softmax at T = 1, computed once per process, not per trial."""
        return torch.softmax(self.teacher_logits_train, -1).numpy()

    @functools.cached_property
    def teacher_probs_dev(self) -> np.ndarray:
        return torch.softmax(self.teacher_logits_dev, -1).numpy()


def assets_key(spec: StudySpec) -> str:
    parts = {
        "teacher": spec.teacher.model_dump(mode="json"),
        "data": data_fingerprint(spec.data, spec.task),
        "task": spec.task,
        "max_seq_length": spec.max_seq_length,
        "seed": spec.seed,
        "version": 2,  # bump when the saved format changes
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AssetCache:
    """Where study assets are built once and kept.

    ``local`` is this machine's folder; with a shared filesystem it serves every machine.
    With an S3 artifact location, ``shared`` holds the published copies that other
    machines fetch instead of recomputing, and ``lock(name)`` (a database advisory lock)
    makes one machine build while the others wait.
    """

    local: Path
    shared: S3Bucket | None = None
    lock: Callable[[str], AbstractContextManager[None]] | None = None

    def folder(self, name: str, what: str, build: Callable[[Path], None]) -> Path:
        """``local/name``, built by ``build(tmp)`` (or fetched) by the first process that
        needs it while the others wait, then published atomically: no reader ever sees
        half a folder, and every trial on every machine sees the same bytes."""
        folder = self.local / name
        with file_lock(folder.with_suffix(".lock")):  # processes of this machine
            if folder.is_dir():
                logger.info("reusing %s from %s", what, folder)
                return folder
            tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if self.shared is None:
                logger.info("preparing %s in %s (once per study)", what, folder)
                build(tmp)
            else:
                assert self.lock is not None
                with self.lock(name):  # machines
                    self._fetch_or_build(name, what, tmp, build)
            os.replace(tmp, folder)
        return folder

    def _fetch_or_build(
        self, name: str, what: str, tmp: Path, build: Callable[[Path], None]
    ) -> None:
        assert self.shared is not None
        if not self.shared.is_published(name):
            logger.info("preparing %s (once per study, published to S3)", what)
            build(tmp)
            if self.shared.publish(tmp, name):
                return
            # Another machine published first (our lock was lost): use its copy, so that
            # every machine distils from the same teacher outputs.
            shutil.rmtree(tmp)
            tmp.mkdir()
        logger.info("fetching %s from S3", what)
        self.shared.fetch(name, tmp)


def open_asset_cache(
    location: ArtifactLocation,
    cache_dir: Path,
    storage: optuna.storages.RDBStorage,
    shared: S3Bucket | None = None,
) -> AssetCache:
    """The asset cache for an artifact location (``shared``: an already opened bucket)."""
    if not location.is_s3:
        return AssetCache(cache_dir)
    return AssetCache(
        cache_dir, shared or S3Bucket(location), functools.partial(assets_lock, storage)
    )


def prepare_assets(spec: StudySpec, cache: AssetCache, device: torch.device) -> StudyAssets:
    """Load the study's assets, computing them first if no worker has yet."""
    folder = cache.folder(
        f"{spec.task}-{assets_key(spec)}",
        "study assets",
        lambda tmp: _compute_assets(spec, tmp, device),
    )
    saved = torch.load(folder / "assets.pt", weights_only=False)
    return StudyAssets(folder=folder, **saved)


def teacher_ref(spec: StudySpec, assets: StudyAssets) -> str:
    """The teacher the trials distil from: the fine-tuned copy when there is one."""
    return str(assets.folder / "teacher") if spec.teacher.finetune else spec.teacher.model


def run_stage1(
    spec: StudySpec,
    assets: StudyAssets,
    student: PreTrainedModel,
    settings: Stage1Spec,
    device: torch.device,
) -> list[float]:
    """TinyBERT stage 1 on ``student`` (in place) against the study's teacher."""
    teacher = load_teacher(teacher_ref(spec, assets), NUM_LABELS, eager=True)
    return distill_intermediate(
        student, teacher, assets.train, settings, device, seed=spec.seed, pad_id=assets.pad_id
    )


def prepare_stage1_student(
    spec: StudySpec, assets: StudyAssets, cache: AssetCache, device: torch.device
) -> Path:
    """The study's stage-1 student, distilled once (fixed stage-1 settings) and shared."""
    assert spec.stage1 is not None
    parts = {
        "assets": assets.folder.name,
        "student": spec.student.model_dump(mode="json"),
        "stage1": spec.stage1.model_dump(),
        "seed": spec.seed,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        student = load_student(spec.student, spec.teacher.model, NUM_LABELS, spec.seed, eager=True)
        run_stage1(spec, assets, student, spec.stage1, device)  # type: ignore[arg-type]
        student.save_pretrained(tmp)

    return cache.folder(f"stage1-{key}", "the stage-1 student", build)


def _compute_assets(spec: StudySpec, folder: Path, device: torch.device) -> None:
    tokenizer = load_tokenizer(spec.teacher.model)
    train_split = load_split(spec.data, spec.task, "train")
    dev_split = load_split(spec.data, spec.task, "dev")
    train = encode(tokenizer, train_split, spec.max_seq_length)
    dev = encode(tokenizer, dev_split, spec.max_seq_length)
    pad_id = _pad_id(tokenizer)

    teacher = load_teacher(spec.teacher.model, NUM_LABELS)
    if spec.teacher.finetune is not None:
        logger.info("fine-tuning the teacher on %d train rows", len(train))
        torch.manual_seed(spec.seed)
        fit(
            teacher,
            train,
            train.labels,
            torch.nn.CrossEntropyLoss(),
            spec.teacher.finetune,
            device,
            seed=spec.seed,
            pad_id=pad_id,
            label="teacher fine-tuning",
        )
        teacher.save_pretrained(folder / "teacher")
        tokenizer.save_pretrained(folder / "teacher")
    # Teacher logits are fixed during distillation: computed once here, never per step.
    logits_train = predict_logits(teacher, train, spec.eval_batch_size, device, pad_id)
    logits_dev = predict_logits(teacher, dev, spec.eval_batch_size, device, pad_id)
    probs_train = torch.softmax(logits_train, -1).numpy()
    probs_dev = torch.softmax(logits_dev, -1).numpy()
    write_predictions(folder / "teacher_train.csv", probs_train, train.labels.numpy())
    write_predictions(folder / "teacher_dev.csv", probs_dev, dev.labels.numpy())
    dev_metrics = task_metrics(spec.task, probs_dev, dev.labels.numpy())
    train_accuracy = float(np.mean(probs_train.argmax(1) == train.labels.numpy()))
    logger.info(
        "teacher: train accuracy %.4f, dev accuracy %.4f", train_accuracy, dev_metrics["accuracy"]
    )
    torch.save(
        {
            "train": train,
            "dev": dev,
            "teacher_logits_train": logits_train,
            "teacher_logits_dev": logits_dev,
            "teacher_metrics": dev_metrics,
            "teacher_train_accuracy": train_accuracy,
            "pad_id": pad_id,
        },
        folder / "assets.pt",
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
