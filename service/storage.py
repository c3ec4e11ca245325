"""Where studies live: storage URL resolution, the RDB storage, reconnects and locks.

Every database connection kdsearch makes is opened here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from kdsearch.service.errors import KdsearchError, StorageUnavailable, first_line
from kdsearch.service.hashing import stable_hash, stable_int

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
    # per worker keeps many workers under PostgreSQL's default 100 connections; the
    # connect timeout makes an unreachable server fail in seconds, not minutes.
    return {
        "pool_pre_ping": True,
        "pool_size": 2,
        "max_overflow": 2,
        "pool_recycle": 1800,
        "connect_args": {"connect_timeout": 10},
    }


class KdsearchStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, with one more stale-trial rule.

    Optuna fails a RUNNING trial whose heartbeat is older than the grace period, but skips
    a RUNNING trial that has no heartbeat at all: a worker that died (or lost its
    connection) between claiming a trial and its first beat would leave that trial
    RUNNING forever. Here such a trial gets its clock started, with the database's own
    time, the first time any worker looks; if nobody beats for it within the grace
    period, it is stale like any other.
    """

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Write several user attrs in one transaction: a reader sees all or none of them
        (a trial's outcome is never half there), in one round trip instead of many."""
        with _create_scoped_session(self.scoped_session, True) as session:
            if self.engine.name not in ("postgresql", "sqlite") or not attrs:
                for key, value in attrs.items():
                    self._set_trial_attr_without_commit(
                        session, models.TrialUserAttributeModel, trial_id, key, value
                    )
                return
            # One check of the trial and one multi-row upsert, where Optuna's per-key
            # path runs two statements per key (a trial's outcome is about 30 keys).
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            dialect = (
                sqlalchemy.dialects.postgresql
                if self.engine.name == "postgresql"
                else sqlalchemy.dialects.sqlite
            )
            table = models.TrialUserAttributeModel
            rows = [
                {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                for key, value in attrs.items()
            ]
            insert = dialect.insert(table).values(rows)
            session.execute(
                insert.on_conflict_do_update(
                    index_elements=[table.trial_id, table.key],
                    set_={"value_json": insert.excluded.value_json},
                )
            )

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        self._start_clocks(study_id)
        return stale

    def _start_clocks(self, study_id: int) -> None:
        with self.engine.connect() as conn:
            unbeaten = conn.execute(
                sqlalchemy.select(models.TrialModel.trial_id)
                .where(models.TrialModel.study_id == study_id)
                .where(models.TrialModel.state == TrialState.RUNNING)
                .where(
                    ~sqlalchemy.exists().where(
                        models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id
                    )
                )
            ).scalars()
            for trial_id in list(unbeaten):
                try:
                    conn.execute(
                        sqlalchemy.insert(models.TrialHeartbeatModel).values(trial_id=trial_id)
                    )
                    conn.commit()
                    logger.info("trial id %d is RUNNING with no heartbeat: clock started", trial_id)
                except sqlalchemy.exc.IntegrityError:
                    conn.rollback()  # its worker (or another checker) wrote one meanwhile


def _check_url(url: str) -> sqlalchemy.engine.URL:
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
    return parsed


def _unreachable(url: str, parsed: sqlalchemy.engine.URL, exc: BaseException) -> KdsearchError:
    reason = first_line(exc)
    if parsed.password:
        reason = reason.replace(parsed.password, "***")
    return StorageUnavailable(
        f"cannot reach the storage {redact(url)!r}: {reason}. Check that the server is up and "
        f"the URL is right (--storage or ${STORAGE_ENV})"
    )


class NoStudies(KdsearchError):
    """A read-only command found a storage without any kdsearch study (nothing created)."""


def open_storage(
    url: str,
    heartbeat_interval_s: int | None = None,
    grace_period_s: int | None = None,
    stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    create: bool = True,
) -> KdsearchStorage:
    """Connect, or raise one clear error.

    ``create``: make Optuna's tables on a fresh database (and the SQLite file). Read-only
    commands pass False: they never write, and a storage without tables raises
    ``NoStudies``. Workers pass the heartbeat settings: they enable Optuna's stale-trial
    detection, with ``stale_trial_callback`` run on each trial it fails.
    """
    parsed = _check_url(url)
    if not create:
        _require_schema(url, parsed)
    try:
        with _schema_lock(url):
            with warnings.catch_warnings():
                # heartbeat_interval is "experimental" since optuna 2.9; it is what we rely on.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return KdsearchStorage(
                    url,
                    engine_kwargs=_engine_kwargs(url),
                    heartbeat_interval=heartbeat_interval_s,
                    grace_period=grace_period_s,
                    heartbeat_stale_trial_callback=stale_trial_callback,
                    skip_table_creation=not create,
                )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise _unreachable(url, parsed, exc) from None


def _require_schema(url: str, parsed: sqlalchemy.engine.URL) -> None:
    """Raise ``NoStudies`` unless Optuna's tables exist, without creating anything."""
    shown = redact(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or not Path(database).is_file():
            raise NoStudies(
                f"no storage at {shown!r} (the file does not exist): no study has been created "
                f"there; create one with `kdsearch study create STUDY.yaml`, or give --storage "
                f"(or ${STORAGE_ENV})"
            )
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            has = sqlalchemy.inspect(conn).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _unreachable(url, parsed, exc) from None
    finally:
        engine.dispose()
    if not has:
        raise NoStudies(
            f"the storage {shown!r} holds no kdsearch study yet; create one with "
            f"`kdsearch study create STUDY.yaml`, or check --storage (or ${STORAGE_ENV})"
        )


_SCHEMA_LOCK_KEY = stable_int("kdsearch:schema")  # serialises Optuna's table creation


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Workers starting together on a fresh PostgreSQL database would race to create
    Optuna's tables (duplicate-key errors); one at a time, the others see them made."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
    )
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


# Errors that mean "the database is (temporarily) gone"; Optuna wraps SQLAlchemy's
# errors in StorageInternalError.
TRANSIENT_ERRORS = (
    optuna.exceptions.StorageInternalError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)

T = TypeVar("T")


def with_reconnect(
    call: Callable[[], T], what: str, limit_s: float, deadline: float | None = None
) -> T:
    """Run a storage call, retrying with exponential backoff (0.5 s .. 15 s) while the
    database is unreachable; give up with ``StorageUnavailable`` after ``limit_s``.

    ``deadline`` (a ``time.monotonic()`` value) caps the whole effort instead, so calls
    made while handling an outage share one budget rather than each getting their own."""
    start = time.monotonic()
    end = deadline if deadline is not None else start + limit_s
    delay = 0.5
    while True:
        try:
            return call()
        except TRANSIENT_ERRORS as exc:
            now = time.monotonic()
            if now >= end:
                raise StorageUnavailable(
                    f"the storage was unreachable for {now - start:.0f} s while {what} "
                    f"(limit {limit_s:.0f} s, --storage-timeout): {first_line(exc)}. Bring "
                    "the database back and start the worker again; its trial will be re-run"
                ) from None
            logger.warning("storage unreachable while %s; retrying in %.1f s", what, delay)
            time.sleep(max(0.05, min(delay, end - now)))
            delay = min(delay * 2, 15.0)


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
        # pg_advisory_lock takes a signed 64-bit key.
        key = {"k": stable_int(name, bits=64) - (1 << 63)}
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
                    logger.warning("could not release %s: %s", name, first_line(exc))
        return
    database = engine.url.database or "kdsearch"
    with file_lock(Path(f"{database}.{stable_hash(name, length=12)}.lock")):
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
