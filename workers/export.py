"""``kdsearch export``: the study's answer (or a chosen trial) as a Hugging Face model folder.

Trials do not store their students: a trial is deterministic given its recorded config
(``TrialAttr.TRIAL_CONFIG``: hyperparameters, seed, precision, reference) on a given
machine and thread count (tests/test_trial.py), so export re-trains the chosen trial from
that config once and checks the result against the recorded sigma. Storing every student
(tens to hundreds of MB each, most of them discarded) or only the Pareto set (which
changes as the study runs) would cost far more storage than one re-run costs compute.
With another thread count, device or kernel the re-run can differ slightly (in the tests:
3e-9 between 1 and 2 CPU threads): the card records both sigmas.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from kdsearch.service.artifacts import require_writable, resolve_cache_dir, study_artifacts
from kdsearch.service.errors import InfrastructureError, KdsearchError, first_line
from kdsearch.service.record import TrialRecord
from kdsearch.service.storage import open_storage
from kdsearch.service.study import load_stored_spec
from kdsearch.service.summary import StudySummary, judge_study, read_records, summarize
from kdsearch.service.trial_config import (
    KnownAccuracies,
    Placement,
    TrialConfig,
    config_id,
    resolve,
)
from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import open_asset_cache
from kdsearch.workers.device import dtype_of, pick_device
from kdsearch.workers.models import load_tokenizer
from kdsearch.workers.stages import Recipe
from kdsearch.workers.trial import DistillationTrial

logger = logging.getLogger(__name__)

# Same machine, same trial: identical. Beyond this, the card flags the difference.
REPRODUCTION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportRequest:
    storage_url: str
    study: str
    out: Path
    artifacts: str | None = None
    cache_dir: Path | None = None
    trial: int | None = None  # None: the study's answer
    device: str = "auto"


@dataclass(frozen=True)
class ExportCard:
    """``kdsearch_card.json``: what the exported student is and what it rests on."""

    study: str
    trial: int
    task: str
    teacher: str
    labels: list[str]
    head: str  # "tinybert": apply kdsearch.workers.models.tinybert_head after loading
    trial_config: dict[str, Any]
    thresholds: dict[str, Any]
    recorded: dict[str, float]
    reproduced: dict[str, float]
    reproduced_within_tolerance: bool
    answer: dict[str, Any] | None  # the study's answer, when this trial is one of its seeds
    device: str
    torch: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_out(out: Path) -> None:
    """A new or empty, writable folder, checked before any re-training."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KdsearchError(f"--out {str(out)!r} is not empty; give a new or empty folder")
    try:
        require_writable(out)
    except OSError as exc:
        raise InfrastructureError(
            f"cannot write the export to {str(out)!r}: {first_line(exc)}; give a writable --out"
        ) from None


def export_student(request: ExportRequest) -> dict[str, Any]:
    _check_out(request.out)
    storage = open_storage(request.storage_url, create=False)
    spec = load_stored_spec(storage, request.study)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    records = read_records(study)
    summary = summarize(records, spec, judge_study(records, spec, study))
    trial = _chosen(records, summary, request)
    config = trial.trial_config or _legacy_config(trial, spec, records)
    device = pick_device(request.device)
    location = study_artifacts(storage, spec.name, request.artifacts)
    cache = open_asset_cache(location, resolve_cache_dir(location, request.cache_dir), storage)
    assets = prepare_assets(spec, cache, device, dtype_of(config.precision))
    logger.info("re-training trial %d of %s to export its student", trial.number, spec.name)
    job = DistillationTrial(config, Recipe.of(spec), assets, device)
    result = job.run(keep_student=True)
    try:
        assert job.student is not None
        job.student.save_pretrained(request.out)
        load_tokenizer(assets.student_tokenizer).save_pretrained(request.out)
    finally:
        job.cleanup()
    assert trial.values is not None
    recorded_sigma, recorded_drop = trial.values
    difference = abs(result.sigma - recorded_sigma)
    outcome = result.outcome
    in_answer = summary.answer is not None and trial.config == summary.answer.config
    card = ExportCard(
        study=spec.name,
        trial=trial.number,
        task=spec.task,
        teacher=spec.teacher.model,
        labels=list(assets.label_names),
        head=spec.training.student_head,
        trial_config=config.to_attr(),
        thresholds=spec.thresholds.model_dump(),
        recorded={"sigma": recorded_sigma, "accuracy_drop": recorded_drop},
        reproduced={
            "sigma": outcome.sigma,
            "accuracy_drop": outcome.accuracy_drop,
            "student_dev_accuracy": outcome.student_dev_accuracy,
            "teacher_dev_accuracy": outcome.teacher_dev_accuracy,
        },
        reproduced_within_tolerance=difference <= REPRODUCTION_TOLERANCE,
        answer=_answer_card(summary) if in_answer else None,
        device=str(device),
        torch=torch.__version__,
    )
    if not math.isfinite(difference) or difference > REPRODUCTION_TOLERANCE:
        logger.warning(
            "re-trained sigma %.6f differs from the recorded %.6f (another machine or device?)",
            result.sigma, recorded_sigma,
        )  # fmt: skip
    (request.out / "kdsearch_card.json").write_text(json.dumps(card.as_dict(), indent=2))
    logger.info("exported trial %d to %s", trial.number, request.out)
    return card.as_dict()


def _chosen(
    records: list[TrialRecord], summary: StudySummary, request: ExportRequest
) -> TrialRecord:
    by_number = {r.number: r for r in records}
    if request.trial is None:
        if summary.answer_trial is None:
            raise KdsearchError(
                f"study {request.study!r} has no answer yet (no configuration feasible on its "
                "seeds); pass --trial N to export another trial (kdsearch status lists them)"
            )
        return by_number[summary.answer_trial]
    trial = by_number.get(request.trial)
    if trial is None or trial.state != TrialState.COMPLETE or trial.values is None:
        state = "does not exist" if trial is None else f"is {trial.state.name}"
        raise KdsearchError(
            f"trial {request.trial} of {request.study!r} {state}; export a COMPLETE trial"
        )
    return trial


def _legacy_config(trial: TrialRecord, spec: Any, records: list[TrialRecord]) -> TrialConfig:
    """A trial recorded before trial configs: its config rebuilt from its params."""
    judged = judge_study(records, spec)
    baseline = next((c for c in judged if c.baseline and c.n), None)
    known = KnownAccuracies(
        teacher=trial.outcome.teacher_dev_accuracy if trial.outcome else None,
        baseline=None
        if trial.baseline and trial.replicate == 0
        else (baseline.accuracy_mean if baseline else None),
    )
    placement = Placement(
        trial.config or config_id(trial.params), trial.replicate,
        trial.seed if trial.seed is not None else spec.seed, trial.role,
    )  # fmt: skip
    precision = "bf16" if trial.precision == "bf16" else "fp32"
    return resolve(spec, placement, trial.params, known, precision)


def _answer_card(summary: StudySummary) -> dict[str, Any]:
    """The study's answer over all its seeds: what the verdict rests on."""
    a = summary.answer
    assert a is not None
    return {
        "config": a.config,
        "confirmed": summary.answer_confirmed,
        "figures_from_trials": summary.answer_trials,
        "sigma": summary.answer_sigma,
        "accuracy_drop": summary.answer_accuracy_drop,
        "search": a.flat(),
    }
