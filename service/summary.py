"""A study at a glance, as data: its configurations, its baseline's verdict, its answer and
its counts. ``kdsearch report``, ``status``, the study note, ``export`` and the Python API
all read a study through here, so they all name the same answer; ``service/report.py``
and ``service/status.py`` render it.

One pass over the study: every trial read at once (``KdsearchStorage.read_study``), then
pure functions of those records.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.service.confirmation import Confirmation, answer, confirmation_of
from kdsearch.service.racing import Configuration, Judged, aggregate
from kdsearch.service.record import Answer, TrialRecord, teacher_accuracy
from kdsearch.service.spec import DEPTH, StudySpec


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a study is read (reference counting
    still frees what is dropped): reading 10,000 trials makes hundreds of thousands of
    objects, and the collector would walk all of them again at each of its full passes
    (a fifth of ``kdsearch status``'s time at 10,000 trials)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of ``study``, typed, from one bulk read."""
    storage = getattr(study._storage, "_backend", study._storage)
    # The statistics' scipy (a third of a second to import) loads while the database
    # answers: the read mostly waits on the server, with the interpreter free.
    warm = threading.Thread(target=importlib.import_module, args=("scipy.special",))
    warm.start()
    with paused_gc():
        trials = (
            storage.read_study(study._study_id)
            if hasattr(storage, "read_study")
            else study.get_trials(deepcopy=False)
        )
        records = [TrialRecord.of(t) for t in trials]
    warm.join()
    return records


def judge_study(
    records: list[TrialRecord], spec: StudySpec, study: optuna.Study | None = None
) -> Judged:
    """Every configuration judged against the study's teacher (as recorded) or baseline."""
    teacher = teacher_accuracy(study.user_attrs) if study is not None else None
    return aggregate(records, spec, teacher)


@dataclass(frozen=True)
class Estimate:
    """A figure over a configuration's seeds: mean, sd over the seeds, interval bounds."""

    mean: float | None
    sd: float | None
    low: float | None
    high: float | None

    def text(self) -> str:
        """``mean ± sd [low, high]``, as tables show it."""
        if self.mean is None or math.isnan(self.mean):
            return "-"
        out = f"{self.mean:.4f}"
        if self.sd is not None:
            out += f" ± {self.sd:.4f}"
        if self.low is not None and self.high is not None:
            out += f" [{self.low:.4f}, {self.high:.4f}]"
        return out


@dataclass(frozen=True)
class ConfigurationRow:
    """One configuration as the tables show it: search figures, held-out figures apart."""

    config: str
    params: dict[str, Any]
    baseline: bool
    seeds: int  # finished search seeds
    sigma: Estimate
    accuracy_drop: Estimate
    verdict: str
    trials: list[int]
    confirmation_seeds: int = 0
    confirmation_sigma: Estimate | None = None
    confirmation_drop: Estimate | None = None
    confirmed: bool | None = None  # None: not tried on held-out seeds
    answer: bool = False

    def flat(self) -> dict[str, Any]:
        """Numbers, one column each (JSON, CSV, dataframes)."""
        out: dict[str, Any] = {"config": self.config, **self.params, "baseline": self.baseline,
                               "seeds": self.seeds}  # fmt: skip
        for name, estimate in (("sigma", self.sigma), ("drop", self.accuracy_drop)):
            out.update({f"{name}_{k}": v for k, v in asdict(estimate).items()})
        out.update(
            verdict=self.verdict, trials=self.trials, confirmation_seeds=self.confirmation_seeds
        )
        for name, estimate in (("confirmation_sigma", self.confirmation_sigma),
                               ("confirmation_drop", self.confirmation_drop)):  # fmt: skip
            values = (
                asdict(estimate)
                if estimate is not None
                else dict.fromkeys(("mean", "sd", "low", "high"))
            )
            out.update({f"{name}_{k}": v for k, v in values.items()})
        out.update(confirmed=self.confirmed, answer=self.answer)
        return out


def _estimate(values: list[float], interval: Any) -> Estimate:
    mean = sum(values) / len(values) if values else None
    sd = None
    if len(values) >= 2 and mean is not None:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    bounded = interval is not None and interval.df > 0  # df 0: a point, no interval
    return Estimate(
        mean,
        sd,
        interval.low if bounded else None,
        interval.high if bounded else None,
    )


def configuration_rows(
    judged: Judged, spec: StudySpec, chosen: Answer | None
) -> list[ConfigurationRow]:
    rows = []
    for c in judged:
        drops = (
            [judged.reference.accuracy - a for a in c.search.accuracies]
            if judged.reference.accuracy is not None
            else []
        )
        if c.baseline and judged.reference.kind == "baseline":
            drops = [0.0] * c.n
        held: Confirmation | None = confirmation_of(c, judged, spec) if c.confirmations else None
        row = ConfigurationRow(
            config=c.config,
            params={name: c.params.get(name) for name in spec.search_space},
            baseline=c.baseline,
            seeds=c.n,
            sigma=_estimate(c.search.sigmas, c.sigma),
            accuracy_drop=_estimate(drops, c.drop),
            verdict=c.verdict,
            trials=c.trials,
            confirmation_seeds=c.confirmation.n,
            confirmation_sigma=_estimate(c.confirmation.sigmas, held.sigma) if held else None,
            confirmation_drop=_confirmation_drop(c, judged, held) if held else None,
            confirmed=held.confirmed if held and held.complete else None,
            answer=chosen is not None and chosen.config == c.config,
        )
        rows.append(row)
    return rows


def _confirmation_drop(c: Configuration, judged: Judged, held: Confirmation) -> Estimate:
    ref = judged.reference.accuracy
    drops = [ref - a for a in c.confirmation.accuracies] if ref is not None else []
    if c.baseline and judged.reference.kind == "baseline":
        drops = [0.0] * c.confirmation.n
    return _estimate(drops, held.drop)


@dataclass(frozen=True)
class StudySummary:
    """A study at a glance, by configuration: with seed replicates every figure is the
    configuration's mean over its seeds, and the answer is ``confirmation.answer``'s."""

    study: str
    task: str
    student: str
    teacher_dev_accuracy: float | None
    baseline: ConfigurationRow | None
    answer: ConfigurationRow | None  # the configuration the study names
    answer_confirmed: bool
    answer_trial: int | None  # the trial export re-trains (its median-sigma seed)
    answer_hyperparameters: dict[str, Any] | None
    answer_student_dev_accuracy: float | None
    answer_sigma: float | None  # held-out seeds' mean when confirmed, else the search's
    answer_accuracy_drop: float | None
    answer_seeds: int  # the seeds those figures come from
    answer_trials: list[int]  # their trials
    answer_below_majority: bool  # its students are less accurate than the majority class
    n_configurations: int
    n_feasible_configurations: int
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    n_running: int
    gpu_hours: float
    cpu_hours: float
    configurations: list[ConfigurationRow] = field(default_factory=list)
    by_depth: list[dict[str, Any]] | None = None  # when the student's depth is searched
    # more than two classes: the answer's sigma of each class (mean over its seeds), by
    # class name; its objective sigma is the largest
    answer_sigma_per_class: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["baseline"] = self.baseline.flat() if self.baseline else None
        out["answer"] = self.answer.flat() if self.answer else None
        out["configurations"] = [c.flat() for c in self.configurations]
        return out


def student_name(spec: StudySpec) -> str:
    if spec.student.teacher_layers is not None:
        return f"teacher's first {spec.student.teacher_layers} layers"
    return spec.student.model or ""


def representative(trials: list[int], records: dict[int, TrialRecord]) -> TrialRecord | None:
    """The median-sigma trial of ``trials``: the one export re-trains."""
    done = [records[n] for n in trials if n in records and records[n].values]
    done.sort(key=lambda t: (t.values[0], t.number))  # type: ignore[index]
    return done[(len(done) - 1) // 2] if done else None


def summarize(records: list[TrialRecord], spec: StudySpec, judged: Judged) -> StudySummary:
    by_number = {r.number: r for r in records}
    chosen = answer(judged, spec)
    rows = configuration_rows(judged, spec, chosen)
    baseline = next((r for r in rows if r.baseline and r.seeds), None)
    best = next((r for r in rows if r.answer), None)
    trial = representative(chosen.trials, by_number) if chosen else None
    outcomes = [
        by_number[n].outcome for n in (chosen.trials if chosen else []) if by_number[n].outcome
    ]
    complete = [r for r in records if r.state == TrialState.COMPLETE and r.outcome is not None]
    hours = {"gpu": 0.0, "cpu": 0.0}
    for r in records:
        if r.elapsed_s is not None and r.state.is_finished():
            hours["gpu" if r.on_gpu else "cpu"] += r.elapsed_s / 3600
    return StudySummary(
        study=spec.name,
        task=spec.task,
        student=student_name(spec),
        teacher_dev_accuracy=complete[0].outcome.teacher_dev_accuracy if complete else None,  # type: ignore[union-attr]
        baseline=baseline,
        answer=best,
        answer_confirmed=bool(chosen and chosen.confirmed),
        answer_trial=trial.number if trial else None,
        answer_hyperparameters=trial.hyperparameters if trial else None,
        answer_student_dev_accuracy=(
            sum(o.student_dev_accuracy for o in outcomes) / len(outcomes) if outcomes else None  # type: ignore[union-attr]
        ),
        answer_sigma=chosen.sigma if chosen else None,
        answer_accuracy_drop=chosen.accuracy_drop if chosen else None,
        answer_seeds=len(chosen.trials) if chosen else 0,
        answer_trials=list(chosen.trials) if chosen else [],
        answer_below_majority=any(o.below_majority for o in outcomes),  # type: ignore[union-attr]
        n_configurations=len(rows),
        n_feasible_configurations=sum(r.verdict == "feasible" for r in rows),
        n_trials=len(records),
        n_complete=len(complete),
        n_pruned=sum(r.state == TrialState.PRUNED for r in records),
        n_failed=sum(r.state == TrialState.FAIL for r in records),
        n_running=sum(r.state == TrialState.RUNNING for r in records),
        gpu_hours=round(hours["gpu"], 4),
        cpu_hours=round(hours["cpu"], 4),
        configurations=rows,
        by_depth=depth_rows(complete, spec) if DEPTH in spec.search_space else None,
        answer_sigma_per_class=per_class_sigma(outcomes, spec),
    )


def summarize_study(study: optuna.Study, spec: StudySpec) -> StudySummary:
    records = read_records(study)
    return summarize(records, spec, judge_study(records, spec, study))


def per_class_sigma(outcomes: list[Any], spec: StudySpec) -> dict[str, float] | None:
    """Each class's train sigma, averaged over ``outcomes`` (a configuration's seeds), by
    class name; None for two classes (both equal the paper's sigma)."""
    lists = [o.train_sigma_per_class for o in outcomes if o.train_sigma_per_class]
    if not lists or len(lists[0]) <= 2:
        return None
    names = spec.data.labels or [str(c) for c in range(len(lists[0]))]
    return {name: sum(v[c] for v in lists) / len(lists) for c, name in enumerate(names)}


def trial_depth_of(trial: TrialRecord, spec: StudySpec) -> int:
    return int(trial.params.get(DEPTH, spec.student.teacher_layers or 0))


def depth_rows(complete: list[TrialRecord], spec: StudySpec) -> list[dict[str, Any]]:
    """sigma and the accuracy drop against the student's depth (its teacher layers), over
    the finished trials at each depth."""
    rows = []
    for depth in sorted({trial_depth_of(t, spec) for t in complete}):
        at = [t for t in complete if trial_depth_of(t, spec) == depth]
        sigmas = sorted(t.sigma for t in at if t.sigma is not None)
        drops = [t.accuracy_drop for t in at if t.accuracy_drop is not None]
        rows.append(
            {
                "depth": depth,
                "trials": len(at),
                "best_sigma": sigmas[0],
                "median_sigma": sigmas[len(sigmas) // 2],
                "best_accuracy_drop": min(drops),
                "feasible": sum(bool(t.feasible) for t in at),
            }
        )
    return rows
