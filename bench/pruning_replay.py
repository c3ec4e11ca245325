"""What would pruning have bought? Replay the rules over studies run without pruning.

Every trial records a probe after each epoch whatever the rule, so a study run with
``pruning.rule: none`` holds full histories. For each rule this replays the trials in
order (the Pareto rule sees only trials finished before), and reports the training
epochs and wall time it would have saved, against the same study run to the end, and
the trials it would have wrongly pruned (feasible, or on the final Pareto front).

    .venv/bin/python bench/pruning_replay.py --storage sqlite:///experiments/out/experiment.db \
        --study exp-sst2-s1l --study exp-sst2-s2l ...
"""

from __future__ import annotations

import argparse
import logging

import optuna
from optuna.trial import TrialState

from kdsearch.service.pruning import ProbePoint, should_prune
from kdsearch.service.record import TrialRecord
from kdsearch.service.report import pareto_front
from kdsearch.service.spec import PruningSpec, StudySpec
from kdsearch.service.storage import open_storage
from kdsearch.service.study import load_stored_spec

RULES = {
    "threshold (default)": PruningSpec(rule="threshold"),
    "threshold, no tolerance": PruningSpec(
        rule="threshold", sigma_tolerance=0, accuracy_drop_tolerance=0
    ),
    "pareto k=3": PruningSpec(rule="pareto", pareto_min_trials=3),
    "pareto k=2": PruningSpec(rule="pareto", pareto_min_trials=2),
    "threshold+pareto k=3": PruningSpec(rule="threshold+pareto", pareto_min_trials=3),
}


def replay(spec: StudySpec, trials: list[TrialRecord], rule: PruningSpec) -> dict[str, float]:
    front = pareto_front(trials)
    finished: list[list[ProbePoint]] = []
    out = {"pruned": 0, "epochs": 0, "epochs_saved": 0, "time": 0.0, "time_saved": 0.0,
           "feasible_pruned": 0, "front_pruned": 0}  # fmt: skip
    for trial in trials:
        assert trial.hyperparameters is not None and trial.outcome is not None
        points = trial.probes
        epochs = trial.hyperparameters["epochs"]
        wall = trial.outcome.wall_time_s
        out["epochs"] += epochs
        out["time"] += wall
        for i in range(len(points)):
            if should_prune(points[: i + 1], finished, spec.thresholds, rule):
                saved = epochs - points[i].epoch
                out["pruned"] += 1
                out["epochs_saved"] += saved
                # epochs cost about the same; the final full-train evaluation is saved too
                out["time_saved"] += wall * saved / epochs
                out["feasible_pruned"] += bool(trial.feasible)
                out["front_pruned"] += trial.number in front
                break
        finished.append(points)  # the rule only sees trials that ran before
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", action="append", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(args.storage)
    totals = {name: None for name in RULES}
    n_trials = n_feasible = 0
    for name in args.study:
        spec = load_stored_spec(storage, name)
        study = optuna.load_study(study_name=name, storage=storage)
        records = [TrialRecord.of(t) for t in study.trials]
        trials = [t for t in records if t.state == TrialState.COMPLETE and t.probes]
        n_trials += len(trials)
        n_feasible += sum(bool(t.feasible) for t in trials)
        for rule_name, rule in RULES.items():
            result = replay(spec, trials, rule)
            acc = totals[rule_name]
            totals[rule_name] = (
                result if acc is None else {k: acc[k] + v for k, v in result.items()}
            )
    lines = [
        f"{n_trials} finished trials ({n_feasible} feasible) in {len(args.study)} studies, run "
        "without pruning; the replay is measured against them.",
        "",
        "| rule | trials pruned | epochs saved | wall time saved | feasible pruned | "
        "Pareto-front trials pruned |",
        "|---|---|---|---|---|---|",
    ]
    for rule_name, r in totals.items():
        assert r is not None
        lines.append(
            f"| {rule_name} | {r['pruned']} / {n_trials} | {r['epochs_saved']} / {r['epochs']} "
            f"({r['epochs_saved'] / max(1, r['epochs']):.0%}) | {r['time_saved']:.0f} s / "
            f"{r['time']:.0f} s ({r['time_saved'] / max(1e-9, r['time']):.0%}) | "
            f"{r['feasible_pruned']} | {r['front_pruned']} |"
        )
    logging.getLogger("bench").info("\n".join(lines))


if __name__ == "__main__":
    main()
