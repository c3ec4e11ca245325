"""TinyBERT's optimizer and checkpoint selection: BertAdam against a hand-written copy of
TinyBERT's update; best-dev selection scores the best evaluation's student."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_

from kdsearch.workers.training import BertAdam, LoopSettings, param_groups, tinybert_factor


def _reference_bertadam_step(
    params: list[nn.Parameter], state: dict, lr: float, warmup: float, t_total: int, wd: dict
) -> None:
    """TinyBERT's ``BertAdam.step`` (transformer/optimization.py), written out per
    parameter as it is there: clip each gradient to norm 1.0, Adam moments without bias
    correction, decoupled weight decay, ``warmup_linear`` of the step *before* it counts."""
    for p in params:
        s = state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        clip_grad_norm_(p, 1.0)
        grad = p.grad
        s["m"].mul_(0.9).add_(grad, alpha=0.1)
        s["v"].mul_(0.999).addcmul_(grad, grad, value=0.001)
        update = s["m"] / (s["v"].sqrt() + 1e-6)
        if wd[id(p)] > 0:
            update = update + wd[id(p)] * p.data
        progress = s["step"] / t_total
        factor = progress / warmup if progress < warmup else max((progress - 1) / (warmup - 1), 0)
        p.data.add_(-lr * factor * update)
        s["step"] += 1


class _Classifier(nn.Module):
    """A small model with every kind of parameter BertAdam meets: weights (decayed),
    biases and a LayerNorm (not decayed)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(16, 32)
        self.LayerNorm = nn.LayerNorm(32)
        self.classifier = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.LayerNorm(self.dense(x))))


def test_bertadam_matches_tinybert_update() -> None:
    torch.manual_seed(0)
    ours = _Classifier()
    theirs, initial = copy.deepcopy(ours), copy.deepcopy(ours)
    settings = LoopSettings(learning_rate=5e-3, batch_size=4, epochs=1, weight_decay=0.01,
                            warmup_proportion=0.3)  # fmt: skip
    t_total = 12
    optimizer = BertAdam(
        param_groups([ours], settings.weight_decay), lr=settings.learning_rate,
        factor=tinybert_factor(t_total, settings),
    )  # fmt: skip
    decay = {id(p): g["weight_decay"] for g in param_groups([theirs], 0.01) for p in g["params"]}
    state: dict = {}
    clipped = 0
    for step in range(t_total):
        x, labels = torch.randn(8, 16) * 3, torch.randint(0, 2, (8,))
        for model in (ours, theirs):
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x) * 20, labels)  # large: clipping bites
            loss.backward()
        clipped += sum(p.grad.norm() > 1 for p in ours.parameters())
        optimizer.step()
        _reference_bertadam_step(list(theirs.parameters()), state, 5e-3, 0.3, t_total, decay)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"step {step}: {name}")
    assert clipped > 0  # the per-tensor clipping was exercised
    assert optimizer.steps == t_total
    moved = [
        (a - b).abs().max() for a, b in zip(ours.parameters(), initial.parameters(), strict=True)
    ]
    assert min(moved) > 1e-4  # every tensor trained
    # the first step moved nothing (factor 0 at progress 0), as in TinyBERT
    assert tinybert_factor(t_total, settings)(0) == 0.0


def test_bertadam_takes_larger_first_steps_than_adamw() -> None:
    # No bias correction: after one step m = 0.1 g and v = 0.001 g^2, so the update is
    # 0.1 / sqrt(0.001) = 3.16 g/|g|, where AdamW's bias-corrected one is 1.
    w1, w2 = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    bert = BertAdam([{"params": [w1], "weight_decay": 0.0}], lr=0.1, factor=lambda s: 1.0)
    adamw = torch.optim.AdamW([w2], lr=0.1, eps=1e-6, weight_decay=0.0)
    for w, opt in ((w1, bert), (w2, adamw)):
        w.grad = torch.full((3,), 0.5)  # norm 0.87: not clipped
        opt.step()
    assert (1 - w1.detach()).tolist() == pytest.approx([0.1 * 0.1 / 0.001**0.5] * 3, rel=1e-4)
    assert (1 - w2.detach()).tolist() == pytest.approx([0.1] * 3, rel=1e-4)


def test_tinybert_warmup_linear_schedule() -> None:
    settings = LoopSettings(1e-3, 4, 1, 0.0, warmup_proportion=0.1)
    factor = tinybert_factor(100, settings)
    assert [factor(s) for s in (0, 5, 10, 55, 100)] == pytest.approx([0, 0.5, 1.0, 0.5, 0])
    constant = LoopSettings(1e-3, 4, 1, 0.0, schedule="constant")
    assert tinybert_factor(100, constant)(0) == 1.0
