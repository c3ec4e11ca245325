"""Study assets, prepared once per study and reused by every trial and worker.

Tokenised train/dev splits, the (optionally fine-tuned) teacher and its logits on both
splits, its predictions in the paper's CSV format, and (when the spec runs stage 1 with
fixed settings) the stage-1 student. The first worker to need them computes them under a
lock; the others wait and load the result (from a shared folder, or fetched from S3 into
their machine's cache). The cache key covers everything the assets depend on (teacher,
fine-tuning, data contents, task, max_seq_length, seed), so a change computes new assets
instead of reusing stale ones.

Nothing executable is ever read from the cache, which other machines write: arrays are
safetensors, figures JSON, models ``model.safetensors`` loaded with ``use_safetensors``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdsearch.service.artifacts import ArtifactLocation, S3Bucket, require_writable
from kdsearch.service.errors import InfrastructureError, KdsearchError, first_line
from kdsearch.service.hashing import stable_hash
from kdsearch.service.spec import Stage1Spec, StudySpec
from kdsearch.service.storage import assets_lock, file_lock
from kdsearch.workers.batching import Encoded, encode
from kdsearch.workers.data import TaskData, data_fingerprint, load_task_data
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.intermediate import (
    SCORES_ATTENTION,
    IntermediateDistillation,
    trained_fit_dense,
)
from kdsearch.workers.metrics import accuracy, task_metrics
from kdsearch.workers.models import load_model, load_student, load_tokenizer, resolve_model_ref
from kdsearch.workers.predictions import write_predictions
from kdsearch.workers.training import LabelCrossEntropy, LoopSettings, fit

logger = logging.getLogger(__name__)

_TENSORS = "assets.safetensors"
_FIGURES = "assets.json"
FORMAT_VERSION = 4  # bump when the saved format changes


@dataclass(frozen=True)
class Inputs:
    """The study's rows tokenised by one model's tokenizer: the unaugmented train split
    (where sigma is measured), dev, and the augmented train file when there is one."""

    train: Encoded
    dev: Encoded
    train_augmented: Encoded | None
    pad_id: int

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {**self.train.to_tensors("train"), **self.dev.to_tensors("dev")}
        if self.train_augmented is not None:
            out.update(self.train_augmented.to_tensors("train_augmented"))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], pad_id: int) -> Inputs:
        augmented = (
            Encoded.from_tensors(tensors, "train_augmented")
            if "train_augmented.offsets" in tensors
            else None
        )
        return cls(
            Encoded.from_tensors(tensors, "train"),
            Encoded.from_tensors(tensors, "dev"),
            augmented,
            pad_id,
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
    label_names: tuple[str, ...]
    folder: Path
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
            "data": data_fingerprint(spec),
            "task": spec.task,
            "max_seq_length": spec.max_seq_length,
            "seed": spec.seed,
            "version": FORMAT_VERSION,
        }
    )


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
        try:
            with file_lock(folder.with_suffix(".lock")):  # processes of this machine
                if folder.is_dir():
                    logger.info("reusing %s from %s", what, folder)
                    return folder
                with _scratch(folder) as tmp:
                    if self.shared is None:
                        logger.info("preparing %s in %s (once per study)", what, folder)
                        build(tmp)
                    else:
                        assert self.lock is not None
                        with self.lock(name):  # machines
                            self._fetch_or_build(name, what, tmp, build)
                    os.replace(tmp, folder)
        except OSError as exc:  # a read-only, full or missing cache folder
            raise InfrastructureError(
                f"cannot write the asset cache {str(self.local)!r}: {first_line(exc)}. Give a "
                "writable folder (--cache-dir or $KDSEARCH_CACHE, or --artifacts)"
            ) from None
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


@contextmanager
def _scratch(folder: Path) -> Iterator[Path]:
    """A fresh ``<folder>.tmp-<pid>`` to build in, removed if the build does not finish
    (an error, a stop signal); leftovers of dead processes are removed first."""
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_asset_cache(
    location: ArtifactLocation,
    cache_dir: Path,
    storage: optuna.storages.RDBStorage,
    shared: S3Bucket | None = None,
) -> AssetCache:
    """The asset cache for an artifact location (``shared``: an already opened bucket);
    its folder must be writable (checked now, not after a trial)."""
    try:
        require_writable(cache_dir)
    except OSError as exc:
        raise InfrastructureError(
            f"cannot write the asset cache {str(cache_dir)!r}: {first_line(exc)}. Give a "
            "writable folder (--cache-dir or $KDSEARCH_CACHE, or --artifacts)"
        ) from None
    if not location.is_s3:
        return AssetCache(cache_dir)
    return AssetCache(
        cache_dir, shared or S3Bucket(location), functools.partial(assets_lock, storage)
    )


def prepare_assets(
    spec: StudySpec, cache: AssetCache, device: torch.device, dtype: torch.dtype | None = None
) -> StudyAssets:
    """Load the study's assets, computing them first if no worker has yet: the teacher's
    side (its logits, on its tokenization), then the student's own tokenization when it
    has another tokenizer, then the shared stage-1 student when the spec asks for one."""
    folder = cache.folder(
        f"{spec.task}-{assets_key(spec)}",
        "study assets",
        lambda tmp: _compute_assets(spec, tmp, device),
    )
    assets = _load_assets(folder)
    student = _student_inputs(spec, assets, cache)
    if student is not assets.student_inputs:
        if spec.stage1 is not None:
            raise KdsearchError(
                "stage1: intermediate-layer distillation compares the models token by token, "
                "so it needs a student with the teacher's tokenizer; remove stage1 or choose "
                "such a student"
            )
        assets = dataclasses.replace(assets, student_inputs=student)
    if spec.stage1 is not None and not spec.stage1_per_trial:
        stage1 = _prepare_stage1_student(spec, assets, cache, device, dtype)
        assets = dataclasses.replace(assets, stage1_student=stage1)
    return assets


def _load_assets(folder: Path) -> StudyAssets:
    try:
        tensors = load_file(folder / _TENSORS)
        figures = json.loads((folder / _FIGURES).read_text())
        inputs = Inputs.from_tensors(tensors, int(figures["pad_id"]))
    except Exception as exc:  # truncated or tampered files: refuse, never guess
        raise InfrastructureError(
            f"the study assets in {str(folder)!r} cannot be read ({first_line(exc)}); delete "
            "that folder so that the next worker rebuilds it"
        ) from None
    return StudyAssets(
        teacher_inputs=inputs,
        student_inputs=inputs,
        teacher_logits_train=tensors["teacher_logits.train"],
        teacher_logits_dev=tensors["teacher_logits.dev"],
        teacher_logits_augmented=tensors.get("teacher_logits.train_augmented"),
        teacher_metrics=figures["teacher_metrics"],
        teacher_train_accuracy=figures["teacher_train_accuracy"],
        label_names=tuple(figures["label_names"]),
        folder=folder,
    )


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
        data = load_task_data(spec)
        inputs = _encode_all(tokenizer, data, spec.max_seq_length)
        save_file(inputs.to_tensors(), tmp / _TENSORS)
        (tmp / _FIGURES).write_text(json.dumps({"pad_id": inputs.pad_id}))

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
        _pad_id(tokenizer),
    )


def teacher_ref(spec: StudySpec, assets: StudyAssets) -> str:
    """The teacher the trials distil from: the fine-tuned copy when there is one."""
    return str(assets.folder / "teacher") if spec.teacher.finetune else spec.teacher.model


def student_source(spec: StudySpec, assets: StudyAssets) -> str:
    """The model a student made of teacher layers is cut from (``student.layers_from``)."""
    if spec.student.layers_from == "finetuned":
        return teacher_ref(spec, assets)
    return spec.teacher.model


def student_tokenizer_ref(spec: StudySpec, assets: StudyAssets) -> str:
    """Where the student's tokenizer is (export saves it with the student)."""
    if assets.student_inputs is not assets.teacher_inputs and spec.student.model:
        return spec.student.model
    return teacher_ref(spec, assets)


_TEACHERS: dict[tuple[str, str | None, int], PreTrainedModel] = {}


def load_study_teacher(
    spec: StudySpec, assets: StudyAssets, attention: str | None = None
) -> PreTrainedModel:
    """The study's teacher: the fine-tuned copy in the cache (safetensors only, as written
    there by kdsearch), else the spec's model. Read once per process and shared: the
    teacher is only ever run in eval mode without gradients (stage 1's targets)."""
    ref = teacher_ref(spec, assets)
    key = (ref, attention, assets.num_labels)
    if key not in _TEACHERS:
        fine_tuned = spec.teacher.finetune is not None
        _TEACHERS[key] = load_model(
            ref, "teacher", assets.num_labels, attention, safetensors_only=fine_tuned
        ).eval()
    return _TEACHERS[key]


def run_stage1(
    spec: StudySpec,
    assets: StudyAssets,
    student: PreTrainedModel,
    settings: Stage1Spec,
    device: torch.device,
    seed: int,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """TinyBERT stage 1 on ``student`` (in place, loaded with ``SCORES_ATTENTION``)
    against the study's teacher, on the augmented train file when there is one; returns
    the mean loss of each epoch."""
    teacher = load_study_teacher(spec, assets, attention=SCORES_ATTENTION)
    objective = IntermediateDistillation(student, teacher)
    checkpoint = resolve_model_ref(spec.student.model) if spec.student.model else None
    if checkpoint is not None and (fit_dense := trained_fit_dense(checkpoint)):
        objective.loss.fit_dense.load_state_dict(fit_dense)
        logger.info("stage 1 starts from the checkpoint's trained fit_dense")
    else:
        torch.manual_seed(seed)  # a new fit_dense, initialised from the trial's seed
        objective.loss.fit_dense.reset_parameters()
    loop = LoopSettings(
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        weight_decay=settings.weight_decay,
        schedule="constant",
        optimizer=spec.training.optimizer,
        dtype=dtype,
    )
    inputs = assets.teacher_inputs
    data = inputs.train_augmented or inputs.train
    torch.manual_seed(seed)  # dropout masks
    losses = fit(student, data, objective, loop, device, seed, inputs.pad_id, label="stage 1")
    student.set_attn_implementation("sdpa")  # stage 2 needs no scores: the fast kernel
    return losses


def _prepare_stage1_student(
    spec: StudySpec,
    assets: StudyAssets,
    cache: AssetCache,
    device: torch.device,
    dtype: torch.dtype | None,
) -> Path:
    """The study's stage-1 student, distilled once (fixed stage-1 settings) and shared."""
    assert spec.stage1 is not None
    key = stable_hash(
        {
            "assets": assets.folder.name,
            "student": spec.student.model_dump(mode="json"),
            "stage1": spec.stage1.model_dump(),
            "seed": spec.seed,
        }
    )

    def build(tmp: Path) -> None:
        student = load_student(
            spec.student,
            student_source(spec, assets),
            assets.num_labels,
            spec.seed,
            attention=SCORES_ATTENTION,
        )
        run_stage1(spec, assets, student, spec.stage1, device, spec.seed, dtype)  # type: ignore[arg-type]
        student.save_pretrained(tmp)

    return cache.folder(f"stage1-{key}", "the stage-1 student", build)


def _compute_assets(spec: StudySpec, folder: Path, device: torch.device) -> None:
    tokenizer = load_tokenizer(spec.teacher.model)
    data = load_task_data(spec)
    inputs = _encode_all(tokenizer, data, spec.max_seq_length)
    train, dev = inputs.train, inputs.dev

    # Seeded before the teacher exists: its new classifier head is drawn here, so two
    # builds of the same key (a rebuilt cache) give the same teacher.
    torch.manual_seed(spec.seed)
    teacher = load_model(spec.teacher.model, "teacher", data.num_labels)
    if spec.teacher.finetune is not None:
        logger.info("fine-tuning the teacher on %d train rows", len(train))
        settings = spec.teacher.finetune
        loop = LoopSettings(
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            epochs=settings.epochs,
            weight_decay=settings.weight_decay,
            warmup_proportion=settings.warmup_proportion,
        )
        objective = LabelCrossEntropy(train.labels)
        fit(
            teacher, train, objective, loop, device, spec.seed, inputs.pad_id,
            label="teacher fine-tuning",
        )  # fmt: skip
        teacher.save_pretrained(folder / "teacher")  # model.safetensors
        tokenizer.save_pretrained(folder / "teacher")
    # Teacher logits are fixed during distillation: computed once here, never per step.
    batch, pad = spec.eval_batch_size, inputs.pad_id
    logits = {
        "train": predict_logits(teacher, train, batch, device, pad, label="teacher on train"),
        "dev": predict_logits(teacher, dev, batch, device, pad, label="teacher on dev"),
    }
    if inputs.train_augmented is not None:
        logits["train_augmented"] = predict_logits(
            teacher, inputs.train_augmented, batch, device, pad, label="teacher on train_aug"
        )
    probs_train, probs_dev = probabilities(logits["train"]), probabilities(logits["dev"])
    write_predictions(folder / "teacher_train.csv", probs_train, train.labels.numpy())
    write_predictions(folder / "teacher_dev.csv", probs_dev, dev.labels.numpy())
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
        "pad_id": inputs.pad_id,
        "label_names": list(data.label_names),
        "version": FORMAT_VERSION,
    }
    (folder / _FIGURES).write_text(json.dumps(figures, indent=1))


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
