"""``kdsearch status``: the study's configurations and trials, as tables or JSON, and the
live view (``--watch``). JSON carries numbers (``null`` where a figure is missing), the
tables carry text."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

from optuna.trial import TrialState

from kdsearch.service.confirmation import plan
from kdsearch.service.racing import Judged
from kdsearch.service.record import TrialRecord
from kdsearch.service.report import answer_status, configuration_table, number
from kdsearch.service.spec import StudySpec
from kdsearch.service.summary import StudySummary


def trial_rows(records: list[TrialRecord], spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial, with its configuration, role and seed; a queued trial (the
    baseline, a retry, a seed) shows the hyperparameters it will run with."""
    rows = []
    for r in records:
        rows.append(
            {
                "trial": r.number,
                "state": r.state.name,
                "role": r.role.value,
                "config": r.config,
                "replicate": r.replicate,
                "seed": r.seed,
                **{name: r.params.get(name) for name in spec.search_space},
                "sigma": _finite(r.sigma),
                "accuracy_drop": _finite(r.accuracy_drop),
                "feasible": r.feasible,
                "host": r.worker_host,
                "elapsed_s": r.elapsed_s,
            }
        )
    return rows


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _cell(value: Any) -> str:
    if type(value) is str:  # most cells: a table of 10,000 trials has some 350,000
        return value
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return (
            number(value)
            if abs(value) < 1e-3 and value != 0
            else (f"{value:.6f}" if abs(value) < 1 else f"{value:.4g}")
        )
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    headers = list(rows[0])
    cells = [[_cell(r[h]) for h in headers] for r in rows]
    columns = zip(*cells, strict=True)
    widths = [max(len(h), *map(len, column)) for h, column in zip(headers, columns, strict=True)]
    # one format string per row: a column at a time would cost as many calls as cells
    template = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [template.format(*headers), "  ".join("-" * w for w in widths)]
    lines += [template.format(*row) for row in cells]
    return "\n".join(lines)


def format_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


def answer_line(summary: StudySummary) -> str:
    """The study's answer in one line, as every command names it."""
    a = summary.answer
    if a is None:
        return "answer: none yet"
    params = ", ".join(f"{k}={number(v)}" for k, v in a.params.items()) or "the defaults"
    return (
        f"answer: {a.config} ({answer_status(summary)}): {params}; sigma "
        f"{number(summary.answer_sigma)}, accuracy_drop {number(summary.answer_accuracy_drop)} "
        f"on {summary.answer_seeds} {'held-out' if summary.answer_confirmed else 'search'} "
        f"seed(s); export re-trains trial {summary.answer_trial}"
    )


def configuration_text(summary: StudySummary) -> str:
    return format_table(configuration_table(summary.configurations))


def live_view(
    records: list[TrialRecord],
    summary: StudySummary,
    spec: StudySpec,
    now: datetime.datetime | None = None,
) -> str:
    """``kdsearch status --watch``: the budget's trials done, running and queued, the
    answer so far, each running trial's progress, and the time left."""
    count = {s: sum(r.state == s for r in records) for s in TrialState}
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    running = [r for r in records if r.state == TrialState.RUNNING]
    lines = [
        f"study {spec.name}: {done}/{spec.n_trials} trials done "
        f"({count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned), "
        f"{len(running)} running, {count[TrialState.WAITING]} queued, "
        f"{count[TrialState.FAIL]} failed (retried)",
        answer_line(summary),
    ]
    for r in running:
        lines.append(
            f"  trial {r.number} ({r.role.value}) on {r.worker_host or '?'}: {_progress(r)}"
        )
    lines.append(f"time left: {_eta(records, spec, done, len(running))}")
    return "\n".join(lines)


def _progress(r: TrialRecord) -> str:
    p = r.progress
    if p is None or not p.total:
        return f"starting ({_cell(r.elapsed_s)} s)"
    share = p.share
    text = f"{p.label} step {p.step}/{p.total} ({share:.0%})"
    if 0 < share < 1:
        text += f", about {p.elapsed_s / share - p.elapsed_s:.0f} s to go in it"
    if r.probes:
        last = r.probes[-1]
        text += f"; last probe: sigma {last.sigma:.4f}, drop {last.accuracy_drop:.4f}"
    return text


def _eta(records: list[TrialRecord], spec: StudySpec, done: int, running: int) -> str:
    """Mean finished-trial time x trials left / trials running at once (at least one)."""
    times = [r.elapsed_s for r in records if r.state == TrialState.COMPLETE and r.elapsed_s]
    left = max(spec.n_trials - done, 0)
    if left == 0:
        return "none: the budget is spent" + (" (trials still running)" if running else "")
    if not times:
        return f"unknown until a trial finishes ({left} trials left)"
    seconds = sum(times) / len(times) * left / max(running, 1)
    return f"about {_duration(seconds)} for at most {left} trials at {max(running, 1)} at a time"


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def study_finished(records: list[TrialRecord], judged: Judged, spec: StudySpec) -> bool:
    """Nothing runs or waits and the schedule has nothing left to run (the budget is spent,
    or the answer is confirmed): a watch can stop."""
    from kdsearch.service.claim import usage_of

    if any(r.state in (TrialState.RUNNING, TrialState.WAITING) for r in records):
        return False
    step = plan(judged, spec, usage_of(records))
    return not step.queue and step.new_samples <= 0
