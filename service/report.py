"""Renderings of a study summary (``service/summary.py``): ``kdsearch report`` (Markdown,
CSV, JSON, the Pareto front and depth PNGs) and the study note shown in optuna-dashboard.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import optuna

from kdsearch.service.racing import Judged
from kdsearch.service.record import OBJECTIVES, TrialRecord
from kdsearch.service.spec import StudySpec
from kdsearch.service.summary import (
    ConfigurationRow,
    StudySummary,
    summarize_study,
    trial_depth_of,
)

# (key, title) of the report's one row per study.
COLUMNS = [
    ("study", "study"),
    ("task", "task"),
    ("student", "student"),
    ("teacher_dev_accuracy", "teacher dev acc"),
    ("baseline_sigma", "baseline sigma_train"),
    ("baseline_seeds", "baseline seeds"),
    ("baseline_verdict", "baseline verdict"),
    ("answer_config", "answer"),
    ("answer_status", "answer status"),
    ("answer_sigma", "answer sigma_train"),
    ("answer_accuracy_drop", "answer drop"),
    ("answer_seeds", "answer seeds"),
    ("answer_student_dev_accuracy", "answer student dev acc"),
    ("answer_hyperparameters", "answer hyperparameters"),
    ("configurations", "configurations feasible / tried"),
    ("trials", "trials complete / pruned / failed"),
    ("gpu_hours", "GPU-hours"),
    ("cpu_hours", "CPU-hours"),
]


def answer_status(summary: StudySummary) -> str:
    if summary.answer is None:
        return "none"
    if summary.answer_confirmed:
        return "confirmed on held-out seeds"
    return "best candidate, not confirmed"


def report_row(s: StudySummary) -> dict[str, Any]:
    """The study's row of the report, as values (numbers stay numbers)."""
    return {
        "study": s.study,
        "task": s.task,
        "student": s.student,
        "teacher_dev_accuracy": s.teacher_dev_accuracy,
        "baseline_sigma": s.baseline.sigma.mean if s.baseline else None,
        "baseline_seeds": s.baseline.seeds if s.baseline else 0,
        "baseline_verdict": s.baseline.verdict if s.baseline else None,
        "answer_config": s.answer.config if s.answer else None,
        "answer_status": answer_status(s),
        "answer_sigma": s.answer_sigma,
        "answer_accuracy_drop": s.answer_accuracy_drop,
        "answer_seeds": s.answer_seeds,
        "answer_student_dev_accuracy": s.answer_student_dev_accuracy,
        "answer_hyperparameters": s.answer_hyperparameters,
        "configurations": f"{s.n_feasible_configurations} / {s.n_configurations}",
        "trials": f"{s.n_complete} / {s.n_pruned} / {s.n_failed}",
        "gpu_hours": s.gpu_hours,
        "cpu_hours": s.cpu_hours,
    }


def number(value: Any) -> str:
    """A number as tables show it: 4 decimals for figures in [0, 1), 3 significant digits
    otherwise (learning rates like 3e-05 and 2.48e-04 stay distinct)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "answer_hyperparameters":
        return ", ".join(
            f"{k}={number(v) if isinstance(v, float) else v}" for k, v in value.items()
        )
    return number(value)


def configuration_table(rows: list[ConfigurationRow]) -> list[dict[str, str]]:
    """Configuration rows as people read them: mean ± sd [low, high], search and
    held-out seeds apart."""
    out = []
    for r in rows:
        row = {"config": r.config + (" (answer)" if r.answer else "")}
        row.update({k: number(v) if isinstance(v, float) else str(v) for k, v in r.params.items()})
        row.update(
            baseline="yes" if r.baseline else "no",
            search_seeds=str(r.seeds),
            sigma=r.sigma.text(),
            accuracy_drop=r.accuracy_drop.text(),
            verdict=r.verdict,
            held_out_seeds=str(r.confirmation_seeds)
            if r.confirmed is not None or r.confirmation_seeds
            else "-",
            held_out_sigma=r.confirmation_sigma.text() if r.confirmation_sigma else "-",
            held_out_drop=r.confirmation_drop.text() if r.confirmation_drop else "-",
            confirmed={True: "yes", False: "no", None: "-"}[r.confirmed],
        )
        out.append(row)
    return out


def format_markdown(summaries: list[StudySummary]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for s in summaries:
        row = report_row(s)
        lines.append("| " + " | ".join(_cell(k, row[k]) for k, _ in COLUMNS) + " |")
    for s in summaries:
        if s.answer_below_majority:
            lines += ["", f"{s.study}: the answer's students are below the majority-class accuracy "
                      "on dev: check the data and the teacher before using it"]  # fmt: skip
        if s.configurations:
            lines += ["", f"{s.study}: configurations (search seeds; held-out seeds apart), "
                      "mean ± sd [confidence bounds]", ""]  # fmt: skip
            lines += _markdown_table(configuration_table(s.configurations))
        if s.by_depth:
            lines += ["", f"{s.study}: sigma and accuracy drop against the student's depth", ""]
            lines += _markdown_table([{k: number(v) for k, v in r.items()} for r in s.by_depth])
        if s.answer_sigma_per_class:
            lines += ["", f"{s.study}: the answer's sigma per class (its objective is the "
                      "largest)", ""]  # fmt: skip
            lines += _markdown_table([{k: number(v) for k, v in s.answer_sigma_per_class.items()}])
    return "\n".join(lines)


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return out


def format_csv(summaries: list[StudySummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([k for k, _ in COLUMNS])
    for s in summaries:
        row = report_row(s)
        writer.writerow(
            [json.dumps(row[k]) if isinstance(row[k], dict) else row[k] for k, _ in COLUMNS]
        )
    return out.getvalue()


def format_json(summaries: list[StudySummary]) -> str:
    return json.dumps([s.as_dict() for s in summaries], indent=2)


def pareto_png(
    study: optuna.Study, spec: StudySpec, judged: Judged, summary: StudySummary, path: Path
) -> None:
    """The Pareto front as optuna-dashboard draws it (Optuna's plotting API: feasible
    trials coloured, infeasible ones grey, the front marked), with the thresholds drawn,
    each configuration's mean with its interval, and the answer marked."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=list(OBJECTIVES))
    if spec.replicates.max_seeds > 1:
        for c in judged:
            if c.sigma is None or c.drop is None:
                continue
            ax.errorbar(
                c.sigma.mean, c.drop.mean,
                xerr=[[c.sigma.mean - c.sigma.low], [c.sigma.high - c.sigma.mean]],
                yerr=[[c.drop.mean - c.drop.low], [c.drop.high - c.drop.mean]],
                fmt="s", ms=4, lw=0.8, capsize=2,
                color={"feasible": "#2a7d2a", "infeasible": "#999999"}.get(c.verdict, "#d08c00"),
            )  # fmt: skip
    if summary.answer_sigma is not None and summary.answer_accuracy_drop is not None:
        ax.plot(
            summary.answer_sigma, summary.answer_accuracy_drop, marker="*", ms=14,
            color="#c00000", ls="none", label=f"answer ({answer_status(summary)})",
        )  # fmt: skip
    limits = spec.thresholds
    ax.axvline(limits.sigma_max, color="#555555", ls="--", lw=1, label="sigma_max (kappa)")
    ax.axhline(limits.accuracy_drop_max, color="#555555", ls=":", lw=1, label="accuracy_drop_max")
    ax.set_xlabel(f"sigma (train), threshold {limits.sigma_max}")
    ax.set_ylabel(f"accuracy_drop (dev), threshold {limits.accuracy_drop_max}")
    title = f"{spec.name}: Pareto front of trials (grey: infeasible)"
    if spec.replicates.max_seeds > 1:
        title += "\nsquares: configurations, mean and interval over seeds"
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig = ax.get_figure()
    fig.set_size_inches(6.5, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def depth_png(records: list[TrialRecord], spec: StudySpec, path: Path) -> None:
    """sigma and the accuracy drop of every finished trial against its student's depth,
    with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    complete = [t for t in records if t.state == TrialState.COMPLETE and t.values]
    depth = [trial_depth_of(t, spec) for t in complete]
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
    """Markdown for optuna-dashboard's study note: the answer first, named as every other
    command names it, with the figures it rests on."""
    a = summary.answer
    if a is None:
        answer = "none yet"
    else:
        params = ", ".join(f"{k}={number(v)}" for k, v in a.params.items()) or "the defaults"
        where = (
            f"on {summary.answer_seeds} held-out seeds (its trials "
            f"{', '.join(map(str, summary.answer_trials))})"
            if summary.answer_confirmed
            else f"on its {summary.answer_seeds} search seed(s)"
        )
        answer = (
            f"`{a.config}` ({answer_status(summary)}): {params}; sigma "
            f"{number(summary.answer_sigma)}, accuracy_drop {number(summary.answer_accuracy_drop)} "
            f"{where}; its search seeds: sigma {a.sigma.text()}"
        )
    b = summary.baseline
    baseline = (
        f"sigma {b.sigma.text()}, accuracy_drop {b.accuracy_drop.text()} on {b.seeds} seed(s): "
        f"**{b.verdict}**"
        if b is not None
        else "not finished yet"
    )
    feasible = [
        f"  - `{r.config}`: sigma {r.sigma.text()}, accuracy_drop {r.accuracy_drop.text()} "
        f"({r.seeds} seeds)"
        for r in summary.configurations
        if r.verdict == "feasible"
    ]
    lines = [
        f"# {spec.name}",
        "",
        f"- task: **{spec.task}**; teacher: `{spec.teacher.model}`; student: {summary.student}",
        f"- thresholds: sigma <= {spec.thresholds.sigma_max}, accuracy_drop <= "
        f"{spec.thresholds.accuracy_drop_max} (against the {spec.thresholds.accuracy_reference}); "
        f"budget {spec.n_trials} trials",
        f"- searched: {', '.join(spec.search_space) or 'nothing'}",
        f"- **answer**: {answer}",
        f"- **baseline** (the paper's defaults): {baseline}",
    ]
    if summary.answer_below_majority:
        lines.append(
            "- warning: the answer's students are below the majority-class accuracy on dev"
        )
    if spec.replicates.max_seeds > 1:
        lines += [
            "- feasible configurations on their search seeds:",
            *(feasible or ["  - none yet"]),
        ]
    if summary.answer_sigma_per_class:
        classes = ", ".join(f"{k} {v:.4f}" for k, v in summary.answer_sigma_per_class.items())
        lines.append(f"- the answer's sigma per class (the objective is the largest): {classes}")
    lines += [
        f"- trials: {summary.n_complete} complete, {summary.n_pruned} pruned, {summary.n_failed} "
        f"failed, {summary.n_running} running; configurations: {summary.n_feasible_configurations} "
        f"feasible of {summary.n_configurations}",
        "",
        "Optuna's *Best Trials* is the trial-level Pareto front (one seed each); the answer is "
        "kdsearch's configuration-level verdict over seeds.",
        "",
        "_Written by kdsearch as trials finish._",
    ]
    return "\n".join(lines)


def update_study_note(study: optuna.Study, spec: StudySpec) -> None:
    """Rewrite the study's optuna-dashboard note from its current trials. Callers hold
    the note's critical section: the note is versioned, and concurrent writers would
    conflict."""
    from optuna_dashboard import save_note

    save_note(study, study_note(summarize_study(study, spec), spec))
