"""``kdsearch export``: the chosen trial's student as a Hugging Face model folder.

Trials do not store their students: a trial is deterministic given its hyperparameters
and the study seed on a given machine and thread count (tests/test_trial.py), so export
re-trains the chosen trial once and checks the result against the recorded sigma. Storing every
student (tens to hundreds of MB each, most of them discarded) or only the Pareto set
(which changes as the study runs) would cost far more storage than one re-run costs
compute. With another thread count, device or kernel the re-run can differ slightly (in
the tests: 3e-9 between 1 and 2 CPU threads): the card records both sigmas.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from kdsearch.service.artifacts import resolve_cache_dir
from kdsearch.service.errors import KdsearchError
from kdsearch.service.racing import Configuration, aggregate
from kdsearch.service.record import TrialRecord
from kdsearch.service.report import chosen
from kdsearch.service.storage import open_storage
from kdsearch.service.study import baseline_accuracy, load_stored_spec, study_artifacts
from kdsearch.workers.assets import open_asset_cache, prepare_assets, student_tokenizer_ref
from kdsearch.workers.device import pick_device, training_dtype
from kdsearch.workers.models import load_tokenizer
from kdsearch.workers.trial import build_trial

logger = logging.getLogger(__name__)

# Same machine, same trial: identical. Beyond this, the card flags the difference.
REPRODUCTION_TOLERANCE = 1e-4


def export_student(
    storage_url: str,
    study_name: str,
    out_dir: Path,
    artifacts: str | None,
    cache_dir: Path | None = None,
    trial_number: int | None = None,
    device_name: str = "auto",
) -> dict[str, Any]:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KdsearchError(f"--out {str(out_dir)!r} is not empty; give a new or empty folder")
    storage = open_storage(storage_url, create=False)
    spec = load_stored_spec(storage, study_name)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    trials = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    config = None
    if trial_number is None:
        picked = chosen(study, spec)
        if picked is None:
            raise KdsearchError(
                f"study {study_name!r} has no feasible configuration yet (with seed replicates: "
                "none confirmed on its seeds); pass --trial N to export another trial "
                "(kdsearch status lists them)"
            )
        config, trial = picked
    else:
        trial = next((t for t in trials if t.number == trial_number), None)
        if trial is None or trial.state != TrialState.COMPLETE or trial.values is None:
            state = "does not exist" if trial is None else f"is {trial.state.name}"
            raise KdsearchError(
                f"trial {trial_number} of {study_name!r} {state}; export a COMPLETE trial"
            )
        config = next((c for c in aggregate(trials, spec) if trial.number in c.trials), None)
    device = pick_device(device_name)
    location = study_artifacts(storage, spec.name, artifacts)
    cache = open_asset_cache(location, resolve_cache_dir(location, cache_dir), storage)
    assets = prepare_assets(spec, cache, device, training_dtype(spec.training.precision, device))
    logger.info("re-training trial %d of %s to export its student", trial.number, spec.name)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # Trained as the trial was: its seed, and its precision (bf16 only where it ran in it).
    dtype = torch.bfloat16 if trial.precision == "bf16" else None
    job = build_trial(
        spec, assets, trial.params, device,
        baseline_accuracy=baseline_accuracy(done),
        is_baseline=trial.baseline and trial.replicate == 0, seed=trial.seed, dtype=dtype,
    )  # fmt: skip
    result = job.run(keep_student=True)
    try:
        assert job.student is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        job.student.save_pretrained(out_dir)
        load_tokenizer(student_tokenizer_ref(spec, assets)).save_pretrained(out_dir)
    finally:
        job.cleanup()
    recorded_sigma, recorded_drop = trial.values
    difference = abs(result.sigma - recorded_sigma)
    outcome = result.outcome
    card = {
        "study": spec.name,
        "trial": trial.number,
        "task": spec.task,
        "teacher": spec.teacher.model,
        "params": trial.params,
        "hyperparameters": job.hparams.model_dump(),
        "seed": job.seed,
        "thresholds": spec.thresholds.model_dump(),
        "recorded": {"sigma": recorded_sigma, "accuracy_drop": recorded_drop},
        "reproduced": {
            "sigma": outcome.sigma,
            "accuracy_drop": outcome.accuracy_drop,
            "student_dev_accuracy": outcome.student_dev_accuracy,
            "teacher_dev_accuracy": outcome.teacher_dev_accuracy,
        },
        "reproduced_within_tolerance": difference <= REPRODUCTION_TOLERANCE,
        "configuration": None if config is None else _configuration_card(config, trials),
        "device": str(device),
        "torch": torch.__version__,
    }
    if not math.isfinite(difference) or difference > REPRODUCTION_TOLERANCE:
        logger.warning(
            "re-trained sigma %.6f differs from the recorded %.6f (another machine or device?)",
            result.sigma, recorded_sigma,
        )  # fmt: skip
    (out_dir / "kdsearch_card.json").write_text(json.dumps(card, indent=2))
    logger.info("exported trial %d to %s", trial.number, out_dir)
    return card


def _configuration_card(config: Configuration, trials: list[TrialRecord]) -> dict[str, Any]:
    """The exported student's configuration over all its seeds: what the verdict rests on."""
    by_number = {t.number: t for t in trials}
    return {
        "id": config.config,
        "verdict": config.verdict,
        "seeds": config.n,
        "sigma": {"mean": config.sigma_mean, "sd": config.sigma_sd,
                  "low": config.sigma.low if config.sigma else None,
                  "high": config.sigma.high if config.sigma else None},
        "accuracy_drop": {"mean": config.drop_mean, "sd": config.drop_sd,
                          "low": config.drop.low if config.drop else None,
                          "high": config.drop.high if config.drop else None},
        "replicates": [
            {"trial": n, "seed": seed, "sigma": by_number[n].sigma,
             "accuracy_drop": by_number[n].accuracy_drop}
            for n, seed in zip(config.trials, config.seeds, strict=True)
        ],
    }  # fmt: skip
