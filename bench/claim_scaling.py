"""The claim's cost as a study grows: every trial is claimed under the study's critical
section, so the time the claim holds it bounds the whole study's throughput (at most
1 / claim trials per second, however many GPUs).

For each N, a PostgreSQL study with the demo's spec (racing on: up to 3 seeds) is filled
with N synthetic finished trials (configurations of 1-3 seeds, their figures, a few
pruned and failed ones), then a warm worker process claims trials (each finished at
once, so N stays N): the first claim (a fresh process, every trial read) and the median
of the next ones under the lock (stale check, halting, the schedule, the take, the first
beat), the ceiling it implies, and the time of ``kdsearch status`` and ``kdsearch report``
(fresh processes, Python's start-up included).

    .venv/bin/python bench/claim_scaling.py --sizes 100 1000 3000 10000

``--keep`` leaves the filled studies (``bench-claim-N-XXXXXX``) for
``bench/status_phases.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdsearch.service import claim as claim_module  # noqa: E402
from kdsearch.service.claim import StudyView, claim_trial  # noqa: E402
from kdsearch.service.loading import load_spec  # noqa: E402
from kdsearch.service.record import (  # noqa: E402
    StudyAttr,
    SystemAttr,
    TeacherFigures,
    TrialOutcome,
    placement_attrs,
    set_study_attr,
)
from kdsearch.service.sampler import constraint_values  # noqa: E402
from kdsearch.service.storage import open_storage  # noqa: E402
from kdsearch.service.study import create_or_attach  # noqa: E402
from kdsearch.service.trial_config import Role, config_id, replicate_seed  # noqa: E402

logger = logging.getLogger("bench.claim")

OUTCOME = {name: 0.0 for name in TrialOutcome.REQUIRED} | {
    "epoch_losses": [0.5, 0.4, 0.3],
    "train_sigma_per_class": [0.05],
    "dev_sigma_per_class": [0.05],
    "dev_n_total": 872,
    "train_n_total": 3000,
    "teacher_dev_accuracy": 0.84,
}


def synthetic_trials(spec, n: int, rng: random.Random) -> list:  # type: ignore[no-untyped-def]
    """N finished trials: configurations with 1-3 seeds, as racing leaves them."""
    space = spec.search_space
    distributions: dict = {}
    for name, p in space.items():
        if p.type == "categorical":
            distributions[name] = CategoricalDistribution(tuple(p.choices))
        elif p.type == "int":
            distributions[name] = IntDistribution(p.low, p.high)
        else:
            distributions[name] = FloatDistribution(p.low, p.high, log=bool(p.log))

    def draw() -> dict:
        out = {}
        for name, d in distributions.items():
            if isinstance(d, CategoricalDistribution):
                out[name] = rng.choice(d.choices)
            elif isinstance(d, IntDistribution):
                out[name] = rng.randint(d.low, d.high)
            elif d.log:
                out[name] = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
            else:
                out[name] = rng.uniform(d.low, d.high)
        return out

    trials = []
    start = datetime.datetime(2026, 1, 1)
    while len(trials) < n:
        params = draw()
        config, mean = config_id(params), rng.uniform(0.035, 0.09)
        for k in range(min(rng.choice([1, 1, 2, 3]), n - len(trials))):
            sigma, accuracy = max(rng.gauss(mean, 0.002), 0.001), rng.gauss(0.78, 0.005)
            drop = 0.84 - accuracy
            state = rng.choices(
                [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], [0.9, 0.07, 0.03]
            )[0]
            attrs = placement_attrs(config, k, replicate_seed(spec.seed, k), Role.SEARCH)
            system = {}
            if state != TrialState.FAIL:
                outcome = {
                    **OUTCOME,
                    "sigma": sigma,
                    "accuracy_drop": drop,
                    "student_dev_accuracy": accuracy,
                }
                attrs.update(TrialOutcome(**outcome).attrs())
                constraints = constraint_values(sigma, drop, spec.thresholds)
                system = {SystemAttr.CONSTRAINT_PREFIX + k: v for k, v in constraints.items()}
            else:
                attrs["kdsearch:failure"] = "exception"
                attrs["kdsearch:error"] = "RuntimeError: synthetic"
            done = start + datetime.timedelta(seconds=len(trials))
            trials.append(
                create_trial(
                    state=state,
                    values=[sigma, drop] if state == TrialState.COMPLETE else None,
                    params=params,
                    distributions=distributions,
                    user_attrs=attrs,
                    system_attrs=system,
                    intermediate_values={},
                )
            )
            trials[-1].datetime_start = done - datetime.timedelta(seconds=60)
            trials[-1].datetime_complete = done
    return trials


def bulk_insert(storage, study_id: int, trials: list) -> None:  # type: ignore[no-untyped-def]
    """The trials written in one transaction through Optuna's own tables (``add_trials``
    commits each trial alone: 10,000 of them would take a quarter of an hour)."""
    import json

    import sqlalchemy
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    engine = storage.engine
    with engine.begin() as conn:
        first = conn.execute(
            sqlalchemy.select(sqlalchemy.func.count()).select_from(models.TrialModel.__table__)
            .where(models.TrialModel.__table__.c.study_id == study_id)
        ).scalar_one()  # fmt: skip
        rows = [
            {"number": first + i, "study_id": study_id, "state": t.state.name,
             "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete}
            for i, t in enumerate(trials)
        ]  # fmt: skip
        ids = conn.execute(
            models.TrialModel.__table__.insert().returning(models.TrialModel.__table__.c.trial_id),
            rows,
        ).scalars().all()  # fmt: skip
        params, values, user, system = [], [], [], []
        for trial_id, t in zip(ids, trials, strict=True):
            for name, value in t.params.items():
                dist = t.distributions[name]
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": dist.to_internal_repr(value),
                               "distribution_json": distribution_to_json(dist)})  # fmt: skip
            for k, v in enumerate(t.values or []):
                values.append({"trial_id": trial_id, "objective": k, "value": v,
                               "value_type": "FINITE"})  # fmt: skip
            user += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                     for k, v in t.user_attrs.items()]  # fmt: skip
            system += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                       for k, v in t.system_attrs.items()]  # fmt: skip
        for model, batch in (
            (models.TrialParamModel, params), (models.TrialValueModel, values),
            (models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system),
        ):  # fmt: skip
            if batch:
                conn.execute(model.__table__.insert(), batch)


class LockTimer:
    """Wraps ``claim.critical_section``: the seconds each claim holds the study's lock."""

    def __init__(self) -> None:
        self.held: list[float] = []
        self._original = claim_module.critical_section

    @contextlib.contextmanager
    def __call__(self, *args: object, **kwargs: object) -> Iterator[bool]:
        with self._original(*args, **kwargs) as held:
            start = time.perf_counter()
            try:
                yield held
            finally:
                self.held.append(time.perf_counter() - start)


def timed_cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdsearch", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def measure(url: str, n: int, claims: int, keep: bool = False) -> dict[str, float]:
    spec = load_spec(ROOT / "studies" / "demo-sst2.yaml")
    name = f"bench-claim-{n}-{uuid.uuid4().hex[:6]}"
    # room to race: the schedule queues seeds and samples, as in a study under way
    spec = spec.model_copy(update={"name": name, "n_trials": 2 * n + claims})
    storage = open_storage(url)
    create_or_attach(storage, spec)
    study = optuna.load_study(study_name=name, storage=storage)
    set_study_attr(study, StudyAttr.TEACHER, TeacherFigures(0.84, 0.9, 872).as_dict())
    start = time.perf_counter()
    bulk_insert(storage, study._study_id, synthetic_trials(spec, n, random.Random(n)))
    fill = time.perf_counter() - start
    # A warm worker: its own storage and view, as `kdsearch worker` has.
    worker_storage = open_storage(url, heartbeat_interval_s=60, grace_period_s=600)
    view = StudyView(optuna.load_study(study_name=name, storage=worker_storage))
    timer = LockTimer()
    claim_module.critical_section = timer  # type: ignore[assignment]
    walls = []
    try:
        for _ in range(claims + 1):
            start = time.perf_counter()
            claimed = claim_trial(view, spec, worker_storage, "fp32")
            walls.append(time.perf_counter() - start)
            assert not isinstance(claimed, claim_module.Claim), claimed
            # finished at once, with figures (the first claim takes the queued baseline)
            figures = {"sigma": 0.06, "accuracy_drop": 0.0, "student_dev_accuracy": 0.78}
            outcome = TrialOutcome(**{**OUTCOME, **figures}).attrs()
            worker_storage.set_trial_user_attrs(claimed.trial._trial_id, outcome)
            view.study.tell(claimed.trial, [0.06, 0.0])
    finally:
        claim_module.critical_section = timer._original  # type: ignore[assignment]
    held = timer.held[1:]
    out = {
        "fill_s": fill,
        "first_s": timer.held[0],
        "median_s": statistics.median(held),
        "wall_s": statistics.median(walls[1:]),
        "status_s": timed_cli("status", "--study", name, "--storage", url),
        "report_s": timed_cli("report", "--study", name, "--storage", url),
    }
    if keep:  # for bench/status_phases.py, or timing `kdsearch status` by hand
        logger.info("kept study %s", name)
    else:
        optuna.delete_study(study_name=name, storage=storage)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 3000, 10000])
    parser.add_argument("--claims", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="leave the filled studies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kdsearch").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = [
        "| finished trials | first claim (fresh process) | claim under the lock (median) | "
        "ceiling for the whole study | claim + sampling (median) | `status` | `report` |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        m = measure(args.storage, n, args.claims, args.keep)
        rows.append(
            f"| {n:,} | {m['first_s']:.3f} s | {1000 * m['median_s']:.1f} ms | "
            f"{1 / m['median_s']:.0f} trials/s | {m['wall_s']:.3f} s | {m['status_s']:.1f} s | "
            f"{m['report_s']:.1f} s |"
        )
        logger.info("%s   (filled in %.0f s)", rows[-1], m["fill_s"])
    logger.info("\n".join(rows))


if __name__ == "__main__":
    main()
