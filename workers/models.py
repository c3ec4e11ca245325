"""Teacher and student models through ``transformers``' Auto classes, and the one model
cache of a worker process.

A model is named by a local folder, a Hugging Face hub id, or ``package:NAME`` (a Python
package that bundles a model folder, like the offline MiniLM). Checkpoints whose
``config.json`` has no ``model_type`` (TinyBERT's general-distillation checkpoints) load
as BERT. Every failure to load becomes one ``KdsearchError`` naming the model.

A worker runs many trials of one study: each model is read from disk once per process
(``cached``): students are handed out as fresh copies (their new modules drawn from the
trial's seed), teachers as the one shared, frozen instance. The cache is bounded (oldest
out first), so a process that runs several studies (the Python API) does not keep every
model it ever read.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
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
from kdsearch.workers.checkpoints import is_untyped_bert, raw_config
from kdsearch.workers.packages import resolve_model_ref

logger = logging.getLogger(__name__)

Head = Literal["hf", "tinybert"]


@dataclass(frozen=True)
class Loading:
    """How to load a checkpoint."""

    attention: str | None = None  # attention implementation (stage 1 needs the raw scores)
    safetensors_only: bool = False  # refuse pickled weights (kdsearch's own shared cache)
    layers: int | None = None  # keep the first N layers (a student made of teacher layers)
    head: Head = "hf"  # the student's classification head (``training.student_head``)
    labels: tuple[str, ...] | None = None  # class names (id2label of an exported model)


def load_config(ref: str, what: str, num_labels: int, how: Loading = Loading()) -> PretrainedConfig:
    location = resolve_model_ref(ref)
    overrides: dict[str, Any] = {"num_labels": num_labels}
    if how.layers is not None:
        overrides["num_hidden_layers"] = how.layers
    if how.labels is not None:
        overrides["id2label"] = dict(enumerate(how.labels))
        overrides["label2id"] = {name: i for i, name in enumerate(how.labels)}
    try:
        return AutoConfig.from_pretrained(location, **overrides)
    except ValueError as exc:
        if is_untyped_bert(raw_config(location)):
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


def load_model(ref: str, what: str, num_labels: int, how: Loading = Loading()) -> Any:
    """A sequence classifier with ``num_labels`` outputs (a new head when the checkpoint's
    differs), and the names of the modules the checkpoint did not hold (newly made)."""
    location = resolve_model_ref(ref)
    config = load_config(ref, what, num_labels, how)
    extra: dict[str, Any] = {"output_loading_info": True}
    if how.attention:
        extra["attn_implementation"] = how.attention
    if how.safetensors_only:
        extra["use_safetensors"] = True
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            location, config=config, **extra
        )
    except Exception as exc:  # missing, truncated or corrupted weights; no network
        raise KdsearchError(
            f"cannot load the {what} {ref!r}: {first_line(exc)}. Check that the folder holds "
            "complete weights (model.safetensors or pytorch_model.bin), or the hub id and "
            "network access"
        ) from None
    if how.head == "tinybert":
        tinybert_head(model, f"the {what} {ref!r}")
    return model, tuple(sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]}))


class _ReluInPlaceOfDropout(nn.ReLU):
    """TinyBERT's head: ``classifier(relu(pooled_output))``, no dropout on the pooled output."""


def tinybert_head(model: PreTrainedModel, what: str = "the model") -> PreTrainedModel:
    """Give a BERT sequence classifier TinyBERT's head (``TinyBertForSequenceClassification``):
    Hugging Face's applies dropout to the pooled output and no ReLU; TinyBERT applies a
    ReLU and no dropout. The model's ``dropout`` before the classifier becomes that ReLU
    (in place; a model saved with ``save_pretrained`` does not keep it: apply this again
    after loading it)."""
    if not (hasattr(model, "bert") and isinstance(getattr(model, "dropout", None), nn.Module)):
        raise KdsearchError(
            f"training.student_head 'tinybert' needs a BERT student (a pooled output, then "
            f"dropout and the classifier), but {what} is a {type(model).__name__}; use "
            "student_head: hf"
        )
    model.dropout = _ReluInPlaceOfDropout()
    return model


def quiet_transformers() -> None:
    """Our own logs report loading and progress; transformers' (its load reports, its
    progress bars) would repeat them."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer. A BERT checkpoint that ships only ``vocab.txt`` and a config
    without ``model_type`` (TinyBERT's general checkpoints) gets BERT's WordPiece one."""
    location = resolve_model_ref(ref)
    try:
        return AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        if is_untyped_bert(raw_config(location)):
            try:
                return BertTokenizerFast.from_pretrained(location)
            except Exception:
                pass
        raise KdsearchError(
            f"cannot load the tokenizer of {ref!r}: {first_line(exc)}. The model folder needs "
            "its tokenizer files (tokenizer.json or vocab.txt)"
        ) from None


# The models already read in this process: (the model, the names of its new modules).
_LOADED: OrderedDict[tuple[Any, ...], tuple[PreTrainedModel, tuple[str, ...]]] = OrderedDict()
_LOADED_MAX = 4


def forget_loaded() -> None:
    """Drop the models read so far in this process (the next load reads from disk)."""
    _LOADED.clear()


def _cached(
    ref: str, what: str, num_labels: int, how: Loading
) -> tuple[PreTrainedModel, tuple[str, ...]]:
    key = (resolve_model_ref(ref), what, num_labels, how)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    if len(_LOADED) >= _LOADED_MAX:
        _LOADED.popitem(last=False)
    _LOADED[key] = load_model(ref, what, num_labels, how)
    return _LOADED[key]


def fresh_student(
    ref: str, num_labels: int, seed: int, how: Loading = Loading()
) -> PreTrainedModel:
    """A new student from checkpoint ``ref``, read from disk once per process: a copy,
    whose modules the checkpoint did not hold (a new classifier head) are drawn from
    ``seed``, so the same trial starts from the same weights in every process."""
    base, fresh = _cached(ref, "student", num_labels, how)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    for name in fresh:
        model.get_submodule(name).apply(model._init_weights)
    return model


def shared_teacher(ref: str, num_labels: int, how: Loading = Loading()) -> PreTrainedModel:
    """The study's teacher, read once per process and shared (never trained: callers put
    it in eval mode, or in train mode for dropout targets, and never step it)."""
    model, _ = _cached(ref, "teacher", num_labels, replace(how, head="hf"))
    for param in model.parameters():
        param.requires_grad_(False)
    return model
