"""Teacher and student models through ``transformers``' Auto classes.

A model is named by a local folder, a Hugging Face hub id, or ``package:NAME`` (a Python
package that bundles a model folder, like the offline MiniLM). Checkpoints whose
``config.json`` has no ``model_type`` (TinyBERT's general-distillation checkpoints) load
as BERT. Every failure to load becomes one ``KdsearchError`` naming the model.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdsearch.service.errors import KdsearchError, first_line
from kdsearch.service.spec import StudentSpec
from kdsearch.workers.packages import resolve_model_ref

logger = logging.getLogger(__name__)

# Keys a BERT config.json carries; a config without model_type but with these is BERT.
_BERT_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}


def _raw_config(location: str) -> dict[str, Any] | None:
    """config.json of a local folder or (already cached) hub model, or None."""
    from transformers.utils import cached_file

    try:
        path = cached_file(location, "config.json", _raise_exceptions_for_missing_entries=False)
        return json.loads(Path(path).read_text()) if path else None
    except Exception:
        return None


def load_config(ref: str, what: str, **overrides: Any) -> PretrainedConfig:
    location = resolve_model_ref(ref)
    try:
        return AutoConfig.from_pretrained(location, **overrides)
    except ValueError as exc:
        raw = _raw_config(location)
        if isinstance(raw, dict) and "model_type" not in raw and _BERT_KEYS <= raw.keys():
            logger.info(
                "%s %r: config.json has no model_type; loading it as BERT (as TinyBERT's "
                "general-distillation checkpoints need)", what, ref,
            )  # fmt: skip
            return BertConfig.from_pretrained(location, **overrides)
        raise KdsearchError(
            f"cannot load the {what} {ref!r}: {first_line(exc)}. Its config.json must name a "
            "model_type transformers knows (or be a BERT config); point at a Hugging Face "
            "model folder or hub id"
        ) from None
    except Exception as exc:
        raise KdsearchError(
            f"cannot load the {what} {ref!r}: {first_line(exc)}. Check the path, or the hub id "
            "and network access"
        ) from None


def load_model(
    ref: str,
    what: str,
    num_labels: int,
    attention: str | None = None,
    safetensors_only: bool = False,
    output_loading_info: bool = False,
    **overrides: Any,
) -> Any:
    """A sequence classifier with ``num_labels`` outputs (a new head when the checkpoint's
    differs). ``attention``: the attention implementation (stage 1 needs the raw scores);
    ``safetensors_only``: refuse pickled weights (kdsearch's own shared cache);
    ``output_loading_info``: (model, what was missing from the checkpoint), as
    transformers gives it."""
    location = resolve_model_ref(ref)
    config = load_config(ref, what, num_labels=num_labels, **overrides)
    extra: dict[str, Any] = {"attn_implementation": attention} if attention else {}
    if safetensors_only:
        extra["use_safetensors"] = True
    if output_loading_info:
        extra["output_loading_info"] = True
    try:
        return AutoModelForSequenceClassification.from_pretrained(location, config=config, **extra)
    except Exception as exc:  # missing, truncated or corrupted weights; no network
        raise KdsearchError(
            f"cannot load the {what} {ref!r}: {first_line(exc)}. Check that the folder holds "
            "complete weights (model.safetensors or pytorch_model.bin), or the hub id and "
            "network access"
        ) from None


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer. A BERT checkpoint that ships only ``vocab.txt`` and a config
    without ``model_type`` (TinyBERT's general checkpoints) gets BERT's WordPiece one."""
    location = resolve_model_ref(ref)
    try:
        return AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        raw = _raw_config(location)
        if isinstance(raw, dict) and "model_type" not in raw and _BERT_KEYS <= raw.keys():
            try:
                return BertTokenizerFast.from_pretrained(location)
            except Exception:
                pass
        raise KdsearchError(
            f"cannot load the tokenizer of {ref!r}: {first_line(exc)}. The model folder needs "
            "its tokenizer files (tokenizer.json or vocab.txt)"
        ) from None


# Initial students (and stage-1 teachers) already read in this process: a trial copies
# one instead of reading the checkpoint again (a worker runs many trials of one study).
# Bounded, oldest out first: a process that runs several studies (the Python API) must
# not keep every model it ever read.
_LOADED: dict[tuple[Any, ...], tuple[PreTrainedModel, tuple[str, ...]]] = {}
_LOADED_MAX = 4


def forget_loaded() -> None:
    """Drop the models read so far in this process (the next load reads from disk)."""
    _LOADED.clear()


def _load_once(key: tuple[Any, ...], seed: int, *args: Any, **kwargs: Any) -> Any:
    """``load_model(*args, **kwargs)``, read from disk the first time only; returns a
    fresh copy whose newly initialised modules (missing from the checkpoint: a new
    classifier head) are drawn from ``seed``: the same weights on every call, first or
    not, in every process."""
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            del _LOADED[next(iter(_LOADED))]
        model, info = load_model(*args, output_loading_info=True, **kwargs)
        fresh = {k.rsplit(".", 1)[0] for k in info["missing_keys"]}
        _LOADED[key] = (model, tuple(sorted(fresh)))
    base, fresh = _LOADED[key]
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    for name in fresh:
        model.get_submodule(name).apply(model._init_weights)
    return model


def load_student(
    student: StudentSpec,
    teacher_ref: str,
    num_labels: int,
    seed: int,
    attention: str | None = None,
    layers: int | None = None,
) -> PreTrainedModel:
    """A fresh student. Its new weights (a new classifier head) are drawn from ``seed``,
    so the same trial starts from the same weights. With ``teacher_layers`` (or
    ``layers``, a depth searched per trial) it is the first layers of the teacher's
    checkpoint (``teacher_ref``). The checkpoint is read once per process."""
    depth = layers or student.teacher_layers
    own = depth is not None and student.layers_from == "finetuned"
    ref = teacher_ref if depth is not None else student.model or ""
    extra = {"num_hidden_layers": depth} if depth is not None else {}
    key = (ref, depth, num_labels, attention, own)
    # the study's own fine-tuned teacher is read from its cache as safetensors only
    return _load_once(key, seed, ref, "student", num_labels, attention, own, **extra)
