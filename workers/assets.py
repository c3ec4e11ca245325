"""Study assets, prepared once per study and reused by every trial and worker.

Tokenised train/dev splits, the (optionally fine-tuned) teacher's logits on both, and
its predictions in the paper's CSV format. The first worker to need them computes them
under a file lock; the others wait and load the result. The cache key covers everything
the assets depend on (teacher, fine-tuning, data contents, task, max_seq_length, seed),
so a change computes new assets instead of reusing stale ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from service.spec import StudySpec
from workers.data import NUM_LABELS, data_fingerprint, load_split
from workers.distill import Encoded, encode, fit, predict_logits
from workers.metrics import task_metrics
from workers.models import load_teacher, load_tokenizer
from workers.predictions import write_predictions

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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_assets(spec: StudySpec, cache_dir: Path, device: torch.device) -> StudyAssets:
    """Load the study's assets, computing them first if no worker has yet."""
    folder = cache_dir / f"{spec.task}-{assets_key(spec)}"
    with _file_lock(folder.with_suffix(".lock")):
        if not (folder / "assets.pt").is_file():
            logger.info("preparing study assets in %s (once per study)", folder)
            tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            _compute_assets(spec, tmp, device)
            # Atomic publish: readers never see a half-written folder.
            os.replace(tmp, folder)
        else:
            logger.info("reusing study assets from %s", folder)
    saved = torch.load(folder / "assets.pt", weights_only=False)
    return StudyAssets(folder=folder, **saved)


def _compute_assets(spec: StudySpec, folder: Path, device: torch.device) -> None:
    folder.mkdir(parents=True)
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
