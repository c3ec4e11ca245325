"""The sampler: which hyperparameters a new trial tries, and what it learns from a finished one.

Samplers are not stored with a study: every worker builds the same one from the spec.
Each trial's draw is seeded from the study's seed and the trial's number
(``sampler_seed``), so one worker replays a study exactly (the same configurations, in the
same order, on every run), while several workers, which claim different trial numbers,
never replay each other's random start-up points (optuna#4714).

Constraints are part of the trial (Optuna 5's ``trial.set_constraint``): ``sigma - kappa``
and ``accuracy_drop - accuracy_drop_max``, <= 0 feasible, recorded on every finished or
pruned trial before it is told (``record_constraints``). Every sampler reads them from
the trials: TPE and NSGA-II rank infeasible trials below feasible ones, GP models them
(its feasibility term), random ignores them.
"""

from __future__ import annotations

from typing import Any

import optuna

from kdsearch.service.hashing import stable_int
from kdsearch.service.record import OBJECTIVES
from kdsearch.service.spec import CategoricalParam, FloatParam, StudySpec, Thresholds


def sampler_seed(spec: StudySpec, trial_number: int) -> int:
    """The seed of trial ``trial_number``'s draw."""
    seed = spec.seed if spec.sampler.seed is None else spec.sampler.seed
    return stable_int([seed, "sampler", trial_number], bits=32)


def build_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded."""
    config = spec.sampler
    if config.name == "tpe":
        # multivariate: the stage-2 hyperparameters interact (lr x epochs x batch size);
        # constant_liar: parallel workers' running trials count as pending, so two workers
        # do not sample next to each other.
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=config.n_startup_trials,
            multivariate=True,
            constant_liar=True,
        )
    if config.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if config.name == "gp":
        # GPSampler models each objective and each constraint with a Gaussian process and
        # chooses by constrained expected hypervolume improvement (logEHVI); running trials
        # enter as pending points, so parallel workers spread out. Not deterministic:
        # seeds make sigma noisy, and each replicate is one noisy observation.
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=config.n_startup_trials, deterministic_objective=False
        )
    return optuna.samplers.RandomSampler(seed=seed)


def reseed(study: optuna.Study, spec: StudySpec, trial_number: int) -> None:
    """Give ``study`` the sampler for trial ``trial_number``'s draw (before the trial is
    made: Optuna calls the sampler's ``before_trial`` then)."""
    study.sampler = build_sampler(spec, sampler_seed(spec, trial_number))


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Draw (or, for an enqueued trial, read back) every searched hyperparameter."""
    for name, param in spec.search_space.items():
        if isinstance(param, CategoricalParam):
            trial.suggest_categorical(name, param.choices)
        elif isinstance(param, FloatParam):
            trial.suggest_float(name, param.low, param.high, log=param.log)
        else:
            trial.suggest_int(name, param.low, param.high, log=param.log)
    return trial.params


def constraint_values(sigma: float, drop: float, thresholds: Thresholds) -> dict[str, float]:
    """The trial's constraints by objective name: <= 0 feasible; an undefined (NaN or
    infinite) sigma is infeasible by a wide margin (Optuna refuses NaN constraints)."""
    finite_sigma = sigma if sigma == sigma and sigma != float("inf") else 1e9
    values = (finite_sigma - thresholds.sigma_max, drop - thresholds.accuracy_drop_max)
    return dict(zip(OBJECTIVES, values, strict=True))


def record_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """Record the constraints through the trial (``constraints:<objective>``)."""
    for key, value in values.items():
        trial.set_constraint(key, value)
