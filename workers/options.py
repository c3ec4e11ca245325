"""A worker's options, declared once: the CLI (``kdsearch worker``) and the Python API
(``Study.run_worker``) both derive theirs from ``WorkerOptions``' fields, their help texts
and their checks. Standard library only (the CLI builds its parser before heavy imports).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsearch.service.errors import KdsearchError

PRECISIONS = ("auto", "fp32", "bf16")


# Each check takes a value (the API's, or the CLI's text) and returns it typed, or raises
# ValueError worded "<value> must ...": the CLI prefixes the flag, the API the name.


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} must be a whole number of at least 1")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} must be a whole number of at least 1") from None
    if number < 1:
        raise ValueError(f"{number} must be at least 1")
    return number


def _positive_float(value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{value!r} must be a positive, finite number of seconds")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} must be one of {', '.join(choices)}")
        return str(value)

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ValueError(f"{value!r} must be a non-empty text (a path, a URL or a name)")
    return str(value)


@dataclass(frozen=True)
class Flag:
    """How an option shows on the command line."""

    name: str  # "--threads"
    metavar: str | None = None
    env: str | None = None  # the environment variable that gives its default
    choices: tuple[str, ...] | None = None


def _option(
    help: str,
    flag: Flag | None,
    check: Callable[[Any], Any] | None,
    api: bool = True,
    **default: Any,
) -> Any:
    """A dataclass field described for the CLI (``flag``) and the API (``api``: offered by
    run_worker), with the check both apply."""
    metadata = {"help": help, "flag": flag, "check": check, "api": api}
    return field(metadata=metadata, **default)


@dataclass(frozen=True)
class WorkerOptions:
    storage_url: str = _option("the study storage URL", None, None)
    study_name: str = _option("the study's name", Flag("--study", "NAME"), _text)
    artifacts: str | None = _option(
        "study assets and trial artifacts: a folder (one machine, or shared by all) or "
        "s3://BUCKET/PREFIX (default: $KDSEARCH_ARTIFACTS, else the location the study "
        "recorded, else ./kdsearch-artifacts)",
        Flag("--artifacts", "DIR|s3://BUCKET/PREFIX", env="KDSEARCH_ARTIFACTS"),
        _text,
        default=None,
    )
    cache_dir: str | None = _option(
        "this machine's copy of the study assets (default: $KDSEARCH_CACHE; else "
        "ARTIFACTS/cache for a folder, ~/.cache/kdsearch for S3)",
        Flag("--cache-dir", "DIR", env="KDSEARCH_CACHE"),
        _text,
        default=None,
    )
    device: str = _option(
        "auto (default: a GPU if visible), cpu, cuda or cuda:N", Flag("--device"), _text,
        default="auto",
    )  # fmt: skip
    threads: int | None = _option(
        "CPU threads for torch (default: all)", Flag("--threads", "N"), _positive_int,
        default=None,
    )  # fmt: skip
    max_trials: int | None = _option(
        "stop this worker after N trials", Flag("--max-trials", "N"), _positive_int,
        default=None,
    )  # fmt: skip
    storage_timeout_s: float = _option(
        "how long to keep reconnecting to a lost database before exiting 3 (default 600)",
        Flag("--storage-timeout", "SECONDS"),
        _positive_float,
        default=600.0,
    )
    precision: str | None = _option(
        "training precision on this worker (default: the study's training.precision; auto: "
        "bf16 where the hardware has it)",
        Flag("--precision", choices=PRECISIONS),
        _choice(PRECISIONS),
        default=None,
    )
    mlflow: str | None = _option(
        "also log each trial to this MLflow tracking URI (sqlite:///mlflow.db, "
        "http://host:5000); default: $KDSEARCH_MLFLOW, else the study's tracking.mlflow",
        Flag("--mlflow", "URI", env="KDSEARCH_MLFLOW"),
        _text,
        default=None,
    )
    tensorboard: str | None = _option(
        "also log each trial to this TensorBoard folder; default: $KDSEARCH_TENSORBOARD, "
        "else the study's tracking.tensorboard",
        Flag("--tensorboard", "DIR", env="KDSEARCH_TENSORBOARD"),
        _text,
        default=None,
    )
    # Launching: used by the CLI before torch starts (the GPU a worker takes).
    gpu: str = _option(
        "auto: claim a free GPU of this machine for this worker (see --workers-per-gpu) and "
        "run on it; none (default): use --device",
        Flag("--gpu", choices=("auto", "none")),
        _choice(("auto", "none")),
        api=False,
        default="none",
    )
    workers_per_gpu: int = _option(
        "with --gpu auto: workers sharing each GPU (default 1)", Flag("--workers-per-gpu", "K"),
        _positive_int, api=False, default=1,
    )  # fmt: skip
    gpu_lock_dir: str = _option(
        "folder shared by the workers of one machine for GPU claims (default: "
        "$KDSEARCH_GPU_LOCK_DIR, else /tmp/kdsearch-gpus)",
        Flag("--gpu-lock-dir", "DIR", env="KDSEARCH_GPU_LOCK_DIR"),
        _text,
        api=False,
        default="/tmp/kdsearch-gpus",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check = f.metadata.get("check")
            if value is None or check is None:
                continue
            try:
                object.__setattr__(self, f.name, check(value))
            except ValueError as exc:
                raise KdsearchError(f"worker option {f.name}: {exc}") from None

    @property
    def cache_path(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None

    @classmethod
    def api_names(cls) -> list[str]:
        """The options ``Study.run_worker`` takes (the storage and study are the handle's)."""
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata["api"] and f.name not in ("storage_url", "study_name")
        ]

    @classmethod
    def from_api(
        cls, storage_url: str, study_name: str, options: Mapping[str, Any]
    ) -> WorkerOptions:
        """The options given to ``Study.run_worker``; unknown names and bad values raise
        ``KdsearchError`` naming them."""
        allowed = cls.api_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise KdsearchError(
                f"run_worker got unknown option(s) {', '.join(unknown)}; it takes "
                f"{', '.join(allowed)}"
            )
        return cls(storage_url=storage_url, study_name=study_name, **options)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``kdsearch worker``'s options, one per field (the storage is a global option)."""
        for f in dataclasses.fields(cls):
            flag: Flag | None = f.metadata["flag"]
            if flag is None:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if flag.env:
                default = os.environ.get(flag.env) or default
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "help": f.metadata["help"],
                "default": default,
            }
            if flag.metavar:
                kwargs["metavar"] = flag.metavar
            if flag.choices:
                kwargs["choices"] = flag.choices
            if f.name == "study_name":
                kwargs["required"] = True
                del kwargs["default"]
            check = f.metadata["check"]
            if check is not None and not flag.choices:
                kwargs["type"] = _argparse_type(check)
            parser.add_argument(flag.name, **kwargs)

    @classmethod
    def from_cli(cls, args: argparse.Namespace, storage_url: str) -> WorkerOptions:
        values = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(cls)
            if f.metadata["flag"] is not None
        }
        return cls(storage_url=storage_url, **values)


def _argparse_type(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
