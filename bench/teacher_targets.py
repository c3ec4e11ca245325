"""Stage 2 with TinyBERT's dropout targets (``training.teacher_targets: dropout``: a
train-mode teacher forward at every step) against kdsearch's cached eval-mode targets
(computed once per study), in the same run: the cost per trial, and how far sigma moves.

The demo's pair: MiniLM-L6 fine-tuned by kdsearch on real SST-2 rows, the student its
first 2 fine-tuned layers; TinyBERT's batching, head and evaluation grid as the paper
studies run them; precision as ``training.precision: auto`` resolves it here.

    .venv/bin/python bench/teacher_targets.py --rows 1000 --seeds 3
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
from precision import spec_for

from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.device import dtype_of, resolve_precision
from kdsearch.workers.trial import standalone_trial

logger = logging.getLogger("bench.teacher_targets")
CPU = torch.device("cpu")
PARAMS = {"learning_rate": 3e-4, "batch_size": 32, "epochs": 2}
PAPER = {"batching": "tinybert", "student_head": "tinybert", "eval_grid": "tinybert",
         "eval_every_steps": 10, "optimizer": "bertadam", "selection": "best_dev"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="SST-2 train rows")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kdsearch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    folder = Path(tempfile.mkdtemp(prefix="bench-targets-"))
    base = spec_for("demo", args.rows, folder)
    precision = resolve_precision("auto", CPU)
    assets = prepare_assets(base, AssetCache(folder / "cache"), CPU, dtype_of(precision))
    seconds: dict[str, list[float]] = {"eval": [], "dropout": []}
    sigmas: dict[str, list[float]] = {"eval": [], "dropout": []}
    for seed in range(args.seeds):
        for targets in ("eval", "dropout"):
            training = base.training.model_copy(update={**PAPER, "teacher_targets": targets})
            spec = base.model_copy(update={"training": training})
            trial = standalone_trial(spec, assets, PARAMS, CPU, seed, precision)
            start = time.perf_counter()
            result = trial.run()
            seconds[targets].append(time.perf_counter() - start)
            sigmas[targets].append(result.outcome.sigma)
    diffs = [abs(a - b) for a, b in zip(sigmas["eval"], sigmas["dropout"], strict=True)]
    ratio = statistics.mean(seconds["dropout"]) / statistics.mean(seconds["eval"])
    steps = (args.rows // PARAMS["batch_size"]) * PARAMS["epochs"]
    lines = [
        f"{args.rows} SST-2 train rows, {steps} stage-2 steps per trial, precision {precision}, "
        f"{torch.get_num_threads()} threads, {args.seeds} seeds",
        f"cached eval-mode targets: {statistics.mean(seconds['eval']):6.1f} s per trial, "
        f"sigma {statistics.mean(sigmas['eval']):.4f} (seed sd "
        f"{statistics.stdev(sigmas['eval']) if args.seeds > 1 else float('nan'):.4f})",
        f"dropout targets:          {statistics.mean(seconds['dropout']):6.1f} s per trial, "
        f"sigma {statistics.mean(sigmas['dropout']):.4f} (seed sd "
        f"{statistics.stdev(sigmas['dropout']) if args.seeds > 1 else float('nan'):.4f})",
        f"dropout / cached time: {ratio:.2f}x; |sigma difference| at the same seed: mean "
        f"{statistics.mean(diffs):.4f}, max {max(diffs):.4f}",
    ]
    logger.info("\n".join(lines))


if __name__ == "__main__":
    main()
