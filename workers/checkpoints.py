"""What a model folder holds, read without torch: its ``config.json`` and tokenizer files.

Shared by the checks before a study is stored (``workers/preflight.py``) and the model
loading (``workers/models.py``), so both agree on what a loadable checkpoint is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys a BERT config.json carries; a config without model_type but with these is BERT
# (TinyBERT's general-distillation checkpoints ship such configs).
BERT_CONFIG_KEYS = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "vocab.json",
    "sentencepiece.bpe.model",
)


def is_untyped_bert(config: Any) -> bool:
    """A config.json without ``model_type`` that is a BERT config all the same."""
    return (
        isinstance(config, dict)
        and "model_type" not in config
        and BERT_CONFIG_KEYS <= config.keys()
    )


def is_model_config(config: Any) -> bool:
    return isinstance(config, dict) and (
        isinstance(config.get("model_type"), str) or is_untyped_bert(config)
    )


def raw_config(location: str) -> dict[str, Any] | None:
    """config.json of a local folder or (already downloaded) hub model, or None."""
    from transformers.utils import cached_file

    try:
        path = cached_file(location, "config.json", _raise_exceptions_for_missing_entries=False)
        loaded = json.loads(Path(path).read_text()) if path else None
    except Exception:
        return None
    return loaded if isinstance(loaded, dict) else None
