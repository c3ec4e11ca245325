"""The distillation loss, the one training loop (optimizer groups, schedule, evaluation
points, non-finite check) and batching."""

from __future__ import annotations

import math

import pytest
import torch

from kdsearch.workers.batching import encode, length_grouped_batches
from kdsearch.workers.data import Split
from kdsearch.workers.distill import SoftCrossEntropy
from kdsearch.workers.training import (
    EvalGrid,
    FitHooks,
    LabelCrossEntropy,
    LoopSettings,
    fit,
    linear_warmup_decay,
    param_groups,
)

CPU = torch.device("cpu")


def test_soft_cross_entropy_hand_computed() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    # Row 0: target softmax([2,0]) = [e^2, 1]/(e^2+1); log_softmax([1,0]) = [1,0] - log(e+1)
    p0 = math.exp(2) / (math.exp(2) + 1)
    lse0 = math.log(math.e + 1)
    row0 = -(p0 * (1 - lse0) + (1 - p0) * (0 - lse0))
    # Row 1: target [0.5, 0.5]; log_softmax([0,2]) = [0,2] - log(1+e^2)
    lse1 = math.log(1 + math.exp(2))
    row1 = -(0.5 * (0 - lse1) + 0.5 * (2 - lse1))
    # TinyBERT's mean runs over batch AND classes: sum / (B * C) = sum / 4
    expected = (row0 + row1) / 4
    # by hand: row0 = 0.432464, row1 = 1.126928 -> 1.559392 / 4
    assert expected == pytest.approx(0.389848, abs=1e-6)
    assert SoftCrossEntropy(1.0)(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_temperature_scales_both_logits() -> None:
    student = torch.tensor([[1.0, -1.0]])
    teacher = torch.tensor([[3.0, 1.0]])
    # At T = 2 the loss equals the T = 1 loss on logits halved (no T^2 factor).
    assert SoftCrossEntropy(2.0)(student, teacher).item() == pytest.approx(
        SoftCrossEntropy(1.0)(student / 2, teacher / 2).item()
    )
    with pytest.raises(ValueError, match="temperature must be > 0 but got 0"):
        SoftCrossEntropy(0.0)


def test_no_weight_decay_on_bias_and_layernorm(tiny_bert_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    decay, no_decay = param_groups([model], 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(
        names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"]
    )
    assert all(not names[id(p)].endswith("bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_linear_warmup_then_linear_decay() -> None:
    factor = linear_warmup_decay(total_steps=20, warmup_proportion=0.1)  # 2 warmup steps
    assert [factor(s) for s in (0, 1, 2, 11, 19)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 1 / 18])
    assert linear_warmup_decay(10, 0.0)(0) == pytest.approx(1.0)


def test_length_grouped_batches_cover_every_row_once() -> None:
    lengths = [((i * 7) % 13) + 1 for i in range(203)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), group=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    assert len(batches) == math.ceil(203 / 8)
    # same seed -> same batches; other seed -> other order
    again = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), group=4)
    other = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(2), group=4)
    assert batches == again and batches != other
    # within a chunk rows are sorted by length, so batches are narrow
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread / len(batches) < 4


def test_nan_loss_stops_training(tiny_bert_dir) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = encode(tokenizer, Split(["a fine film", "a dull film"] * 4, None, [1, 0] * 4), 16)
    # An infinite learning rate turns the weights, then the loss, into NaN.
    settings = LoopSettings(learning_rate=float("inf"), batch_size=4, epochs=1, weight_decay=0)
    with pytest.raises(FloatingPointError, match="fine-tune: loss is nan in epoch 1"):
        fit(
            model,
            data,
            LabelCrossEntropy(data.labels),
            settings,
            torch.device("cpu"),
            FitHooks(label="fine-tune"),
        )


@pytest.mark.parametrize(
    ("every", "expected"),
    [
        # 10 rows, batch 4: 3 steps per epoch (the last batch has 2 rows), 2 epochs
        (None, [1.0, 2.0]),
        (1, [1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0]),
        (2, [2 / 3, 1.0, 4 / 3, 2.0]),  # global step 6 is an epoch end: evaluated once
        (3, [1.0, 2.0]),
    ],
)
def test_evaluations_after_each_epoch_and_every_n_steps(tiny_bert_dir, every, expected) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = encode(tokenizer, Split(["a fine film", "a dull film"] * 5, None, [1, 0] * 5), 16)
    settings = LoopSettings(
        learning_rate=1e-3, batch_size=4, epochs=2, weight_decay=0,
        grid=EvalGrid((every,) if every else ()),
    )  # fmt: skip
    seen: list[tuple[float, bool]] = []

    def evaluate(epoch: float) -> None:
        seen.append((epoch, model.training))
        model.eval()  # an evaluation leaves eval mode; fit must switch back to training

    fit(model, data, LabelCrossEntropy(data.labels), settings, CPU, FitHooks(on_eval=evaluate))
    assert [e for e, _ in seen] == pytest.approx(expected)
    assert all(training for _, training in seen)


def test_constant_schedule_keeps_the_learning_rate() -> None:
    from kdsearch.workers.training import lr_factor

    constant = LoopSettings(1e-3, 8, 2, 0.0, warmup_proportion=0.1, schedule="constant")
    assert [lr_factor(10, constant)(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]


def test_extra_modules_train_with_the_model_and_follow_its_decay_rule(tiny_bert_dir) -> None:
    from torch import nn
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    projection = nn.Linear(32, 64)  # like stage 1's fit_dense
    decay, no_decay = param_groups([model, projection], 1e-4)
    assert any(p is projection.weight for p in decay["params"])
    assert any(p is projection.bias for p in no_decay["params"])
    assert decay["weight_decay"] == 1e-4
