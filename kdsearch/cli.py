"""The ``kdsearch`` command line.

Only the standard library is imported at start; each command imports what it needs, so
``study create`` and ``status`` start fast and run where torch is absent, and a stop
signal during start-up exits cleanly. Errors the user can fix are printed as one
``kdsearch: error: ...`` line (no traceback) with the exit code of ``kdsearch.service.errors``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from kdsearch import __version__

logger = logging.getLogger("kdsearch")

STORAGE_HELP = (
    "study storage URL (default: $KDSEARCH_STORAGE, else sqlite:///kdsearch.db in the working "
    "folder); postgresql+psycopg2://USER@HOST:5432/DB for many workers"
)
STUDY_HELP = "the study's name (as in its YAML's name:; `kdsearch study list` shows them)"
ARTIFACTS_HELP = (
    "study assets and trial artifacts: a folder (one machine, or shared by all) or "
    "s3://BUCKET/PREFIX (default: $KDSEARCH_ARTIFACTS, else the location the study recorded, "
    "else ./kdsearch-artifacts)"
)
CACHE_HELP = (
    "this machine's copy of the study assets (default: $KDSEARCH_CACHE; else ARTIFACTS/cache "
    "for a folder, ~/.cache/kdsearch for S3)"
)


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options accepted before or after the subcommand: on the top-level parser with their
    defaults, on each subcommand with SUPPRESS so they never overwrite a value given first."""
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--storage", metavar="URL", default=default(None), help=STORAGE_HELP)
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="debug logging"
    )


def _command(
    commands: argparse._SubParsersAction, name: str, help: str, example: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, top=False)
    return parser


def _artifact_options(parser: argparse.ArgumentParser, cache: bool = True) -> None:
    parser.add_argument("--artifacts", metavar="DIR|s3://BUCKET/PREFIX", help=ARTIFACTS_HELP)
    if cache:
        parser.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdsearch",
        description="Hyperparameter search for confidence-preserving knowledge distillation "
        "(arXiv 2401.11365), as an Optuna study in PostgreSQL.",
        epilog="exit codes: 0 done, 1 trials kept failing, 2 bad input or usage, "
        "3 storage unreachable, 4 artifact store or local folder unusable",
    )
    parser.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    study = commands.add_parser("study", help="create or list studies")
    study_commands = study.add_subparsers(dest="study_command", required=True, metavar="COMMAND")
    create = _command(
        study_commands,
        "create",
        "create a study from its YAML, or attach to it if it exists with the same spec",
        "kdsearch study create studies/demo-sst2.yaml --storage postgresql+psycopg2://kd@db/kd",
    )
    create.add_argument("spec", metavar="STUDY.yaml", help="the study spec (studies/*.yaml)")
    create.add_argument(
        "--artifacts",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="record where the study's workers keep artifacts (default: $KDSEARCH_ARTIFACTS; "
        "unset: the first worker records its own)",
    )
    _command(study_commands, "list", "list the studies in the storage", "kdsearch study list")
    unhalt = _command(
        study_commands,
        "unhalt",
        "clear a study's halt (set when trials kept failing) once the cause is fixed",
        "kdsearch study unhalt demo-sst2",
    )
    unhalt.add_argument("name", metavar="NAME", help=STUDY_HELP)
    _command(
        study_commands,
        "schema",
        "print the JSON Schema of study YAMLs (for editors; studies/study-spec.schema.json)",
        "kdsearch study schema > studies/study-spec.schema.json",
    )

    worker = _command(
        commands,
        "worker",
        "run trials of a study until its global budget is spent",
        "kdsearch worker --study demo-sst2 --gpu auto",
    )
    worker.add_argument("--study", required=True, metavar="NAME", help=STUDY_HELP)
    _artifact_options(worker)
    worker.add_argument(
        "--device", default="auto", help="auto (default: a GPU if visible), cpu, cuda or cuda:N"
    )
    worker.add_argument(
        "--gpu",
        default="none",
        choices=("auto", "none"),
        help="auto: claim a free GPU of this machine for this worker (see --workers-per-gpu) "
        "and run on it; none (default): use --device",
    )
    worker.add_argument(
        "--workers-per-gpu",
        type=_positive_int,
        default=1,
        metavar="K",
        help="with --gpu auto: workers sharing each GPU (default 1)",
    )
    worker.add_argument(
        "--gpu-lock-dir",
        default=os.environ.get("KDSEARCH_GPU_LOCK_DIR", "/tmp/kdsearch-gpus"),
        metavar="DIR",
        help="folder shared by the workers of one machine for GPU claims "
        "(default: $KDSEARCH_GPU_LOCK_DIR, else /tmp/kdsearch-gpus)",
    )
    worker.add_argument(
        "--threads", type=_positive_int, metavar="N", help="CPU threads for torch (default: all)"
    )
    worker.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="training precision on this worker (default: the study's training.precision; "
        "auto: bf16 where the hardware has it)",
    )
    worker.add_argument(
        "--mlflow",
        metavar="URI",
        default=os.environ.get("KDSEARCH_MLFLOW"),
        help="also log each trial to this MLflow tracking URI (sqlite:///mlflow.db, "
        "http://host:5000); default: $KDSEARCH_MLFLOW, else the "
        "study's tracking.mlflow",
    )
    worker.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=os.environ.get("KDSEARCH_TENSORBOARD"),
        help="also log each trial to this TensorBoard folder; default: "
        "$KDSEARCH_TENSORBOARD, else the study's tracking.tensorboard",
    )
    worker.add_argument(
        "--max-trials", type=_positive_int, metavar="N", help="stop this worker after N trials"
    )
    worker.add_argument(
        "--storage-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="how long to keep reconnecting to a lost database before exiting 3 (default 600)",
    )

    status = _command(
        commands, "status", "one row per trial of a study", "kdsearch status --study demo-sst2"
    )
    status.add_argument("--study", required=True, metavar="NAME", help=STUDY_HELP)
    status.add_argument(
        "--format", choices=("table", "json"), default="table", help="table (default) or json"
    )
    status.add_argument(
        "--watch",
        nargs="?",
        const=5.0,
        type=_positive_float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 5): trials done, running and queued, the best "
        "feasible so far, each running trial's progress, the time left; stops when the "
        "budget is spent or the study halts (Ctrl-C to leave earlier)",
    )
    status.add_argument(
        "--configurations",
        action="store_true",
        help="one row per configuration (mean over its seeds, bounds, verdict) instead of per "
        "trial; the table shows both when the study has seed replicates",
    )

    report = _command(
        commands,
        "report",
        "the paper's table for one or more studies, with Pareto plots",
        "kdsearch report --study rte-s6l --study mrpc-s6l --format md --out report/",
    )
    report.add_argument(
        "--study", required=True, action="append", metavar="NAME", help=STUDY_HELP + "; repeat"
    )
    report.add_argument(
        "--format", choices=("md", "csv", "json"), default="md", help="md (default), csv or json"
    )
    report.add_argument(
        "--out", metavar="DIR", help="also write report.<format> and <study>-pareto.png here"
    )

    export = _command(
        commands,
        "export",
        "re-train a trial's student and save it as a Hugging Face model folder",
        "kdsearch export --study demo-sst2 --out students/demo",
    )
    export.add_argument("--study", required=True, metavar="NAME", help=STUDY_HELP)
    export.add_argument(
        "--trial",
        type=_non_negative_int,
        metavar="N",
        help="the trial to export (default: the feasible trial with the lowest sigma)",
    )
    export.add_argument(
        "--out", required=True, metavar="DIR", help="a new or empty folder for the model"
    )
    _artifact_options(export)
    export.add_argument(
        "--device", default="auto", help="auto (default: a GPU if visible), cpu, cuda or cuda:N"
    )

    dashboard = _command(
        commands,
        "dashboard",
        "optuna-dashboard on the study storage, with each study's artifacts",
        "kdsearch dashboard --port 8080",
    )
    _artifact_options(dashboard, cache=False)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: no auth!)"
    )
    dashboard.add_argument(
        "--port", type=_port, default=8080, help="port to listen on (default 8080)"
    )

    score = _command(
        commands,
        "score",
        "confidence figures of a teacher/student pair of prediction CSVs",
        "kdsearch score --teacher teacher_train.csv --student student_train.csv --task mrpc",
    )
    score.add_argument(
        "--teacher", required=True, metavar="T.csv", help="teacher predictions: pred,p0,p1,label"
    )
    score.add_argument(
        "--student", required=True, metavar="S.csv", help="student predictions, same rows"
    )
    score.add_argument(
        "--task", metavar="TASK", help="adds the task's metric (F1 for mrpc/qqp, MCC for cola)"
    )
    score.add_argument(
        "--format", choices=("table", "json"), default="table", help="table (default) or json"
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a trial number (0, 1, 2, ...)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a trial number (0, 1, 2, ...)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive, finite number of seconds")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _explicit_artifacts(args: argparse.Namespace) -> str | None:
    from kdsearch.service.artifacts import explicit_artifacts

    return explicit_artifacts(getattr(args, "artifacts", None))


def _study_create(args: argparse.Namespace) -> int:
    from kdsearch.service.artifacts import resolve_artifacts
    from kdsearch.service.spec import load_spec
    from kdsearch.service.storage import open_storage, redact, resolve_storage_url
    from kdsearch.service.study import create_or_attach

    # Validate the whole spec (and the location) before touching the storage: bad input
    # writes nothing.
    spec = load_spec(args.spec)
    from kdsearch.workers.preflight import require_study_inputs

    require_study_inputs(spec, args.spec)  # data and model files, before anything is stored
    explicit = _explicit_artifacts(args)
    location = str(resolve_artifacts(explicit)) if explicit else None
    url = resolve_storage_url(args.storage)
    created = create_or_attach(open_storage(url), spec, artifacts=location)
    verb = "created" if created else "attached to existing"
    logger.info("%s study %r in %s (budget %d trials)", verb, spec.name, redact(url), spec.n_trials)
    return 0


def _study_list(args: argparse.Namespace) -> int:
    from kdsearch.service.storage import NoStudies, open_storage, resolve_storage_url, study_names

    try:
        names = study_names(open_storage(resolve_storage_url(args.storage), create=False))
    except NoStudies:
        names = []
    for name in names:
        sys.stdout.write(name + "\n")
    return 0


def _study_unhalt(args: argparse.Namespace) -> int:
    from kdsearch.service.storage import open_storage, resolve_storage_url
    from kdsearch.service.study import unhalt

    storage = open_storage(resolve_storage_url(args.storage), create=False)
    if unhalt(storage, args.name):
        logger.info("study %r unhalted: start its workers again", args.name)
    else:
        logger.info("study %r was not halted", args.name)
    return 0


def _study_schema(args: argparse.Namespace) -> int:
    import json

    from kdsearch.service.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


def _worker(args: argparse.Namespace, stop: object) -> int:
    from kdsearch.workers.gpus import worker_device

    # Before torch is imported: with --gpu auto, CUDA must only ever see the claimed GPU.
    with worker_device(
        args.gpu, args.device, Path(args.gpu_lock_dir), args.workers_per_gpu
    ) as device:
        from kdsearch.workers.stopping import GracefulStop
        from kdsearch.workers.worker import WorkerOptions, run_worker

        _quiet_transformers()
        assert isinstance(stop, GracefulStop)
        from kdsearch.service.storage import resolve_storage_url

        options = WorkerOptions(
            storage_url=resolve_storage_url(args.storage),
            study_name=args.study,
            artifacts=_explicit_artifacts(args),
            cache_dir=args.cache_dir and Path(args.cache_dir),
            device=device,
            threads=args.threads,
            max_trials=args.max_trials,
            storage_timeout_s=args.storage_timeout,
            precision=args.precision,
            mlflow=args.mlflow or None,
            tensorboard=args.tensorboard or None,
        )
        return run_worker(options, stop)


def _quiet_transformers() -> None:
    """Our own logs report loading and progress; transformers' would repeat them."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard with kdsearch's storage resolution: the URL (and its password)
    comes from --storage or the environment and never shows in the process list."""
    from optuna_dashboard import run_server

    from kdsearch.service.artifacts import RoutingArtifactStore, readable_store, resolve_artifacts
    from kdsearch.service.storage import open_storage, redact, resolve_storage_url
    from kdsearch.service.study import recorded_locations

    url = resolve_storage_url(args.storage)
    storage = open_storage(url, create=False)
    explicit = _explicit_artifacts(args)
    # Every study's own location (the default for a study that recorded none), unless one
    # is named: the dashboard starts even when some cannot be read, saying which.
    values = [explicit] if explicit else sorted(set(recorded_locations(storage).values()), key=str)
    stores = [s for v in values if (s := readable_store(resolve_artifacts(v))) is not None]
    store = RoutingArtifactStore(stores)
    logger.info("dashboard on http://%s:%d for %s", args.host, args.port, redact(url))
    run_server(storage, host=args.host, port=args.port, artifact_store=store)
    return 0


def _report(args: argparse.Namespace) -> int:
    import optuna

    from kdsearch.service.report import (
        depth_png,
        format_csv,
        format_json,
        format_markdown,
        pareto_png,
        summarize,
    )
    from kdsearch.service.spec import DEPTH
    from kdsearch.service.storage import open_storage, resolve_storage_url
    from kdsearch.service.study import load_stored_spec

    storage = open_storage(resolve_storage_url(args.storage), create=False)
    specs = [load_stored_spec(storage, name) for name in args.study]  # all known, or exit 2
    studies = [optuna.load_study(study_name=s.name, storage=storage) for s in specs]
    summaries = [summarize(study, spec) for study, spec in zip(studies, specs, strict=True)]
    formatter = {"md": format_markdown, "csv": format_csv, "json": format_json}[args.format]
    text = formatter(summaries)
    sys.stdout.write(text.rstrip("\n") + "\n")
    if args.out:
        from kdsearch.service.errors import InfrastructureError, first_line

        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"report.{args.format}").write_text(text)
            for study, spec in zip(studies, specs, strict=True):
                pareto_png(study, spec, out / f"{spec.name}-pareto.png")
                if DEPTH in spec.search_space:
                    depth_png(study, spec, out / f"{spec.name}-depth.png")
        except OSError as exc:
            raise InfrastructureError(
                f"cannot write the report to {str(out)!r}: {first_line(exc)}; give a writable "
                "--out folder"
            ) from None
        logger.info("wrote the report and %d Pareto plots to %s", len(specs), out)
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from kdsearch.service.storage import resolve_storage_url
    from kdsearch.workers.export import export_student

    _quiet_transformers()
    card = export_student(
        resolve_storage_url(args.storage),
        args.study,
        Path(args.out),
        _explicit_artifacts(args),
        cache_dir=args.cache_dir and Path(args.cache_dir),
        trial_number=args.trial,
        device_name=args.device,
    )
    sys.stdout.write(json.dumps(card, indent=2) + "\n")
    return 0


def _status(args: argparse.Namespace) -> int:
    import optuna

    from kdsearch.service.status import (
        configuration_table,
        format_json,
        format_table,
        trial_rows,
    )
    from kdsearch.service.storage import open_storage, resolve_storage_url
    from kdsearch.service.study import load_stored_spec

    storage = open_storage(resolve_storage_url(args.storage), create=False)
    spec = load_stored_spec(storage, args.study)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    if args.watch is not None:
        return _watch(study, spec, storage, args.watch)
    configs = configuration_table(study, spec)
    rows = trial_rows(study, list(spec.search_space))
    if args.format == "json":
        sys.stdout.write(format_json(configs if args.configurations else rows) + "\n")
        return 0
    from kdsearch.service.study import halted_reason, recorded_locations

    text = format_table(rows)
    if args.configurations or spec.replicates.max_seeds > 1:
        text = "configurations (mean ± sd over seeds [confidence bounds]):\n"
        text += format_table(configs)
        if not args.configurations:
            text += "\n\ntrials:\n" + format_table(rows)
    location = recorded_locations(storage).get(spec.name) or "not recorded yet (no worker ran)"
    footer = f"\n\nartifacts: {location}\n"
    if reason := halted_reason(storage, spec.name):
        footer += f"HALTED: {reason}\n"
    sys.stdout.write(text + footer)
    return 0


def _watch(study: Any, spec: Any, storage: Any, every_s: float) -> int:
    """Redraw the live view every ``every_s`` until the study is done or halted; a lost
    database is waited for (the workers wait for it too)."""
    import time

    from kdsearch.service.status import live_view, study_finished
    from kdsearch.service.storage import with_reconnect
    from kdsearch.service.study import halted_reason

    clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() else ""
    try:
        while True:
            text, done, halted = with_reconnect(
                lambda: (
                    live_view(study, spec),
                    study_finished(study, spec),
                    halted_reason(storage, spec.name),
                ),
                "reading the study",
                600.0,
            )
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}{stamp}  {text}\n" + ("" if clear else "\n"))
            sys.stdout.flush()
            if halted:
                sys.stdout.write(f"HALTED: {halted}\n")
                return 1
            if done:
                return 0
            time.sleep(every_s)
    except KeyboardInterrupt:
        return 0


def _score(args: argparse.Namespace) -> int:
    import json

    from kdsearch.service.errors import KdsearchError
    from kdsearch.service.spec import TASKS
    from kdsearch.workers.score import score_files

    if args.task is not None and args.task not in TASKS:
        raise KdsearchError(f"--task {args.task!r} is not a task; use one of {', '.join(TASKS)}")
    figures = score_files(Path(args.teacher), Path(args.student), args.task)
    if args.format == "json":
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            shown = f"{value:.6f}" if isinstance(value, float) else str(value)
            sys.stdout.write(f"{key.ljust(width)}  {shown}\n")
    return 0


def _early_stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM / SIGINT before a command has set up its own handling: nothing is under
    way yet, so stop at once and cleanly."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _early_stop)
    args = build_parser().parse_args(argv)
    from kdsearch.service.errors import KdsearchError

    try:
        _configure_logging(args.verbose)
        command = (args.command, getattr(args, "study_command", None))
        if command == ("worker", None):
            # The worker's own handler, installed before torch loads: a stop at any time
            # is a clean stop (exit 0), and during a trial it re-queues the trial.
            from kdsearch.workers.stopping import GracefulStop

            stop = GracefulStop()
            with stop.installed():
                return _worker(args, stop)
        handlers = {
            ("study", "create"): _study_create,
            ("study", "list"): _study_list,
            ("study", "schema"): _study_schema,
            ("study", "unhalt"): _study_unhalt,
            ("status", None): _status,
            ("score", None): _score,
            ("dashboard", None): _dashboard,
            ("report", None): _report,
            ("export", None): _export,
        }
        return handlers[command](args)
    except KdsearchError as exc:
        # A problem the user can fix: one clear message, no traceback, no timestamp.
        sys.stderr.write(f"kdsearch: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
