"""Pruning for two objectives, from each trial's probe history.

Optuna cannot prune multi-objective studies (``trial.report`` / ``should_prune`` raise),
so kdsearch records a cheap probe after every epoch, and every ``probe_every_steps``
steps when set (sigma on a fixed train subset, accuracy_drop on dev), and decides here.
A probe's ``epoch`` is the training done so far in epochs: 2.0 after the second epoch,
1.25 a quarter into the second. Both rules are pure functions of histories: no
database, no clock.

Neither rule prunes during the ``warmup_epochs`` nor at the last epoch: by then the
training is paid for, and the finished trial is more useful (its constraints mark it
infeasible) than a pruned one.

**Threshold rule** (the mission's): after ``warmup_epochs``, prune when the probe exceeds
a threshold plus a slack that is full up to the end of the first epoch after the warm-up
and then shrinks linearly to zero at the last epoch::

    progress = epoch / epochs                      (in (0, 1])
    p0       = (warmup_epochs + 1) / epochs        the first epoch-end decision
    slack    = clip(1 - (progress - p0) / (1 - p0), 0, 1)
    prune if sigma > sigma_max * (1 + sigma_tolerance * slack)
          or drop  > accuracy_drop_max + accuracy_drop_tolerance * slack

Why the slack: early in training the student is still moving (sigma usually falls and
accuracy rises over the epochs, and the learning-rate warmup delays both), so an early
probe over the threshold is weak evidence; at the last epoch the probe is the trial's
result up to the probe's sampling noise, and the threshold is applied as is.

**Pareto rule** (ours): prune when at least ``pareto_min_trials`` finished trials had,
at the same epoch, a probe point better by ``pareto_margin`` in *both* objectives. Those
trials were already ahead at this point of training and ended up finished, so the
current trial is unlikely to reach the front. It compares like with like (same epoch;
epoch ends only, since step probes fall at different points for different batch
sizes), but trials with more epochs have a slower lr decay at a given epoch, so it can
prune a late bloomer: it is off by default (``rule: threshold``).
"""

from __future__ import annotations

from collections.abc import Sequence

from kdsearch.service.record import ProbePoint
from kdsearch.service.spec import PruningSpec, Thresholds

__all__ = ["ProbePoint", "pareto_prune", "should_prune", "threshold_prune"]


def _decides(history: Sequence[ProbePoint], pruning: PruningSpec) -> bool:
    """Only between the warm-up and the last epoch."""
    return bool(history) and pruning.warmup_epochs < history[-1].epoch < history[-1].epochs


def threshold_prune(
    history: Sequence[ProbePoint], thresholds: Thresholds, pruning: PruningSpec
) -> bool:
    if not _decides(history, pruning):
        return False
    last = history[-1]
    first_decision = (pruning.warmup_epochs + 1) / last.epochs
    if first_decision >= 1.0:  # only step probes decide (before the last epoch ends)
        slack = 1.0
    else:
        slack = 1.0 - (last.progress - first_decision) / (1.0 - first_decision)
        slack = min(1.0, max(0.0, slack))
    sigma_limit = thresholds.sigma_max * (1.0 + pruning.sigma_tolerance * slack)
    drop_limit = thresholds.accuracy_drop_max + pruning.accuracy_drop_tolerance * slack
    # NaN sigma (no input right for both models) compares False: never pruned on it alone.
    return last.sigma > sigma_limit or last.accuracy_drop > drop_limit


def pareto_prune(
    history: Sequence[ProbePoint],
    finished_histories: Sequence[Sequence[ProbePoint]],
    pruning: PruningSpec,
) -> bool:
    if not _decides(history, pruning) or not history[-1].at_epoch_end:
        return False
    last = history[-1]
    margin = pruning.pareto_margin
    dominating = 0
    for other in finished_histories:
        same_epoch = [p for p in other if p.epoch == last.epoch]
        if not same_epoch:
            continue
        point = same_epoch[-1]
        if (
            point.sigma + margin <= last.sigma
            and point.accuracy_drop + margin <= last.accuracy_drop
        ):
            dominating += 1
    return dominating >= pruning.pareto_min_trials


def should_prune(
    history: Sequence[ProbePoint],
    finished_histories: Sequence[Sequence[ProbePoint]],
    thresholds: Thresholds,
    pruning: PruningSpec,
) -> str | None:
    """The name of the rule that prunes this trial now, or None to continue."""
    rules = pruning.rule.split("+")
    if "threshold" in rules and threshold_prune(history, thresholds, pruning):
        return "threshold"
    if "pareto" in rules and pareto_prune(history, finished_histories, pruning):
        return "pareto"
    return None
