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

from kdsearch.service.racing import Configuration, aggregate, best_configuration
from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import DEPTH, StudySpec


@dataclass(frozen=True)
class StudySummary:
    """A study at a glance, by configuration: with seed replicates every figure is the
    configuration's mean over its seeds, and "best" is the confirmed-feasible one."""

    study: str
    task: str
    student: str
    baseline_sigma: float | None  # mean over the baseline configuration's seeds
    baseline_accuracy_drop: float | None
    baseline_seeds: int
    baseline_verdict: str | None
    best_config: str | None
    best_trial: int | None  # its representative replicate (the median-sigma one)
    best_sigma: float | None
    best_sigma_sd: float | None
    best_seeds: int
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
    n_configurations: int = 0
    n_confirmed_feasible: int = 0
    configurations: list[dict[str, Any]] | None = None  # with seed replicates
    by_depth: list[dict[str, Any]] | None = None  # when the student's depth is searched
    # more than two classes: the best configuration's sigma of each class (mean over its
    # seeds), by class name; its objective sigma is the largest
    best_sigma_per_class: dict[str, float] | None = None


def _student_name(spec: StudySpec) -> str:
    if spec.student.teacher_layers is not None:
        return f"teacher's first {spec.student.teacher_layers} layers"
    return spec.student.model or ""


def records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]


def representative(config: Configuration, trials: list[TrialRecord]) -> TrialRecord | None:
    """The configuration's replicate with the median sigma: the one export re-trains."""
    done = [t for t in trials if t.number in config.trials and t.values]
    done.sort(key=lambda t: (t.values[0], t.number))  # type: ignore[index]
    return done[(len(done) - 1) // 2] if done else None


def chosen(study: optuna.Study, spec: StudySpec) -> tuple[Configuration, TrialRecord] | None:
    """The study's answer: the best confirmed-feasible configuration (``best_configuration``)
    and its representative trial; None while there is none."""
    trials = records(study)
    best = best_configuration(aggregate(trials, spec))
    trial = representative(best, trials) if best is not None else None
    return (best, trial) if best is not None and trial is not None else None


def configuration_rows(configs: list[Configuration], spec: StudySpec) -> list[dict[str, Any]]:
    """One row per configuration: its hyperparameters, mean +- sd over its seeds, the
    confidence bounds, n and the verdict."""
    rows = []
    for c in configs:
        rows.append(
            {
                "config": c.config,
                **{name: c.params.get(name) for name in spec.search_space},
                "seeds": c.n,
                "sigma_mean": c.sigma_mean if c.n else None,
                "sigma_sd": c.sigma_sd,
                "sigma_low": c.sigma.low if c.sigma else None,
                "sigma_high": c.sigma.high if c.sigma else None,
                "drop_mean": c.drop_mean if c.n else None,
                "drop_sd": c.drop_sd,
                "drop_low": c.drop.low if c.drop else None,
                "drop_high": c.drop.high if c.drop else None,
                "verdict": c.verdict,
                "baseline": c.baseline,
                "trials": c.trials,
            }
        )
    return rows


def summarize(study: optuna.Study, spec: StudySpec) -> StudySummary:
    trials = records(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.outcome is not None]
    configs = aggregate(trials, spec)
    baseline = next((c for c in configs if c.baseline and c.n), None)
    best = best_configuration(configs)
    best_trial = representative(best, trials) if best else None
    best_outcomes = [t.outcome for t in complete if best and t.number in best.trials]
    hours = {"gpu": 0.0, "cpu": 0.0}
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is not None and t.datetime_complete is not None:
            kind = "gpu" if TrialRecord.of(t).on_gpu else "cpu"
            hours[kind] += (t.datetime_complete - t.datetime_start).total_seconds() / 3600
    replicated = spec.replicates.max_seeds > 1
    return StudySummary(
        study=spec.name,
        task=spec.task,
        student=_student_name(spec),
        baseline_sigma=baseline.sigma_mean if baseline else None,
        baseline_accuracy_drop=baseline.drop_mean if baseline else None,
        baseline_seeds=baseline.n if baseline else 0,
        baseline_verdict=baseline.verdict if baseline else None,
        best_config=best.config if best else None,
        best_trial=best_trial.number if best_trial else None,
        best_sigma=best.sigma_mean if best else None,
        best_sigma_sd=best.sigma_sd if best else None,
        best_seeds=best.n if best else 0,
        teacher_dev_accuracy=complete[0].outcome.teacher_dev_accuracy  # type: ignore[union-attr]
        if complete
        else None,
        best_student_dev_accuracy=sum(o.student_dev_accuracy for o in best_outcomes)  # type: ignore[union-attr]
        / len(best_outcomes)
        if best_outcomes
        else None,
        best_accuracy_drop=best.drop_mean if best else None,
        best_hyperparameters=best_trial.hyperparameters if best_trial else None,
        n_feasible=sum(bool(t.feasible) for t in complete),
        n_infeasible=sum(t.feasible is False for t in complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_running=sum(t.state == TrialState.RUNNING for t in trials),
        gpu_hours=round(hours["gpu"], 4),
        cpu_hours=round(hours["cpu"], 4),
        n_configurations=len(configs),
        n_confirmed_feasible=sum(c.verdict == "feasible" for c in configs),
        configurations=configuration_rows(configs, spec) if replicated else None,
        by_depth=depth_rows(complete, spec) if DEPTH in spec.search_space else None,
        best_sigma_per_class=per_class_sigma(best_outcomes, spec),
    )


def per_class_sigma(outcomes: list[Any], spec: StudySpec) -> dict[str, float] | None:
    """Each class's train sigma, averaged over ``outcomes`` (a configuration's seeds), by
    class name; None for two classes (both equal the paper's sigma)."""
    lists = [o.train_sigma_per_class for o in outcomes if o.train_sigma_per_class]
    if not lists or len(lists[0]) <= 2:
        return None
    names = spec.data.labels or [str(c) for c in range(len(lists[0]))]
    return {name: sum(v[c] for v in lists) / len(lists) for c, name in enumerate(names)}


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
    ("baseline_seeds", "seeds"),
    ("baseline_verdict", "baseline verdict"),
    ("best_sigma", "best feasible sigma_train"),
    ("best_sigma_sd", "sd"),
    ("best_seeds", "seeds"),
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
        if s.configurations:
            title = f"{s.study}: configurations, mean over their seeds (confidence bounds)"
            lines += ["", title, ""]
            lines += _markdown_table([compact_row(r) for r in s.configurations])
        if s.by_depth:
            lines += ["", f"{s.study}: sigma and accuracy drop against the student's depth", ""]
            lines += _markdown_table(s.by_depth)
        if s.best_sigma_per_class:
            lines += ["", f"{s.study}: the best configuration's sigma per class (its objective "
                      "is the largest)", ""]  # fmt: skip
            lines += _markdown_table([s.best_sigma_per_class])
    return "\n".join(lines)


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """A configuration row as people read it: mean +- sd [low, high]."""

    def spread(name: str) -> str:
        if row[f"{name}_mean"] is None:
            return "-"
        text = f"{row[f'{name}_mean']:.4f}"
        if row[f"{name}_sd"] is not None:
            text += f" ± {row[f'{name}_sd']:.4f}"
        if row[f"{name}_low"] is not None:
            text += f" [{row[f'{name}_low']:.4f}, {row[f'{name}_high']:.4f}]"
        return text

    skip = {k for k in row if k.split("_")[0] in ("sigma", "drop")} | {"trials"}
    out = {k: v for k, v in row.items() if k not in skip}
    out["sigma"], out["accuracy_drop"] = spread("sigma"), spread("drop")
    out["verdict"] = row["verdict"]
    return out


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
    if spec.replicates.max_seeds > 1:
        # Each configuration: its mean over seeds with its confidence interval.
        for c in aggregate(records(study), spec):
            if c.sigma is None or c.drop is None:
                continue
            ax.errorbar(
                c.sigma.mean, c.drop.mean,
                xerr=[[c.sigma.mean - c.sigma.low], [c.sigma.high - c.sigma.mean]],
                yerr=[[c.drop.mean - c.drop.low], [c.drop.high - c.drop.mean]],
                fmt="s", ms=4, lw=0.8, capsize=2,
                color={"feasible": "#2a7d2a", "infeasible": "#999999"}.get(c.verdict, "#d08c00"),
            )  # fmt: skip
    limits = spec.thresholds
    ax.axvline(limits.sigma_max, color="#555555", ls="--", lw=1, label="sigma_max (kappa)")
    ax.axhline(limits.accuracy_drop_max, color="#555555", ls=":", lw=1, label="accuracy_drop_max")
    ax.set_xlabel(f"sigma (train), threshold {limits.sigma_max}")
    ax.set_ylabel(f"accuracy_drop (dev), threshold {limits.accuracy_drop_max}")
    ax.set_title(
        f"{spec.name}: Pareto front (grey: infeasible)"
        + (
            "\nsquares: configurations, mean and interval over seeds"
            if spec.replicates.max_seeds > 1
            else ""
        )
    )
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
    seeds = lambda n: f" (mean of {n} seeds)" if n > 1 else ""  # noqa: E731
    best = (
        f"trial {summary.best_trial}: sigma {summary.best_sigma:.4f}, accuracy_drop "
        f"{summary.best_accuracy_drop:.4f}{seeds(summary.best_seeds)}; {hyperparameters}"
        if summary.best_trial is not None
        else "none yet"
    )
    baseline = (
        f"sigma {summary.baseline_sigma:.4f}, accuracy_drop {summary.baseline_accuracy_drop:.4f}"
        f"{seeds(summary.baseline_seeds)}: {summary.baseline_verdict}"
        if summary.baseline_sigma is not None
        else "not finished yet"
    )
    confirmed = [
        f"  - `{r['config']}`: sigma {compact_row(r)['sigma']}, accuracy_drop "
        f"{compact_row(r)['accuracy_drop']} ({r['seeds']} seeds)"
        for r in summary.configurations or []
        if r["verdict"] == "feasible"
    ]
    if summary.configurations is not None:
        confirmed = ["- **confirmed feasible configurations**:", *(confirmed or ["  - none yet"])]
    if summary.best_sigma_per_class:
        classes = ", ".join(f"{k} {v:.4f}" for k, v in summary.best_sigma_per_class.items())
        confirmed.append(f"- best's sigma per class (the objective is the largest): {classes}")
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
            *confirmed,
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
