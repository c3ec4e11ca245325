"""Study assets, prepared once per study and reused by every trial and worker.

Tokenised train/dev splits, the (optionally fine-tuned) teacher and its logits on both
splits, its predictions in the paper's CSV format, and (when the spec runs stage 1 once
per study) the stage-1 student. The first worker to need them computes them in the asset
cache (``workers/cache.py``: once, atomically, verified); the others load the result. The
cache key covers everything the assets depend on (teacher, fine-tuning, data contents,
task, max_seq_length, seed), so a change computes new assets instead of reusing stale
ones.

Nothing executable is ever read from the cache, which other machines write: arrays are
safetensors, figures JSON, models ``model.safetensors`` loaded with ``use_safetensors``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from kdsearch.service.errors import InfrastructureError, KdsearchError, first_line
from kdsearch.service.hashing import stable_hash
from kdsearch.service.record import ArtifactName, TeacherFigures
from kdsearch.service.spec import StudySpec
from kdsearch.workers.batching import Encoded, encode, pad_id_of
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.data import TaskData, data_fingerprint, load_task_data
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.metrics import accuracy, majority_accuracy, task_metrics
from kdsearch.workers.models import load_model, load_tokenizer
from kdsearch.workers.predictions import write_predictions

logger = logging.getLogger(__name__)

_TENSORS = "assets.safetensors"
_FIGURES = "assets.json"
FORMAT_VERSION = 5  # bump when the saved format changes (5: manifests, pad ids per split)


@dataclass(frozen=True)
class Inputs:
    """The study's rows tokenised by one model's tokenizer: the unaugmented train split
    (where sigma is measured), dev, and the augmented train file when there is one."""

    train: Encoded
    dev: Encoded
    train_augmented: Encoded | None

    @property
    def training(self) -> Encoded:
        """What the students train on: the augmented train split when the spec has one."""
        return self.train_augmented or self.train

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {**self.train.to_tensors("train"), **self.dev.to_tensors("dev")}
        if self.train_augmented is not None:
            out.update(self.train_augmented.to_tensors("train_augmented"))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], pad_id: int) -> Inputs:
        augmented = (
            Encoded.from_tensors(tensors, "train_augmented", pad_id)
            if "train_augmented.offsets" in tensors
            else None
        )
        return cls(
            Encoded.from_tensors(tensors, "train", pad_id),
            Encoded.from_tensors(tensors, "dev", pad_id),
            augmented,
        )


@dataclass(frozen=True)
class StudyAssets:
    teacher_inputs: Inputs  # what the teacher's logits were computed on (and stage 1's)
    student_inputs: Inputs  # the same object when the student shares the teacher's tokenizer
    teacher_logits_train: torch.Tensor  # (N_train, C)
    teacher_logits_dev: torch.Tensor  # (N_dev, C)
    teacher_logits_augmented: torch.Tensor | None  # (N_aug, C), when there is an augmented file
    teacher_metrics: dict[str, float]  # dev metrics of the teacher (accuracy, f1/mcc)
    teacher_train_accuracy: float
    majority_dev_accuracy: float  # always answering dev's most common class
    label_names: tuple[str, ...]
    folder: Path
    teacher: str  # the teacher the trials distil from: the fine-tuned copy, or the spec's
    student_source: str  # the checkpoint a fresh student is made from
    student_tokenizer: str  # where the student's tokenizer is (export saves it)
    stage1_student: Path | None = None  # the study's shared stage-1 student, if any

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def labels_train(self) -> np.ndarray:
        return self.teacher_inputs.train.labels.numpy()

    @property
    def labels_dev(self) -> np.ndarray:
        return self.teacher_inputs.dev.labels.numpy()

    @property
    def distill_targets(self) -> torch.Tensor:
        """The teacher's logits on the rows stage 2 trains on (augmented ones if given)."""
        if self.teacher_logits_augmented is not None:
            return self.teacher_logits_augmented
        return self.teacher_logits_train

    @property
    def teacher_dev_accuracy(self) -> float:
        return self.teacher_metrics["accuracy"]

    @property
    def figures(self) -> TeacherFigures:
        """What the study records about its teacher (the claim reads its dev accuracy)."""
        return TeacherFigures(
            self.teacher_dev_accuracy, self.teacher_train_accuracy, len(self.labels_dev)
        )

    @functools.cached_property
    def teacher_probs_train(self) -> np.ndarray:
        """(N_train, C) softmax at T = 1, computed once per process, not per trial."""
        return probabilities(self.teacher_logits_train)

    @functools.cached_property
    def teacher_probs_dev(self) -> np.ndarray:
        return probabilities(self.teacher_logits_dev)


def assets_key(spec: StudySpec) -> str:
    return stable_hash(
        {
            "teacher": spec.teacher.model_dump(mode="json"),
            "data": data_fingerprint(spec.data, spec.task),
            "task": spec.task,
            "max_seq_length": spec.max_seq_length,
            "seed": spec.seed,
            "version": FORMAT_VERSION,
        }
    )


def prepare_assets(
    spec: StudySpec, cache: AssetCache, device: torch.device, dtype: torch.dtype | None = None
) -> StudyAssets:
    """Load the study's assets, computing them first if no worker has yet: the teacher's
    side (its logits, on its tokenization), then the student's own tokenization when it
    has another tokenizer, then the shared stage-1 student when the spec asks for one
    (``dtype``: the training precision it is distilled in)."""
    folder = cache.folder(
        f"{spec.task}-{assets_key(spec)}",
        "study assets",
        lambda tmp: _compute_assets(spec, tmp, device),
    )
    assets = _load_assets(folder, spec)
    student = _student_inputs(spec, assets, cache)
    if student is not assets.teacher_inputs:
        if spec.stage1 is not None:
            raise KdsearchError(
                "stage1: intermediate-layer distillation compares the models token by token, "
                "so it needs a student with the teacher's tokenizer; remove stage1 or choose "
                "such a student"
            )
        assert spec.student.model is not None
        assets = dataclasses.replace(
            assets, student_inputs=student, student_tokenizer=spec.student.model
        )
    if spec.stage1 is not None and not spec.stage1_per_trial:
        from kdsearch.workers.stages import shared_stage1_student

        stage1 = shared_stage1_student(spec, assets, cache, device, dtype)
        assets = dataclasses.replace(assets, stage1_student=stage1)
    return assets


def _load_assets(folder: Path, spec: StudySpec) -> StudyAssets:
    try:
        tensors = load_file(folder / _TENSORS)
        figures = json.loads((folder / _FIGURES).read_text())
        inputs = Inputs.from_tensors(tensors, int(figures["pad_id"]))
        teacher = str(folder / "teacher") if spec.teacher.finetune else spec.teacher.model
        return StudyAssets(
            teacher_inputs=inputs,
            student_inputs=inputs,
            teacher_logits_train=tensors["teacher_logits.train"],
            teacher_logits_dev=tensors["teacher_logits.dev"],
            teacher_logits_augmented=tensors.get("teacher_logits.train_augmented"),
            teacher_metrics=figures["teacher_metrics"],
            teacher_train_accuracy=figures["teacher_train_accuracy"],
            majority_dev_accuracy=figures["majority_dev_accuracy"],
            label_names=tuple(figures["label_names"]),
            folder=folder,
            teacher=teacher,
            student_source=_student_source(spec, teacher),
            student_tokenizer=teacher,
        )
    except Exception as exc:  # truncated or tampered files: refuse, never guess
        raise InfrastructureError(
            f"the study assets in {str(folder)!r} cannot be read ({first_line(exc)}); delete "
            "that folder so that the next worker rebuilds it"
        ) from None


def _student_source(spec: StudySpec, teacher: str) -> str:
    """The checkpoint a fresh student is made from: its own, or the teacher's (as given,
    or as fine-tuned by the study, ``student.layers_from``)."""
    if spec.student.model is not None:
        return spec.student.model
    return teacher if spec.student.layers_from == "finetuned" else spec.teacher.model


def _student_tokenizer_ref(spec: StudySpec) -> str | None:
    """The student's own tokenizer, or None when it uses the teacher's: a student made
    from the teacher's layers does; a separate checkpoint does when its vocabulary and
    tokenizer class are the teacher's."""
    if spec.student.model is None:
        return None
    teacher, student = load_tokenizer(spec.teacher.model), load_tokenizer(spec.student.model)
    same = type(teacher) is type(student) and teacher.get_vocab() == student.get_vocab()
    return None if same else spec.student.model


def _student_inputs(spec: StudySpec, assets: StudyAssets, cache: AssetCache) -> Inputs:
    ref = _student_tokenizer_ref(spec)
    if ref is None:
        return assets.teacher_inputs
    logger.info("the student %s has its own tokenizer: tokenising the data for it", ref)
    key = stable_hash({"assets": assets.folder.name, "tokenizer": ref, "version": FORMAT_VERSION})

    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(ref)
        inputs = _encode_all(tokenizer, load_task_data(spec.data, spec.task), spec.max_seq_length)
        save_file(inputs.to_tensors(), tmp / _TENSORS)
        (tmp / _FIGURES).write_text(json.dumps({"pad_id": pad_id_of(tokenizer)}))

    folder = cache.folder(f"student-inputs-{key}", "the student's tokenised data", build)
    try:
        pad_id = int(json.loads((folder / _FIGURES).read_text())["pad_id"])
        return Inputs.from_tensors(load_file(folder / _TENSORS), pad_id)
    except Exception as exc:
        raise InfrastructureError(
            f"{str(folder)!r} cannot be read ({first_line(exc)}); delete it to rebuild it"
        ) from None


def _encode_all(tokenizer: PreTrainedTokenizerBase, data: TaskData, max_len: int) -> Inputs:
    augmented = data.train_augmented
    return Inputs(
        encode(tokenizer, data.train, max_len),
        encode(tokenizer, data.dev, max_len),
        None if augmented is None else encode(tokenizer, augmented, max_len),
    )


def _compute_assets(spec: StudySpec, folder: Path, device: torch.device) -> None:
    from kdsearch.workers.stages import TeacherFinetuning, run_stage

    tokenizer = load_tokenizer(spec.teacher.model)
    data = load_task_data(spec.data, spec.task)
    inputs = _encode_all(tokenizer, data, spec.max_seq_length)
    train, dev = inputs.train, inputs.dev

    # Seeded before the teacher exists: its new classifier head is drawn here, so two
    # builds of the same key (a rebuilt cache) give the same teacher.
    torch.manual_seed(spec.seed)
    teacher, _ = load_model(spec.teacher.model, "teacher", data.num_labels)
    if spec.teacher.finetune is not None:
        logger.info("fine-tuning the teacher on %d train rows", len(train))
        run_stage(TeacherFinetuning(spec.teacher.finetune, train, spec.seed), teacher, device)
        teacher.save_pretrained(folder / "teacher")  # model.safetensors
        tokenizer.save_pretrained(folder / "teacher")
    # Teacher logits are fixed during distillation: computed once here, never per step.
    batch = spec.eval_batch_size
    logits = {
        "train": predict_logits(teacher, train, device, batch, label="teacher on train"),
        "dev": predict_logits(teacher, dev, device, batch, label="teacher on dev"),
    }
    if inputs.train_augmented is not None:
        logits["train_augmented"] = predict_logits(
            teacher, inputs.train_augmented, device, batch, label="teacher on train_aug"
        )
    probs_train, probs_dev = probabilities(logits["train"]), probabilities(logits["dev"])
    write_predictions(folder / ArtifactName.TEACHER_TRAIN, probs_train, train.labels.numpy())
    write_predictions(folder / ArtifactName.TEACHER_DEV, probs_dev, dev.labels.numpy())
    dev_metrics = task_metrics(spec.task, probs_dev, dev.labels.numpy())
    train_accuracy = accuracy(probs_train, train.labels.numpy())
    logger.info(
        "teacher: train accuracy %.4f, dev accuracy %.4f", train_accuracy, dev_metrics["accuracy"]
    )
    tensors = {f"teacher_logits.{k}": v.contiguous() for k, v in logits.items()}
    save_file({**inputs.to_tensors(), **tensors}, folder / _TENSORS)
    figures = {
        "teacher_metrics": dev_metrics,
        "teacher_train_accuracy": train_accuracy,
        "majority_dev_accuracy": majority_accuracy(dev.labels.numpy()),
        "pad_id": pad_id_of(tokenizer),
        "label_names": list(data.label_names),
        "version": FORMAT_VERSION,
    }
    (folder / _FIGURES).write_text(json.dumps(figures, indent=1))
