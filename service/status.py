"""``kdsearch status``: one row per trial, as a table or JSON."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import optuna

from kdsearch.service.racing import aggregate
from kdsearch.service.record import TrialRecord
from kdsearch.service.spec import StudySpec


def trial_rows(study: optuna.Study, param_names: list[str]) -> list[dict[str, Any]]:
    """One row per trial; a queued trial (the baseline, a retry) shows the hyperparameters
    it will run with."""
    now = datetime.datetime.now()
    rows = []
    for t in study.get_trials(deepcopy=False):
        r = TrialRecord.of(t, now)
        rows.append(
            {
                "trial": r.number,
                "state": r.state.name,
                "baseline": r.baseline,
                **{name: r.params.get(name) for name in param_names},
                "sigma": r.sigma,
                "accuracy_drop": r.accuracy_drop,
                "feasible": r.feasible,
                "host": r.worker_host,
                "elapsed_s": r.elapsed_s,
            }
        )
    return rows


def configuration_table(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """One row per configuration: its hyperparameters, seeds, sigma and accuracy drop as
    mean ± sd [confidence bounds], and the verdict."""
    from kdsearch.service.report import compact_row, configuration_rows

    records = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    return [compact_row(r) for r in configuration_rows(aggregate(records, spec), spec)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6f}" if abs(value) < 1 else f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    headers = list(rows[0])
    cells = [[_cell(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def format_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


def live_view(study: optuna.Study, spec: StudySpec, now: datetime.datetime | None = None) -> str:
    """``kdsearch status --watch``: the budget's trials done, running and queued, the best
    feasible configuration so far, each running trial's progress, and the time left."""
    from optuna.trial import TrialState

    from kdsearch.service.racing import best_configuration

    now = now or datetime.datetime.now()
    records = [TrialRecord.of(t, now) for t in study.get_trials(deepcopy=False)]
    count = {s: sum(r.state == s for r in records) for s in TrialState}
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    running = [r for r in records if r.state == TrialState.RUNNING]
    lines = [
        f"study {spec.name}: {done}/{spec.n_trials} trials done "
        f"({count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned), "
        f"{len(running)} running, {count[TrialState.WAITING]} queued, "
        f"{count[TrialState.FAIL]} failed (retried)"
    ]
    best = best_configuration(aggregate(records, spec))
    if best is None:
        lines.append("best feasible: none yet")
    else:
        params = ", ".join(f"{k}={_cell(v)}" for k, v in best.params.items())
        lines.append(
            f"best feasible: {params}: sigma {best.sigma_mean:.4f}, accuracy_drop "
            f"{best.drop_mean:.4f} ({best.n} seed{'s' if best.n > 1 else ''}, trials "
            f"{', '.join(map(str, best.trials))})"
        )
    for r in running:
        lines.append(f"  trial {r.number} on {r.worker_host or '?'}: {_progress(r)}")
    lines.append(f"time left: {_eta(records, spec, done, len(running))}")
    return "\n".join(lines)


def _progress(r: TrialRecord) -> str:
    p = r.progress
    if not p or not p.get("total"):
        return f"starting ({_cell(r.elapsed_s)} s)"
    share = p["step"] / p["total"]
    text = f"{p['label']} step {p['step']}/{p['total']} ({share:.0%})"
    if 0 < share < 1:
        text += f", about {p['elapsed_s'] / share - p['elapsed_s']:.0f} s to go in it"
    if r.probes:
        last = r.probes[-1]
        text += f"; last probe: sigma {last.sigma:.4f}, drop {last.accuracy_drop:.4f}"
    return text


def _eta(records: list[TrialRecord], spec: StudySpec, done: int, running: int) -> str:
    """Mean finished-trial time x trials left / trials running at once (at least one)."""
    from optuna.trial import TrialState

    times = [r.elapsed_s for r in records if r.state == TrialState.COMPLETE and r.elapsed_s]
    left = max(spec.n_trials - done, 0)
    if left == 0:
        return "none: the budget is spent" + (" (trials still running)" if running else "")
    if not times:
        return f"unknown until a trial finishes ({left} trials left)"
    seconds = sum(times) / len(times) * left / max(running, 1)
    return f"about {_duration(seconds)} for {left} trials at {max(running, 1)} at a time"


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def study_finished(study: optuna.Study, spec: StudySpec) -> bool:
    """The budget is spent and nothing runs or waits: a watch can stop."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return done >= spec.n_trials and not busy
