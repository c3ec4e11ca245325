"""The ``kdsearch`` command line.

Heavy modules (torch, transformers) are imported only by the commands that need them,
so ``study create`` and ``status`` start fast and run where torch is absent.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna

from kdsearch.service.artifacts import (
    ARTIFACTS_ENV,
    CACHE_ENV,
    open_artifact_store,
    resolve_artifacts,
)
from kdsearch.service.errors import KdsearchError
from kdsearch.service.spec import TASKS
from kdsearch.service.storage import STORAGE_ENV, open_storage, redact, resolve_storage_url

logger = logging.getLogger("kdsearch")


def _storage_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage",
        metavar="URL",
        help=f"study storage (default: ${STORAGE_ENV}, else sqlite:///kdsearch.db); "
        "postgresql+psycopg2://USER@HOST/DB for many workers",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return common


def _artifact_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifacts",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="study assets and trial artifacts: a folder (one machine, or shared by all) or "
        f"an S3-compatible bucket (default: ${ARTIFACTS_ENV}, else ./kdsearch-artifacts)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"this machine's copy of the study assets (default: ${CACHE_ENV}; else "
        "ARTIFACTS/cache for a folder, ~/.cache/kdsearch for S3)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _storage_options()
    parser = argparse.ArgumentParser(
        prog="kdsearch",
        description="Hyperparameter search for confidence-preserving knowledge distillation.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    study = commands.add_parser("study", help="create or inspect studies")
    study_commands = study.add_subparsers(dest="study_command", required=True)
    create = study_commands.add_parser(
        "create", parents=[common], help="create a study from YAML, or attach to it"
    )
    create.add_argument("spec", metavar="STUDY.yaml")
    study_commands.add_parser("list", parents=[common], help="list the studies in the storage")

    worker = commands.add_parser("worker", parents=[common], help="run trials of a study")
    worker.add_argument("--study", required=True, metavar="NAME")
    _artifact_options(worker)
    worker.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    worker.add_argument(
        "--gpu",
        default="none",
        metavar="auto|none",
        help="auto: claim a free GPU of this machine for this worker (see --workers-per-gpu) "
        "and run on it; none (default): use --device",
    )
    worker.add_argument(
        "--workers-per-gpu", type=int, default=1, metavar="K", help="with --gpu auto (default 1)"
    )
    worker.add_argument(
        "--gpu-lock-dir",
        default=os.environ.get("KDSEARCH_GPU_LOCK_DIR", "/tmp/kdsearch-gpus"),
        metavar="DIR",
        help="folder shared by the workers of one machine for GPU claims "
        "(default: $KDSEARCH_GPU_LOCK_DIR, else /tmp/kdsearch-gpus)",
    )
    worker.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    worker.add_argument(
        "--max-trials", type=int, metavar="N", help="stop this worker after N trials"
    )
    worker.add_argument(
        "--storage-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to keep reconnecting to a lost database before exiting 3 (default 600)",
    )

    score = commands.add_parser(
        "score", help="confidence figures of a teacher/student pair of prediction CSVs"
    )
    score.add_argument("--teacher", required=True, metavar="T.csv", help="pred,p0,p1,...,label")
    score.add_argument("--student", required=True, metavar="S.csv", help="same rows, same order")
    score.add_argument(
        "--task", choices=TASKS, help="adds the task's GLUE metric (F1 for mrpc/qqp, MCC for cola)"
    )
    score.add_argument("--format", choices=("table", "json"), default="table")
    score.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    dashboard = commands.add_parser(
        "dashboard",
        parents=[common],
        help="optuna-dashboard on the study storage and artifact store",
    )
    dashboard.add_argument("--artifacts", metavar="DIR|s3://BUCKET/PREFIX", help="as for worker")
    dashboard.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (no auth!)")
    dashboard.add_argument("--port", type=int, default=8080)

    report = commands.add_parser(
        "report", parents=[common], help="the paper's table for one or many studies, Pareto PNGs"
    )
    report.add_argument("--study", required=True, action="append", metavar="NAME")
    report.add_argument("--format", choices=("md", "csv", "json"), default="md")
    report.add_argument(
        "--out", metavar="DIR", help="also write report.<format> and <study>-pareto.png here"
    )

    export = commands.add_parser(
        "export", parents=[common], help="a trial's student as a Hugging Face model folder"
    )
    export.add_argument("--study", required=True, metavar="NAME")
    export.add_argument(
        "--trial", type=int, metavar="N", help="default: the feasible trial with the lowest sigma"
    )
    export.add_argument("--out", required=True, metavar="DIR")
    _artifact_options(export)
    export.add_argument("--device", default="auto")

    status = commands.add_parser("status", parents=[common], help="one row per trial")
    status.add_argument("--study", required=True, metavar="NAME")
    status.add_argument("--format", choices=("table", "json"), default="table")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study_create(args: argparse.Namespace) -> int:
    from kdsearch.service.spec import load_spec
    from kdsearch.service.study import create_or_attach

    # Validate the whole spec before touching the storage: bad input writes nothing.
    spec = load_spec(args.spec)
    url = resolve_storage_url(args.storage)
    created = create_or_attach(open_storage(url), spec)
    verb = "created" if created else "attached to existing"
    logger.info("%s study %r in %s (budget %d trials)", verb, spec.name, redact(url), spec.n_trials)
    return 0


def _study_list(args: argparse.Namespace) -> int:
    from kdsearch.service.storage import study_names

    for name in study_names(open_storage(resolve_storage_url(args.storage))):
        sys.stdout.write(name + "\n")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from kdsearch.workers.gpus import claim_gpu, pin_process_to, visible_gpus

    claim = None
    device = args.device
    if args.gpu == "auto":
        # Before torch is imported: CUDA must only ever see the claimed GPU.
        claim = claim_gpu(visible_gpus(), Path(args.gpu_lock_dir), args.workers_per_gpu)
        pin_process_to(claim)
        device = "cuda"
    elif args.gpu != "none":
        raise KdsearchError(f"--gpu {args.gpu!r} is not allowed; use auto or none")

    from kdsearch.workers.worker import WorkerOptions, run_worker

    _quiet_transformers()
    options = WorkerOptions(
        storage_url=resolve_storage_url(args.storage),
        study_name=args.study,
        artifacts=resolve_artifacts(args.artifacts),
        cache_dir=args.cache_dir and Path(args.cache_dir),
        device=device,
        threads=args.threads,
        max_trials=args.max_trials,
        storage_timeout_s=args.storage_timeout,
    )
    try:
        return run_worker(options)
    finally:
        if claim is not None:
            claim.release()


def _quiet_transformers() -> None:
    """Our own logs report loading and progress; transformers' would repeat them."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard with kdsearch's storage resolution: the URL (and its password)
    comes from --storage or the environment and never shows in the process list."""
    from optuna_dashboard import run_server

    url = resolve_storage_url(args.storage)
    storage = open_storage(url)
    artifact_store = open_artifact_store(resolve_artifacts(args.artifacts))
    logger.info("dashboard on http://%s:%d for %s", args.host, args.port, redact(url))
    run_server(
        storage,
        host=args.host,
        port=args.port,
        artifact_store=artifact_store,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdsearch.service.report import (
        format_csv,
        format_json,
        format_markdown,
        pareto_png,
        summarize,
    )
    from kdsearch.service.study import load_stored_spec

    storage = open_storage(resolve_storage_url(args.storage))
    specs = [load_stored_spec(storage, name) for name in args.study]  # all known, or exit 2
    studies = [optuna.load_study(study_name=s.name, storage=storage) for s in specs]
    summaries = [summarize(study, spec) for study, spec in zip(studies, specs, strict=True)]
    formatter = {"md": format_markdown, "csv": format_csv, "json": format_json}[args.format]
    text = formatter(summaries)
    sys.stdout.write(text.rstrip("\n") + "\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"report.{args.format}").write_text(text)
        for study, spec in zip(studies, specs, strict=True):
            pareto_png(study, spec, out / f"{spec.name}-pareto.png")
        logger.info("wrote the report and %d Pareto plots to %s", len(specs), out)
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from kdsearch.workers.export import export_student

    _quiet_transformers()
    card = export_student(
        resolve_storage_url(args.storage),
        args.study,
        Path(args.out),
        resolve_artifacts(args.artifacts),
        cache_dir=args.cache_dir and Path(args.cache_dir),
        trial_number=args.trial,
        device_name=args.device,
    )
    sys.stdout.write(json.dumps(card, indent=2) + "\n")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kdsearch.service.status import format_json, format_table, trial_rows
    from kdsearch.service.study import load_stored_spec

    storage = open_storage(resolve_storage_url(args.storage))
    spec = load_stored_spec(storage, args.study)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    rows = trial_rows(study, list(spec.search_space))
    text = format_json(rows) if args.format == "json" else format_table(rows)
    sys.stdout.write(text + "\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    import json

    from kdsearch.workers.score import score_files

    figures = score_files(Path(args.teacher), Path(args.student), args.task)
    if args.format == "json":
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            shown = f"{value:.6f}" if isinstance(value, float) else str(value)
            sys.stdout.write(f"{key.ljust(width)}  {shown}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    handlers = {
        ("study", "create"): _study_create,
        ("study", "list"): _study_list,
        ("worker", None): _worker,
        ("status", None): _status,
        ("score", None): _score,
        ("dashboard", None): _dashboard,
        ("report", None): _report,
        ("export", None): _export,
    }
    handler = handlers[(args.command, getattr(args, "study_command", None))]
    try:
        return handler(args)
    except KdsearchError as exc:
        # A problem the user can fix: one clear message, no traceback.
        logger.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
