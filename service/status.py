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
