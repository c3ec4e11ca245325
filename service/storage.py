"""Where studies live: storage URL resolution, the RDB storage, and the study lock.

Every database connection kdsearch makes is opened here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy
from kdsearch.service.errors import KdsearchError
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

STORAGE_ENV = "KDSEARCH_STORAGE"
# Embedded default: one SQLite file in the working directory, for a single machine.
DEFAULT_STORAGE = "sqlite:///kdsearch.db"


def resolve_storage_url(cli_value: str | None) -> str:
    """``--storage`` wins, then ``$KDSEARCH_STORAGE``, then the embedded SQLite default."""
    return cli_value or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def redact(url: str) -> str:
    """The URL with its password masked: safe to print or log."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL may still hold a secret: show only its scheme
        return url.split(":", 1)[0] + ":<unparsable>"


def _engine_kwargs(url: str) -> dict[str, object]:
    if url.startswith("sqlite"):
        # Worker processes on one machine share the file; wait for locks instead of failing.
        return {"connect_args": {"timeout": 60}}
    # pool_pre_ping: idle connections drop during long trials (optuna#5600); a small pool
    # per worker keeps many workers under PostgreSQL's default 100 connections.
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}


def open_storage(
    url: str,
    heartbeat_interval_s: int | None = None,
    grace_period_s: int | None = None,
    stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.RDBStorage:
    """Connect (creating Optuna's tables on a fresh database) or raise one clear error.

    Workers pass the heartbeat settings: they enable Optuna's stale-trial detection
    (``fail_stale_trials``), with ``stale_trial_callback`` run on each trial it fails.
    """
    shown = redact(url)
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise KdsearchError(
            f"storage URL {shown!r} is not a database URL; use e.g. "
            "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB or sqlite:///kdsearch.db "
            f"(--storage or ${STORAGE_ENV})"
        ) from None
    if parsed.get_backend_name() not in ("postgresql", "sqlite", "mysql"):
        raise KdsearchError(
            f"storage URL {shown!r} uses backend {parsed.get_backend_name()!r}; "
            "use postgresql+psycopg2://... (many workers) or sqlite:///FILE (one machine)"
        )
    try:
        with _schema_lock(url):
            with warnings.catch_warnings():
                # heartbeat_interval is "experimental" since optuna 2.9; it is what we rely on.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=_engine_kwargs(url),
                    heartbeat_interval=heartbeat_interval_s,
                    grace_period=grace_period_s,
                    heartbeat_stale_trial_callback=stale_trial_callback,
                )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if parsed.password:
            reason = reason.replace(parsed.password, "***")
        raise KdsearchError(
            f"cannot reach the storage {shown!r}: {reason}. Check that the server is up and "
            f"the URL is right (--storage or ${STORAGE_ENV})"
        ) from None


_SCHEMA_LOCK_KEY = 0x6B64736561726368  # "kdsearch": serialises Optuna's table creation


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Workers starting together on a fresh PostgreSQL database would race to create
    Optuna's tables (duplicate-key errors); one at a time, the others see them made."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY}
                )
    finally:
        engine.dispose()


class StorageUnavailable(KdsearchError):
    """The storage stayed unreachable longer than the worker's limit."""

    exit_code = 3


# Errors that mean "the database is (temporarily) gone"; Optuna wraps SQLAlchemy's
# errors in StorageInternalError.
_TRANSIENT = (
    optuna.exceptions.StorageInternalError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)

T = TypeVar("T")


def with_reconnect(call: Callable[[], T], what: str, limit_s: float) -> T:
    """Run a storage call, retrying with exponential backoff (0.5 s .. 15 s) while the
    database is unreachable; give up with ``StorageUnavailable`` after ``limit_s``."""
    start = time.monotonic()
    delay = 0.5
    while True:
        try:
            return call()
        except _TRANSIENT as exc:
            waited = time.monotonic() - start
            if waited >= limit_s:
                raise StorageUnavailable(
                    f"the storage was unreachable for {waited:.0f} s while {what} "
                    f"(limit {limit_s:.0f} s, --storage-timeout): {_first_line(exc)}. Bring "
                    "the database back and start the worker again; its trial will be re-run"
                ) from None
            logger.warning("storage unreachable while %s; retrying in %.1f s", what, delay)
            time.sleep(min(delay, max(0.0, limit_s - waited)) or 0.1)
            delay = min(delay * 2, 15.0)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc.__cause__ or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def require_study(storage: optuna.storages.BaseStorage, name: str) -> None:
    names = study_names(storage)
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise KdsearchError(
            f"study {name!r} does not exist in this storage (studies there: {listed}); "
            "create it with `kdsearch study create STUDY.yaml` or check --storage"
        )


def _lock_key(name: str) -> int:
    # pg_advisory_lock takes a signed 64-bit key.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def study_lock(storage: optuna.storages.RDBStorage, name: str) -> AbstractContextManager[None]:
    """Serialise a short critical section (claiming a trial) across every worker of a study."""
    return _named_lock(storage, f"kdsearch:{name}")


def assets_lock(storage: optuna.storages.RDBStorage, name: str) -> AbstractContextManager[None]:
    """Serialise building the study assets ``name`` across machines. Building can take
    minutes (fine-tuning a teacher): waiters poll, so a stop signal still reaches them."""
    return _named_lock(storage, f"kdsearch-assets:{name}", poll_s=1.0)


@contextlib.contextmanager
def _named_lock(
    storage: optuna.storages.RDBStorage, name: str, poll_s: float | None = None
) -> Iterator[None]:
    """PostgreSQL: a session-level advisory lock (works across machines; it dies with the
    session, so a killed holder never blocks the others). SQLite: a file lock next to
    the database (one machine, which is all SQLite serves)."""
    engine = storage.engine
    if engine.dialect.name == "postgresql":
        key = {"k": _lock_key(name)}
        with engine.connect() as conn:
            if poll_s is None:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), key)
            else:
                waited = False
                while not conn.execute(
                    sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), key
                ).scalar():
                    if not waited:
                        logger.info("waiting for another worker holding %s", name)
                        waited = True
                    time.sleep(poll_s)
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), key)
                    conn.commit()
                except sqlalchemy.exc.SQLAlchemyError as exc:
                    # The server went away while we held it: the lock went with the session.
                    logger.warning("could not release %s: %s", name, _first_line(exc))
        return
    database = engine.url.database or "kdsearch"
    with file_lock(Path(f"{database}.{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock")):
        yield


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created with its folder): serialises the
    processes of one machine, and is released by the kernel if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
