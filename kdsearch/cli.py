"""The ``kdsearch`` command line.

Only the standard library is imported at start; each command imports what it needs, so
``study create`` and ``status`` start fast and run where torch is absent, and a stop
signal during start-up exits cleanly. Errors the user can fix are printed as one
``kdsearch: error: ...`` line (no traceback) with the exit code of ``kdsearch.service.errors``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
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
EXAMPLES = """\
example:
  kdsearch study create studies/demo-sst2.yaml
  kdsearch worker --study demo-sst2
  kdsearch status --study demo-sst2

exit codes: 0 done, 1 trials kept failing, 2 bad input or usage, 3 storage unreachable,
4 artifact store or local folder unusable"""


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
    from kdsearch.workers.options import WorkerOptions

    parser = argparse.ArgumentParser(
        prog="kdsearch",
        description="Hyperparameter search for confidence-preserving knowledge distillation "
        "(arXiv 2401.11365), as an Optuna study in PostgreSQL.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    study = commands.add_parser(
        "study",
        help="create, list, delete or move studies",
        description="Create, list, delete or move studies.",
        epilog="example:\n  kdsearch study create studies/demo-sst2.yaml\n  kdsearch study list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    delete = _command(
        study_commands,
        "delete",
        "delete a study and its trials from the storage (its artifact files stay)",
        "kdsearch study delete demo-sst2 --yes",
    )
    delete.add_argument("name", metavar="NAME", help=STUDY_HELP)
    delete.add_argument(
        "--yes", action="store_true", help="do not ask to type the name to confirm (scripts)"
    )
    relocate = _command(
        study_commands,
        "relocate",
        "record a new artifact location for a study (after you copied its files there)",
        "kdsearch study relocate demo-sst2 --artifacts /shared/kdsearch-artifacts",
    )
    relocate.add_argument("name", metavar="NAME", help=STUDY_HELP)
    relocate.add_argument(
        "--artifacts", required=True, metavar="DIR|s3://BUCKET/PREFIX",
        help="the study's new artifact location (checked: a writable folder, a reachable bucket)",
    )  # fmt: skip
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
    WorkerOptions.add_arguments(worker)

    status = _command(
        commands,
        "status",
        "the configurations and trials of a study",
        "kdsearch status --study demo-sst2",
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
        help="refresh every SECONDS (default 5): trials done, running and queued, the answer "
        "so far, each running trial's progress, the time left; stops when the study is done or "
        "halts (Ctrl-C to leave earlier)",
    )
    status.add_argument(
        "--configurations",
        action="store_true",
        help="one row per configuration (search seeds, held-out seeds, bounds, verdict) only; "
        "the table shows both when the study has seed replicates",
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
        "re-train the study's answer (or a trial) and save it as a Hugging Face model folder",
        "kdsearch export --study demo-sst2 --out students/demo",
    )
    export.add_argument("--study", required=True, metavar="NAME", help=STUDY_HELP)
    export.add_argument(
        "--trial",
        type=_non_negative_int,
        metavar="N",
        help="the trial to export (default: the study's answer, its median-sigma seed; "
        "`kdsearch status` names it)",
    )
    export.add_argument(
        "--out", required=True, metavar="DIR", help="a new or empty folder for the model"
    )
    _artifact_options(export)
    export.add_argument(
        "--device", default="auto", help="auto (default: a GPU if visible), cpu, cuda or cuda:N"
    )

    predictions = _command(
        commands,
        "predictions",
        "save a finished trial's prediction files (teacher and student, train and dev)",
        "kdsearch predictions --study demo-sst2 --trial 3 --out trial-3/",
    )
    predictions.add_argument("--study", required=True, metavar="NAME", help=STUDY_HELP)
    predictions.add_argument(
        "--trial", required=True, type=_non_negative_int, metavar="N", help="a finished trial"
    )
    predictions.add_argument(
        "--out", required=True, metavar="DIR", help="the folder to write the four CSVs to"
    )
    _artifact_options(predictions, cache=False)

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
        "kdsearch score --teacher trial-3/teacher_train.csv --student trial-3/student_train.csv",
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

    augment = _command(
        commands,
        "augment",
        "write TinyBERT's augmented train file for a study (data_augmentation.py)",
        "kdsearch augment studies/paper/rte-s6l.yaml --mlm bert-base-uncased "
        "--glove glove.6B.300d.txt",
    )
    augment.add_argument(
        "spec", metavar="STUDY.yaml", help="the study whose train split to augment"
    )
    augment.add_argument(
        "--mlm", required=True, metavar="MODEL",
        help="a BERT masked-language model (folder or hub id): candidates for single-piece words",
    )  # fmt: skip
    augment.add_argument(
        "--glove", required=True, metavar="FILE",
        help="GloVe vectors (word v1 v2 ... per line): neighbours for multi-piece words",
    )  # fmt: skip
    augment.add_argument(
        "--out", metavar="FILE", help="where to write it (default: the spec's data.train_augmented)"
    )
    augment.add_argument("--seed", type=int, default=42, help="the random seed (default 42)")
    augment.add_argument(
        "--n", type=_positive_int, metavar="N",
        help="augmented sentences per input (default: TinyBERT's per task: 30 RTE/MRPC/CoLA, "
        "20 SST-2/QNLI, 10 QQP)",
    )  # fmt: skip
    augment.add_argument(
        "--m", type=_positive_int, default=15, metavar="M", help="candidates per word (default 15)"
    )
    augment.add_argument(
        "--p", type=_probability, default=0.4, metavar="P",
        help="probability to replace a word (default 0.4)",
    )  # fmt: skip
    augment.add_argument(
        "--device", default="cpu", help="device of the masked-language model (default cpu)"
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


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability (0 to 1)")
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
    # Multivariate TPE, set_metric_names and the heartbeat are "experimental" in Optuna;
    # kdsearch relies on them as they are.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _explicit_artifacts(args: argparse.Namespace) -> str | None:
    from kdsearch.service.artifacts import explicit_artifacts

    return explicit_artifacts(getattr(args, "artifacts", None))


def _storage(args: argparse.Namespace, create: bool = False) -> Any:
    from kdsearch.service.storage import open_storage, resolve_storage_url

    return open_storage(resolve_storage_url(args.storage), create=create)


def _study_create(args: argparse.Namespace) -> int:
    from kdsearch.api import create_study

    study = create_study(
        args.spec, storage=args.storage, artifacts=getattr(args, "artifacts", None)
    )
    verb = "created" if study.created else "attached to existing"
    logger.info(
        "%s study %r in %s (budget %d trials)", verb, study.name, study.shown_storage,
        study.spec.n_trials,
    )  # fmt: skip
    return 0


def _study_list(args: argparse.Namespace) -> int:
    from kdsearch.service.storage import NoStudies, study_names

    try:
        names = study_names(_storage(args))
    except NoStudies:
        names = []
    for name in names:
        sys.stdout.write(name + "\n")
    return 0


def _study_unhalt(args: argparse.Namespace) -> int:
    from kdsearch.service.recovery import unhalt

    if unhalt(_storage(args), args.name):
        logger.info("study %r unhalted: start its workers again", args.name)
    else:
        logger.info("study %r was not halted", args.name)
    return 0


def _study_delete(args: argparse.Namespace) -> int:
    from kdsearch.service.errors import KdsearchError
    from kdsearch.service.storage import require_study
    from kdsearch.service.study import delete_study

    storage = _storage(args)
    require_study(storage, args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            raise KdsearchError(
                f"deleting study {args.name!r} needs a confirmation: pass --yes (it cannot be "
                "undone)"
            )
        typed = input(f"delete study {args.name!r} and all its trials? type its name to confirm: ")
        if typed.strip() != args.name:
            raise KdsearchError(f"the name typed was not {args.name!r}; nothing deleted")
    trials = delete_study(storage, args.name)
    logger.info(
        "deleted study %r (%d trials); its artifact files were left in place", args.name, trials
    )
    return 0


def _study_relocate(args: argparse.Namespace) -> int:
    from kdsearch.service.artifacts import relocate

    old = relocate(_storage(args), args.name, args.artifacts)
    logger.info(
        "study %r now keeps its artifacts in %s (was: %s); copy its files there if you have "
        "not", args.name, args.artifacts, old or "not recorded",
    )  # fmt: skip
    return 0


def _study_schema(args: argparse.Namespace) -> int:
    import json

    from kdsearch.service.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


def _worker(args: argparse.Namespace, stop: object) -> int:
    # Checked before anything starts (a bad option exits 2 at once).
    from kdsearch.service.storage import resolve_storage_url
    from kdsearch.workers.gpus import worker_device
    from kdsearch.workers.options import WorkerOptions

    options = WorkerOptions.from_cli(args, resolve_storage_url(args.storage))
    # Before torch is imported: with --gpu auto, CUDA must only ever see the claimed GPU.
    with worker_device(
        options.gpu, options.device, Path(options.gpu_lock_dir), options.workers_per_gpu
    ) as device:
        import dataclasses

        from kdsearch.workers.models import quiet_transformers
        from kdsearch.workers.stopping import GracefulStop
        from kdsearch.workers.worker import run_worker

        quiet_transformers()
        assert isinstance(stop, GracefulStop)
        return run_worker(dataclasses.replace(options, device=device), stop)


def _dashboard(args: argparse.Namespace) -> int:
    from kdsearch.service.dashboard import serve

    serve(args.storage, _explicit_artifacts(args), args.host, args.port)
    return 0


def _report(args: argparse.Namespace) -> int:
    import optuna

    from kdsearch.service.report import (
        depth_png,
        format_csv,
        format_json,
        format_markdown,
        pareto_png,
    )
    from kdsearch.service.spec import DEPTH
    from kdsearch.service.study import load_stored_spec
    from kdsearch.service.summary import judge_study, read_records, summarize

    storage = _storage(args)
    specs = [load_stored_spec(storage, name) for name in args.study]  # all known, or exit 2
    studies = [optuna.load_study(study_name=s.name, storage=storage) for s in specs]
    records = [read_records(study) for study in studies]
    judged = [judge_study(r, s, study) for r, s, study in zip(records, specs, studies, strict=True)]
    summaries = [summarize(r, s, j) for r, s, j in zip(records, specs, judged, strict=True)]
    formatter = {"md": format_markdown, "csv": format_csv, "json": format_json}[args.format]
    text = formatter(summaries)
    if args.out:
        from kdsearch.service.errors import InfrastructureError, first_line

        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"report.{args.format}").write_text(text)
            for i, (study, spec) in enumerate(zip(studies, specs, strict=True)):
                pareto_png(study, spec, judged[i], summaries[i], out / f"{spec.name}-pareto.png")
                if DEPTH in spec.search_space:
                    depth_png(records[i], spec, out / f"{spec.name}-depth.png")
        except OSError as exc:
            raise InfrastructureError(
                f"cannot write the report to {str(out)!r}: {first_line(exc)}; give a writable "
                "--out folder"
            ) from None
        logger.info("wrote the report and %d Pareto plots to %s", len(specs), out)
    sys.stdout.write(text.rstrip("\n") + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from kdsearch.service.storage import resolve_storage_url
    from kdsearch.workers.export import ExportRequest, export_student
    from kdsearch.workers.models import quiet_transformers

    quiet_transformers()
    card = export_student(
        ExportRequest(
            storage_url=resolve_storage_url(args.storage),
            study=args.study,
            out=Path(args.out),
            artifacts=_explicit_artifacts(args),
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            trial=args.trial,
            device=args.device,
        )
    )
    sys.stdout.write(json.dumps(card, indent=2) + "\n")
    return 0


def _predictions(args: argparse.Namespace) -> int:
    from kdsearch.api import load_study

    written = load_study(args.study, storage=args.storage).prediction_files(
        args.trial, Path(args.out), artifacts=_explicit_artifacts(args)
    )
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0


def _status(args: argparse.Namespace) -> int:
    import optuna

    from kdsearch.service.artifacts import recorded_locations
    from kdsearch.service.recovery import halted_reason
    from kdsearch.service.status import (
        answer_line,
        configuration_text,
        format_json,
        format_table,
        trial_rows,
    )
    from kdsearch.service.study import load_stored_spec
    from kdsearch.service.summary import judge_study, read_records, summarize

    storage = _storage(args)
    spec = load_stored_spec(storage, args.study)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    if args.watch is not None:
        return _watch(study, spec, storage, args.watch)
    records = read_records(study)
    summary = summarize(records, spec, judge_study(records, spec, study))
    rows = trial_rows(records, spec)
    if args.format == "json":
        if args.configurations:
            payload: Any = [c.flat() for c in summary.configurations]
        else:
            payload = rows
        sys.stdout.write(format_json(payload) + "\n")
        return 0
    text = format_table(rows)
    if args.configurations or spec.replicates.max_seeds > 1:
        text = (
            "configurations (search seeds: mean ± sd [confidence bounds]; held-out seeds apart):\n"
        )
        text += configuration_text(summary)
        if not args.configurations:
            text += "\n\ntrials:\n" + format_table(rows)
    location = recorded_locations(storage).get(spec.name) or "not recorded yet (no worker ran)"
    footer = f"\n\n{answer_line(summary)}\nartifacts: {location}\n"
    if reason := halted_reason(storage, spec.name):
        footer += f"HALTED: {reason}\n"
    sys.stdout.write(text + footer)
    return 0


def _watch(study: Any, spec: Any, storage: Any, every_s: float) -> int:
    """Redraw the live view every ``every_s`` until the study is done or halted; a lost
    database is waited for (the workers wait for it too)."""
    import time

    from kdsearch.service.recovery import halted_reason
    from kdsearch.service.status import live_view, study_finished
    from kdsearch.service.storage import with_reconnect
    from kdsearch.service.summary import judge_study, read_records, summarize

    def look() -> tuple[str, bool, str | None]:
        records = read_records(study)
        judged = judge_study(records, spec, study)
        text = live_view(records, summarize(records, spec, judged), spec)
        return text, study_finished(records, judged, spec), halted_reason(storage, spec.name)

    clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() else ""
    try:
        while True:
            text, done, halted = with_reconnect(look, "reading the study", 600.0)
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


def _augment(args: argparse.Namespace) -> int:
    from kdsearch.workers.augment import AugmentRequest, augment_study
    from kdsearch.workers.models import quiet_transformers

    quiet_transformers()
    written, rows = augment_study(
        AugmentRequest(
            spec=Path(args.spec), mlm=args.mlm, glove=Path(args.glove),
            out=Path(args.out) if args.out else None, seed=args.seed, n=args.n, m=args.m,
            p=args.p, device=args.device,
        )
    )  # fmt: skip
    logger.info("wrote %d augmented train rows to %s", rows, written)
    return 0


def _early_stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM / SIGINT before a command has set up its own handling: nothing is under
    way yet, so stop at once and cleanly."""
    raise SystemExit(0)


HANDLERS = {
    ("study", "create"): _study_create,
    ("study", "list"): _study_list,
    ("study", "schema"): _study_schema,
    ("study", "unhalt"): _study_unhalt,
    ("study", "delete"): _study_delete,
    ("study", "relocate"): _study_relocate,
    ("status", None): _status,
    ("score", None): _score,
    ("dashboard", None): _dashboard,
    ("report", None): _report,
    ("export", None): _export,
    ("predictions", None): _predictions,
    ("augment", None): _augment,
}


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
        if command in (("status", None), ("report", None)) and not getattr(args, "watch", None):
            # One read, one table, then exit: nothing for the cyclic collector to free,
            # but a large study's records for it to walk (``paused_gc``).
            from kdsearch.service.summary import paused_gc

            with paused_gc():
                return HANDLERS[command](args)
        return HANDLERS[command](args)
    except KdsearchError as exc:
        # A problem the user can fix: one clear message, no traceback, no timestamp.
        sys.stderr.write(f"kdsearch: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
