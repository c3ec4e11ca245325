"""Where ``kdsearch status`` spends its time on a large study: the command's steps timed
one by one in a fresh process (imports included), and each one's share of the whole.

    .venv/bin/python bench/claim_scaling.py --sizes 10000 --keep   # prints the study's name
    .venv/bin/python bench/status_phases.py --study bench-claim-10000-XXXXXX
"""

from __future__ import annotations

import gc
import time

START = time.perf_counter()
gc.disable()  # as `kdsearch status` runs (cli.main pauses the collector)

import argparse  # noqa: E402
import logging  # noqa: E402

import optuna  # noqa: E402

from kdsearch.service.artifacts import recorded_locations  # noqa: E402
from kdsearch.service.recovery import halted_reason  # noqa: E402
from kdsearch.service.status import configuration_text, format_table, trial_rows  # noqa: E402
from kdsearch.service.storage import open_storage  # noqa: E402
from kdsearch.service.study import load_stored_spec  # noqa: E402
from kdsearch.service.summary import judge_study, read_records, summarize  # noqa: E402

logger = logging.getLogger("bench.status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    phases: list[tuple[str, float]] = [("imports", time.perf_counter() - START)]
    last = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases.append((name, now - last))
        last = now

    storage = open_storage(args.storage, create=False)
    spec = load_stored_spec(storage, args.study)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    mark("connecting, the spec")
    records = read_records(study)
    mark(f"reading {len(records):,} trials")
    summary = summarize(records, spec, judge_study(records, spec, study))
    mark("judging, summarising")
    configuration_text(summary) + format_table(trial_rows(records, spec))
    recorded_locations(storage)
    halted_reason(storage, spec.name)
    mark("tables, footer")
    total = sum(s for _, s in phases)
    for name, seconds in phases:
        logger.info("%-24s %6.0f ms  %3.0f%%", name, 1000 * seconds, 100 * seconds / total)
    logger.info("%-24s %6.0f ms", "total (before exit)", 1000 * total)


if __name__ == "__main__":
    main()
