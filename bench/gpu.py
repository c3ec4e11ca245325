"""GPU readiness, for a machine with a CUDA GPU: one script, every figure in one run.

1. A BERT-base-shaped teacher / TinyBERT-4L-312 student trial (random weights, real SST-2
   rows, max_seq_length 128, batch 32): its time in bf16 and fp32 (TF32) and its peak
   memory.
2. The student's training step in bf16: achieved FLOP/s (FLOPs counted by
   ``FlopCounterMode``) against the bare bf16 matmul rate measured here (MFU against the
   achievable peak) and against the GPU's nominal dense bf16 peak when known.
3. Throughput of 1, 2, 4 and 8 ``kdsearch worker`` processes sharing the GPU on one
   study (SQLite storage, so no database server is needed): trials per minute and the
   ratio to one worker.

Without a GPU it says so and exits 0.

    python bench/gpu.py --rows 4096 --out gpu-results.txt
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from pairs import bert_base_pair

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.gpu")
# Nominal dense bf16 tensor-core peaks (TFLOP/s), for the MFU against the data sheet.
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def spec_dict(name: str, teacher: str, student: str, rows: int, n_trials: int) -> dict:
    return {
        "name": name,
        "task": "sst2",
        "data": {"path": str(ROOT / "data" / "glue" / "SST-2"), "train_limit": rows},
        "teacher": {"model": teacher},
        "student": {"model": student},
        "max_seq_length": 128,
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
        "defaults": {"learning_rate": 1e-4, "batch_size": 32, "epochs": 1},
        "n_trials": n_trials,
        "seed": 0,
        "pruning": {"rule": "none", "probe_size": 256},
        "reliability": {"heartbeat_interval_s": 5, "grace_period_s": 60},
    }


def trial_figures(teacher: str, student: str, rows: int, folder: Path) -> list[str]:
    from kdsearch.service.loading import spec_from_dict
    from kdsearch.workers.assets import AssetCache, prepare_assets
    from kdsearch.workers.device import configure
    from kdsearch.workers.trial import standalone_trial

    device = torch.device("cuda")
    configure(device)
    spec = spec_from_dict(spec_dict("gpu", teacher, student, rows, 1), source="bench")
    start = time.perf_counter()
    assets = prepare_assets(spec, AssetCache(folder / "cache"), device)
    lines = [f"teacher logits on {rows} train rows + dev: {time.perf_counter() - start:.1f} s"]
    params = {"learning_rate": 1e-4, "batch_size": 32, "epochs": 1}
    standalone_trial(spec, assets, params, device, precision="bf16").run()  # warm-up
    for name, precision in (("bf16", "bf16"), ("fp32 (TF32)", "fp32")):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = standalone_trial(spec, assets, params, device, precision=precision).run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        lines.append(
            f"trial, {name}: {seconds:.2f} s ({rows / seconds:.0f} train examples/s), peak "
            f"memory {result.outcome.peak_memory_mb or 0:.0f} MiB, sigma {result.sigma:.4f}"
        )
    return lines


def mfu(student: str) -> list[str]:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForSequenceClassification

    device = torch.device("cuda")
    model = AutoModelForSequenceClassification.from_pretrained(student).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = {
        "input_ids": torch.randint(1000, 20000, (32, 64), device=device),
        "attention_mask": torch.ones(32, 64, dtype=torch.long, device=device),
    }

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).logits.float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()

    def rate(run, n: int) -> float:  # type: ignore[no-untyped-def]
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            run()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    achieved = flops * rate(step, 50)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    peak = 2 * 8192**3 * rate(lambda: a @ a, 20)
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    lines = [
        f"student step (batch 32 x 64, bf16): {flops / 1e9:.1f} GFLOP at "
        f"{achieved / 1e12:.1f} TFLOP/s; bare bf16 8192^3 matmul {peak / 1e12:.0f} TFLOP/s; "
        f"MFU against it {achieved / peak:.1%}"
    ]
    if nominal:
        lines.append(f"MFU against {name}'s nominal {nominal:.0f} TFLOP/s: "
                     f"{achieved / (nominal * 1e12):.1%}")  # fmt: skip
    return lines


def shared_gpu(teacher: str, student: str, rows: int, folder: Path) -> list[str]:
    """1, 2, 4 and 8 worker processes on one GPU, each running 2 trials of one study."""
    lines = []
    rates: dict[int, float] = {}
    for workers in (1, 2, 4, 8):
        storage = f"sqlite:///{folder / f'shared-{workers}.db'}"
        name = f"shared-{workers}"
        import kdsearch

        study = kdsearch.create_study(
            spec_dict(name, teacher, student, rows, 2 * workers + 1),
            storage=storage, artifacts=str(folder / f"art-{workers}"),
        )  # fmt: skip
        study.run_worker(max_trials=1, device="cuda", cache_dir=folder / "cache")  # assets, warm
        env = {**os.environ, "KDSEARCH_STORAGE": storage}
        start = time.perf_counter()
        command = [
            sys.executable, "-m", "kdsearch", "worker", "--study", name, "--device", "cuda",
            "--artifacts", str(folder / f"art-{workers}"), "--cache-dir", str(folder / "cache"),
        ]  # fmt: skip
        procs = [
            subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(workers)
        ]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - start
        rates[workers] = 2 * workers / seconds * 60
        lines.append(
            f"{workers} worker(s) on one GPU: {2 * workers} trials in {seconds:.1f} s = "
            f"{rates[workers]:.1f} trials/min ({rates[workers] / rates[1]:.2f}x one worker), "
            f"exit codes {sorted(set(codes))}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="SST-2 train rows per trial")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kdsearch").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        logger.info("no CUDA device visible: nothing to measure (run this on a GPU machine)")
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    teacher, student = bert_base_pair(folder)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for part in (
        lambda: trial_figures(teacher, student, args.rows, folder),
        lambda: mfu(student),
        lambda: shared_gpu(teacher, student, args.rows, folder),
    ):
        lines += part()
        logger.info("\n".join(lines[-3:]))
    text = "\n".join(lines)
    logger.info("\n%s", text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
