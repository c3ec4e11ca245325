"""``kdsearch status``: one row per trial, as a table or JSON."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import optuna
from kdsearch.service.study import BASELINE_ATTR, is_feasible
from optuna.trial import FrozenTrial


def trial_rows(study: optuna.Study, param_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "baseline": bool(t.user_attrs.get(BASELINE_ATTR)),
                **{name: t.params.get(name) for name in param_names},
                "sigma": t.values[0] if t.values else None,
                "accuracy_drop": t.values[1] if t.values else None,
                "feasible": is_feasible(t),
                "host": t.user_attrs.get("worker_host"),
                "elapsed_s": _elapsed(t, now),
            }
        )
    return rows


def _elapsed(trial: FrozenTrial, now: datetime.datetime) -> float | None:
    if trial.datetime_start is None:
        return None
    end = trial.datetime_complete or now
    return round((end - trial.datetime_start).total_seconds(), 1)


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
