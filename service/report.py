"""Study summaries: ``kdsearch report`` (the paper's table, Pareto front PNG, counts,
compute hours) and the study note shown in optuna-dashboard."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import DEPTH, StudySpec


@dataclass(frozen=True)
class StudySummary:
    study: str
    task: str
    student: str
    baseline_sigma: float | None
    baseline_accuracy_drop: float | None
    best_trial: int | None
    best_sigma: float | None
    teacher_dev_accuracy: float | None
    best_student_dev_accuracy: float | None
    best_accuracy_drop: float | None
    best_hyperparameters: dict[str, Any] | None
    n_feasible: int
    n_infeasible: int
    n_pruned: int
    n_failed: int
    n_running: int
    gpu_hours: float
    cpu_hours: float
    by_depth: list[dict[str, Any]] | None = None  # when the student's depth is searched


def _student_name(spec: StudySpec) -> str:
    if spec.student.teacher_layers is not None:
        return f"teacher's first {spec.student.teacher_layers} layers"
    return spec.student.model or ""


def records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]


def best_feasible(trials: list[TrialRecord]) -> TrialRecord | None:
    """The feasible finished trial with the lowest sigma (ties: lower drop)."""
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and t.feasible]
    return min(feasible, key=lambda t: t.values or (), default=None)


def summarize(study: optuna.Study, spec: StudySpec) -> StudySummary:
    trials = records(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.outcome is not None]
    baseline = next((t for t in complete if t.baseline), None)
    best = best_feasible(trials)
    hours = {"gpu": 0.0, "cpu": 0.0}
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is not None and t.datetime_complete is not None:
            kind = "gpu" if TrialRecord.of(t).on_gpu else "cpu"
            hours[kind] += (t.datetime_complete - t.datetime_start).total_seconds() / 3600
    best_outcome = best.outcome if best else None
    return StudySummary(
        study=spec.name,
        task=spec.task,
        student=_student_name(spec),
        baseline_sigma=baseline.sigma if baseline else None,
        baseline_accuracy_drop=baseline.accuracy_drop if baseline else None,
        best_trial=best.number if best else None,
        best_sigma=best.sigma if best else None,
        teacher_dev_accuracy=complete[0].outcome.teacher_dev_accuracy  # type: ignore[union-attr]
        if complete
        else None,
        best_student_dev_accuracy=best_outcome.student_dev_accuracy if best_outcome else None,
        best_accuracy_drop=best.accuracy_drop if best else None,
        best_hyperparameters=best.hyperparameters if best else None,
        n_feasible=sum(bool(t.feasible) for t in complete),
        n_infeasible=sum(t.feasible is False for t in complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_running=sum(t.state == TrialState.RUNNING for t in trials),
        gpu_hours=round(hours["gpu"], 4),
        cpu_hours=round(hours["cpu"], 4),
        by_depth=depth_rows(complete, spec) if DEPTH in spec.search_space else None,
    )


def _depth(trial: TrialRecord, spec: StudySpec) -> int:
    return int(trial.params.get(DEPTH, spec.student.teacher_layers or 0))


def depth_rows(complete: list[TrialRecord], spec: StudySpec) -> list[dict[str, Any]]:
    """sigma and the accuracy drop against the student's depth (its teacher layers), over
    the finished trials at each depth."""
    rows = []
    depths = sorted({_depth(t, spec) for t in complete})
    for depth in depths:
        at = [t for t in complete if _depth(t, spec) == depth]
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


COLUMNS = [
    ("study", "study"),
    ("task", "task"),
    ("student", "student"),
    ("baseline_sigma", "baseline sigma_train"),
    ("best_sigma", "best feasible sigma_train"),
    ("best_trial", "trial"),
    ("teacher_dev_accuracy", "teacher acc"),
    ("best_student_dev_accuracy", "student acc"),
    ("best_accuracy_drop", "drop"),
    ("best_hyperparameters", "best hyperparameters"),
    ("n_feasible", "feasible"),
    ("n_infeasible", "infeasible"),
    ("n_pruned", "pruned"),
    ("n_failed", "failed"),
    ("gpu_hours", "GPU-hours"),
    ("cpu_hours", "CPU-hours"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "best_hyperparameters":
        return ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
        )
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_markdown(summaries: list[StudySummary]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for s in summaries:
        row = asdict(s)
        lines.append("| " + " | ".join(_cell(k, row[k]) for k, _ in COLUMNS) + " |")
    for s in summaries:
        if s.by_depth:
            lines += ["", f"{s.study}: sigma and accuracy drop against the student's depth", ""]
            lines += _markdown_table(s.by_depth)
    return "\n".join(lines)


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(_cell(k, r[k]) for k in keys) + " |" for r in rows]
    return out


def format_csv(summaries: list[StudySummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([k for k, _ in COLUMNS])
    for s in summaries:
        row = asdict(s)
        writer.writerow(
            [json.dumps(row[k]) if isinstance(row[k], dict) else row[k] for k, _ in COLUMNS]
        )
    return out.getvalue()


def format_json(summaries: list[StudySummary]) -> str:
    return json.dumps([asdict(s) for s in summaries], indent=2)


def pareto_png(study: optuna.Study, spec: StudySpec, path: Path) -> None:
    """The Pareto front as optuna-dashboard draws it (Optuna's plotting API: feasible
    trials coloured, infeasible ones grey, the front marked), with the thresholds drawn."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    from kdsearch.service.study import METRIC_NAMES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=METRIC_NAMES)
    limits = spec.thresholds
    ax.axvline(limits.sigma_max, color="#555555", ls="--", lw=1, label="sigma_max (kappa)")
    ax.axhline(limits.accuracy_drop_max, color="#555555", ls=":", lw=1, label="accuracy_drop_max")
    ax.set_xlabel(f"sigma (train), threshold {limits.sigma_max}")
    ax.set_ylabel(f"accuracy_drop (dev), threshold {limits.accuracy_drop_max}")
    ax.set_title(f"{spec.name}: Pareto front (grey: infeasible)")
    ax.legend(fontsize=7)
    fig = ax.get_figure()
    fig.set_size_inches(6.5, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def depth_png(study: optuna.Study, spec: StudySpec, path: Path) -> None:
    """sigma and the accuracy drop of every finished trial against its student's depth,
    with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in records(study) if t.state == TrialState.COMPLETE and t.values]
    depth = [_depth(t, spec) for t in complete]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    panels = (
        (0, "sigma (train)", spec.thresholds.sigma_max),
        (1, "accuracy_drop (dev)", spec.thresholds.accuracy_drop_max),
    )
    for ax, (index, label, limit) in zip(axes, panels, strict=True):
        ax.scatter(depth, [t.values[index] for t in complete], s=18)  # type: ignore[index]
        ax.axhline(limit, color="#555555", ls="--", lw=1)
        ax.set_xlabel("student depth (teacher layers)")
        ax.set_ylabel(label)
        ax.set_xticks(sorted(set(depth)))
    fig.suptitle(f"{spec.name}: confidence preservation against depth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto_front(trials: list[TrialRecord]) -> set[int]:
    """Numbers of the finished trials no other trial dominates (feasible or not)."""

    def dominates(a: TrialRecord, b: TrialRecord) -> bool:
        return all(x <= y for x, y in zip(a.values, b.values, strict=True)) and a.values != b.values

    return {t.number for t in trials if not any(dominates(u, t) for u in trials)}


def study_note(summary: StudySummary, spec: StudySpec) -> str:
    """Markdown for optuna-dashboard's study note."""
    hyperparameters = _cell("best_hyperparameters", summary.best_hyperparameters)
    best = (
        f"trial {summary.best_trial}: sigma {summary.best_sigma:.4f}, accuracy_drop "
        f"{summary.best_accuracy_drop:.4f}; {hyperparameters}"
        if summary.best_trial is not None
        else "none yet"
    )
    baseline = (
        f"sigma {summary.baseline_sigma:.4f}, accuracy_drop {summary.baseline_accuracy_drop:.4f}"
        if summary.baseline_sigma is not None
        else "not finished yet"
    )
    return "\n".join(
        [
            f"# {spec.name}",
            "",
            f"- task: **{spec.task}**; teacher: `{spec.teacher.model}`; student: {summary.student}",
            f"- thresholds: sigma <= {spec.thresholds.sigma_max}, accuracy_drop <= "
            f"{spec.thresholds.accuracy_drop_max}; budget {spec.n_trials} trials",
            f"- searched: {', '.join(spec.search_space) or 'nothing'}",
            f"- **baseline** (the paper's defaults): {baseline}",
            f"- **best feasible**: {best}",
            f"- trials: {summary.n_feasible} feasible, {summary.n_infeasible} infeasible, "
            f"{summary.n_pruned} pruned, {summary.n_failed} failed, {summary.n_running} running",
            "",
            "_Written by kdsearch as trials finish._",
        ]
    )


def update_study_note(study: optuna.Study, spec: StudySpec) -> None:
    """Rewrite the study's optuna-dashboard note from its current trials. Callers hold
    the study lock: the note is versioned, and concurrent writers would conflict."""
    from optuna_dashboard import save_note

    save_note(study, study_note(summarize(study, spec), spec))
