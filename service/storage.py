"""Where studies live: storage URL resolution, the RDB storage, reconnects, critical
sections and bulk reads.

Every database connection kdsearch makes is opened here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import fcntl
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
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
from sqlalchemy.orm import Session

from kdsearch.service.errors import KdsearchError, StorageUnavailable, first_line
from kdsearch.service.hashing import stable_hash, stable_int

logger = logging.getLogger(__name__)

STORAGE_ENV = "KDSEARCH_STORAGE"
# Embedded default: one SQLite file in the working directory, for a single machine.
DEFAULT_STORAGE = "sqlite:///kdsearch.db"
# A critical section (a claim, a study's creation) takes milliseconds to a second; its
# holder is given this long between two statements before the server ends its session,
# which releases the lock and rolls back what it did: a frozen holder (SIGSTOP, a swapped
# out VM) cannot stall the study, and can never complete a claim it no longer holds.
# $KDSEARCH_LOCK_HOLD_S sets it (seconds, at least 5: a claim under load must fit).
LOCK_HOLD_S = 30
LOCK_HOLD_ENV = "KDSEARCH_LOCK_HOLD_S"
# Waiters give up a wait after this long, say so, and try again.
LOCK_WAIT_S = 60


def resolve_storage_url(cli_value: str | None) -> str:
    """``--storage`` wins, then ``$KDSEARCH_STORAGE``, then the embedded SQLite default."""
    if cli_value is not None and not cli_value.strip():
        raise KdsearchError(
            "--storage is empty; give a database URL (postgresql+psycopg2://USER@HOST/DB or "
            f"sqlite:///FILE), or leave --storage out to use ${STORAGE_ENV} or {DEFAULT_STORAGE}"
        )
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
        "max_overflow": 3,
        "pool_recycle": 1800,
        "connect_args": {"connect_timeout": 10},
    }


class KdsearchStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, with kdsearch's rules on stale trials and multi-key writes.

    **Stale trials.** Optuna fails a RUNNING trial whose heartbeat is older than the grace
    period. Here that rule holds only while heartbeats could reach the server:

    - no trial is stale within one grace period of the server's start (PostgreSQL's
      ``pg_postmaster_start_time``): after a restart, every live worker gets a full grace
      period to beat again;
    - a worker that itself lost the database fails nobody's trial within one grace period
      of its last failed call: a network outage seen by all workers gives the same grace;
    - a RUNNING trial with no heartbeat at all (its worker died between creating it and
      its first beat) gets its clock started, with the database's time, the first time a
      worker looks; if nobody beats for it within the grace period, it is stale.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._last_outage = -float("inf")  # time.monotonic() of the last failed call
        sqlalchemy.event.listen(self.engine, "handle_error", self._note_error)
        if self.engine.name == "sqlite":
            _explicit_sqlite_transactions(self.engine)

    # --- new trials ------------------------------------------------------------------------

    def _get_prepared_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None, session: Session
    ) -> models.TrialModel:
        """A new trial from a template of attributes only (the claim's seeds): Optuna
        writes each attribute with a read of the trial and an upsert, two statements per
        attribute under the study's lock; a trial just inserted has none, so they go in
        one insert per table. Any other template is Optuna's own."""
        t = template_trial
        if t is None or t.values or t.params or t.intermediate_values:
            return super()._get_prepared_new_trial(study_id, t, session)  # type: ignore[no-any-return]
        trial = models.TrialModel(
            study_id=study_id,
            number=None,
            state=t.state,
            datetime_start=t.datetime_start,
            datetime_complete=t.datetime_complete,
        )
        session.add(trial)
        session.flush()  # its id, for the attributes
        for model, attrs in (
            (models.TrialUserAttributeModel, t.user_attrs),
            (models.TrialSystemAttributeModel, t.system_attrs),
        ):
            if attrs:
                rows = [
                    {"trial_id": trial.trial_id, "key": k, "value_json": json.dumps(v)}
                    for k, v in attrs.items()
                ]
                session.execute(sqlalchemy.insert(model), rows)
        trial.number = trial.count_past_trials(session)
        session.add(trial)
        return trial

    # --- outages --------------------------------------------------------------------------

    def _note_error(self, context: Any) -> None:
        if (
            context.is_disconnect
            or isinstance(
                context.original_exception, sqlalchemy.exc.OperationalError | ConnectionError
            )
            or "OperationalError" in type(context.original_exception).__name__
        ):
            self._last_outage = time.monotonic()

    def note_outage(self) -> None:
        """A storage call failed for a reason the engine did not see (connecting)."""
        self._last_outage = time.monotonic()

    def _calm(self) -> bool:
        grace = self.grace_period or 0
        return time.monotonic() - self._last_outage >= grace

    # --- stale trials -----------------------------------------------------------------

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        self._start_clocks(study_id)
        if not self._calm():
            return []
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        with self.engine.connect() as conn:
            if self.engine.name == "postgresql":
                started = conn.execute(
                    sqlalchemy.text("SELECT now() - pg_postmaster_start_time()")
                ).scalar()
                if started is not None and started < datetime.timedelta(seconds=grace):
                    return []  # the server restarted: live workers get a grace to beat again
            now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
            assert now is not None
            limit = now.replace(tzinfo=None) - datetime.timedelta(seconds=grace)
            trial, beat = models.TrialModel, models.TrialHeartbeatModel
            return list(
                conn.execute(
                    sqlalchemy.select(trial.trial_id)
                    .join(beat, beat.trial_id == trial.trial_id)
                    .where(trial.study_id == study_id)
                    .where(trial.state == TrialState.RUNNING)
                    .where(beat.heartbeat < limit)
                ).scalars()
            )

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

    def trial_state(self, trial_id: int) -> TrialState:
        """A trial's state, read from the database (never from a cache)."""
        with self.engine.connect() as conn:
            state = conn.execute(
                sqlalchemy.select(models.TrialModel.state).where(
                    models.TrialModel.trial_id == trial_id
                )
            ).scalar()
        if state is None:
            raise KeyError(f"trial id {trial_id} does not exist")
        return TrialState(state) if not isinstance(state, TrialState) else state

    # --- writes of several keys -------------------------------------------------------

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Write several user attrs in one transaction: a reader sees all or none of them
        (a trial's outcome is never half there), in one round trip instead of many."""
        self.write_trial(trial_id, attrs, {})

    def write_trial(
        self, trial_id: int, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
    ) -> None:
        """Several user and system attrs of a running trial in one transaction (a trial's
        outcome with the metadata of its artifacts). Raises Optuna's
        ``UpdateFinishedTrialError`` when the trial is finished already."""
        with _create_scoped_session(self.scoped_session, True) as session:
            if not user_attrs and not system_attrs:
                return
            # One check of the trial and one multi-row upsert per table, where Optuna's
            # per-key path runs two statements per key (an outcome is about 30 keys).
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            for table, attrs in (
                (models.TrialUserAttributeModel, user_attrs),
                (models.TrialSystemAttributeModel, system_attrs),
            ):
                if attrs:
                    session.execute(self._upsert(table, trial_id, attrs))

    def _upsert(self, table: Any, trial_id: int, attrs: Mapping[str, Any]) -> Any:
        dialect = (
            sqlalchemy.dialects.postgresql
            if self.engine.name == "postgresql"
            else sqlalchemy.dialects.sqlite
        )
        rows = [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in attrs.items()
        ]
        insert = dialect.insert(table).values(rows)
        return insert.on_conflict_do_update(
            index_elements=[table.trial_id, table.key],
            set_={"value_json": insert.excluded.value_json},
        )

    # --- reads of a whole study -------------------------------------------------------

    def read_study(self, study_id: int) -> list[FrozenTrial]:
        """Every trial of a study in one pass (five queries, not one per trial): what
        ``status``, ``report`` and the study note read. Optuna's own read builds its ORM
        objects row by row, which takes seconds at 10,000 trials. On PostgreSQL the user
        attributes (most of the rows) are read on a second connection while this one reads
        the rest, both in one snapshot (``_snapshot_pair``)."""
        if self.engine.dialect.name != "postgresql":
            return read_trials(self.engine, study_id)
        with _snapshot_pair(self.engine) as (conn, side):
            return read_trials(conn, study_id, side=side)

    def read_states(self, trial_ids: Collection[int]) -> dict[int, TrialState]:
        """The states of these trials, in one query (through this thread's session)."""
        if not trial_ids:
            return {}
        trial = models.TrialModel
        with _create_scoped_session(self.scoped_session) as session:
            rows = session.execute(
                sqlalchemy.select(trial.trial_id, trial.state).where(
                    trial.trial_id.in_(list(trial_ids))
                )
            ).all()
        return {i: st if isinstance(st, TrialState) else TrialState[st] for i, st in rows}

    def study_id_of_trial(self, trial_id: int) -> int:
        with _create_scoped_session(self.scoped_session) as session:
            return int(models.TrialModel.find_or_raise_by_id(trial_id, session).study_id)

    def read_changed(
        self, study_id: int, after_id: int, include: Collection[int]
    ) -> list[FrozenTrial]:
        """The trials with an id above ``after_id`` or in ``include``, through this
        thread's session: inside a critical section, its transaction (its own writes, the
        stale trials it failed and re-queued, are seen)."""
        with _create_scoped_session(self.scoped_session) as session:
            return read_trials(session.connection(), study_id, after_id, include)


def _explicit_sqlite_transactions(engine: sqlalchemy.engine.Engine) -> None:
    """pysqlite begins transactions on its own, and breaks SAVEPOINTs: SQLAlchemy's
    documented recipe makes it emit BEGIN where SQLAlchemy begins one, so a critical
    section can run in one transaction (``critical_section``)."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def _read_attrs(conn: sqlalchemy.engine.Connection, table: Any, ids: Any) -> dict[int, dict]:
    """One attribute table's rows of these trials, as a dict per trial id. On PostgreSQL
    the server joins each trial's attributes into one JSON object text (one row and one
    ``json.loads`` per trial instead of some thirty: half the time of a large study's
    read); the values are joined as stored, not cast to ``json``, which refuses the
    ``NaN`` Python writes for an undefined figure."""
    out: dict[int, dict] = {}
    if conn.dialect.name == "postgresql":
        func = sqlalchemy.func
        member = func.concat(func.to_json(table.key), ":", table.value_json)
        query = (
            sqlalchemy.select(table.trial_id, func.string_agg(member, ","))
            .where(table.trial_id.in_(ids))
            .group_by(table.trial_id)
        )
        for trial_id, joined in conn.execute(query):
            out[trial_id] = json.loads("{" + joined + "}")
        return out
    query = sqlalchemy.select(table.trial_id, table.key, table.value_json)
    for trial_id, key, raw in conn.execute(query.where(table.trial_id.in_(ids))):
        out.setdefault(trial_id, {})[key] = json.loads(raw)
    return out


_SNAPSHOT_ID = re.compile(r"[0-9A-F-]+")


@contextlib.contextmanager
def _snapshot_pair(
    engine: sqlalchemy.engine.Engine,
) -> Iterator[tuple[sqlalchemy.engine.Connection, sqlalchemy.engine.Connection]]:
    """Two PostgreSQL connections reading one snapshot of the database (the first exports
    it, the second imports it, as ``pg_dump --jobs`` does): queries split between them see
    the same trials, whatever workers write meanwhile."""
    read = {"isolation_level": "REPEATABLE READ"}
    with engine.connect().execution_options(**read) as conn, conn.begin():
        snapshot = conn.execute(sqlalchemy.text("SELECT pg_export_snapshot()")).scalar_one()
        if not _SNAPSHOT_ID.fullmatch(snapshot):
            raise ValueError(f"unexpected snapshot id {snapshot!r} from pg_export_snapshot()")
        with engine.connect().execution_options(**read) as side, side.begin():
            side.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            yield conn, side


def read_trials(
    source: sqlalchemy.engine.Engine | sqlalchemy.engine.Connection,
    study_id: int,
    after_id: int = -1,
    include: Collection[int] = (),
    side: sqlalchemy.engine.Connection | None = None,
) -> list[FrozenTrial]:
    """``FrozenTrial``s of ``study_id`` from five bulk queries: every trial, or (``after_id``
    and ``include``) only those with an id above ``after_id`` or in ``include`` (what a
    cache of the study needs to be current: the new trials, and the unfinished ones it
    holds). ``source``: an engine, or a connection (a critical section's, to see its own
    writes). ``side``: a second connection in the same snapshot, which reads the user
    attributes in a thread meanwhile."""
    if isinstance(source, sqlalchemy.engine.Engine):
        with source.connect() as conn:
            return read_trials(conn, study_id, after_id, include)
    trial, users = models.TrialModel, models.TrialUserAttributeModel
    conn = source
    wanted: Any = trial.study_id == study_id
    if after_id >= 0 or include:
        wanted = sqlalchemy.and_(
            wanted, sqlalchemy.or_(trial.trial_id > after_id, trial.trial_id.in_(list(include)))
        )
    rows = conn.execute(
        sqlalchemy.select(
            trial.trial_id, trial.number, trial.state, trial._datetime_start_utc,
            trial._datetime_complete_utc,
        ).where(wanted).order_by(trial.number)
    ).all()  # fmt: skip
    if not rows:
        return []
    # A few trials (a claim's refresh): their ids, so each attribute table is read by its
    # index; many: the same filter as a subquery (no list of thousands of parameters).
    ids: Any = (
        [row[0] for row in rows]
        if len(rows) <= 500
        else sqlalchemy.select(trial.trial_id).where(wanted)
    )
    if side is None:
        return _frozen(rows, _read_rest(conn, ids), _read_attrs(conn, users, ids))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        user_attrs = pool.submit(_read_attrs, side, users, ids)
        rest = _read_rest(conn, ids)
        return _frozen(rows, rest, user_attrs.result())


_Rest = tuple[dict[int, dict[int, float]], dict[int, dict[str, tuple[float, str]]], dict[int, dict]]


def _read_rest(conn: sqlalchemy.engine.Connection, ids: Any) -> _Rest:
    """These trials' values, parameters (internal value, distribution JSON) and system
    attributes, by trial id."""
    value, params = models.TrialValueModel, models.TrialParamModel
    values: dict[int, dict[int, float]] = {}
    for trial_id, objective, v, kind in conn.execute(
        sqlalchemy.select(value.trial_id, value.objective, value.value, value.value_type)
        .where(value.trial_id.in_(ids))
    ):  # fmt: skip
        values.setdefault(trial_id, {})[objective] = value.stored_repr_to_value(v, kind)
    found: dict[int, dict[str, tuple[float, str]]] = {}
    for trial_id, name, internal, distribution in conn.execute(
        sqlalchemy.select(
            params.trial_id, params.param_name, params.param_value, params.distribution_json
        ).where(params.trial_id.in_(ids))
    ):
        found.setdefault(trial_id, {})[name] = (internal, distribution)
    return values, found, _read_attrs(conn, models.TrialSystemAttributeModel, ids)


def _frozen(rows: Any, rest: _Rest, users: dict[int, dict]) -> list[FrozenTrial]:
    """The ``FrozenTrial`` of each trial row, from what the other queries read."""
    import optuna.distributions as dist

    values, found, system_attrs = rest
    parsed: dict[str, Any] = {}  # distribution JSON -> object: a study has a handful
    out = []
    for trial_id, number, state, start, complete in rows:
        param_values, distributions = {}, {}
        for name, (internal, text) in found.get(trial_id, {}).items():
            if text not in parsed:
                parsed[text] = dist.json_to_distribution(text)
            distributions[name] = parsed[text]
            param_values[name] = parsed[text].to_external_repr(internal)
        trial_values = values.get(trial_id)
        state = state if isinstance(state, TrialState) else TrialState[state]
        out.append(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=[trial_values[k] for k in sorted(trial_values)] if trial_values else None,
                datetime_start=_local(start),
                datetime_complete=_local(complete),
                params=param_values,
                distributions=distributions,
                user_attrs=users.get(trial_id, {}),
                system_attrs=system_attrs.get(trial_id, {}),
                intermediate_values={},
                trial_id=trial_id,
            )
        )
    return out


def _local(utc: datetime.datetime | None) -> datetime.datetime | None:
    """Optuna stores naive UTC and shows naive local time."""
    if utc is None:
        return None
    return utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


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
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite", "mysql"):
        raise KdsearchError(
            f"storage URL {shown!r} uses backend {backend!r}; "
            "use postgresql+psycopg2://... (many workers) or sqlite:///FILE (one machine)"
        )
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise KdsearchError(
            f"storage URL {shown!r} is an in-memory SQLite database, which keeps nothing once "
            "the command ends; give a file, e.g. sqlite:///kdsearch.db"
        )
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        driver = parsed.get_driver_name()
        raise KdsearchError(
            f"storage URL {shown!r} needs the {backend} driver {driver!r}, which is not "
            f"installed ({first_line(exc)}); install it, or use postgresql+psycopg2://... "
            "(psycopg2-binary comes with kdsearch) or sqlite:///FILE"
        ) from None
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
    kind: type[KdsearchStorage] = KdsearchStorage,
) -> KdsearchStorage:
    """Connect, or raise one clear error.

    ``create``: make Optuna's tables on a fresh database (and the SQLite file). Read-only
    commands pass False: they never write, and a storage without tables raises
    ``NoStudies``. Workers pass the heartbeat settings: they enable Optuna's stale-trial
    detection, with ``stale_trial_callback`` run on each trial it fails. ``kind``: a
    subclass to make (the dashboard's).
    """
    parsed = _check_url(url)
    if create and parsed.get_backend_name() == "sqlite":
        _require_sqlite_folder(url, parsed)
    revision = _require_optuna_schema(url, parsed, missing_ok=create)
    # Optuna's own schema check loads its alembic scripts at every connect; a read-only
    # command whose schema revision is Optuna's head skips it, and any other revision goes
    # to Optuna, whose error says what to do.
    current = not create and revision is not None and revision == optuna_schema_head()
    try:
        # A read-only command creates no table: nothing to serialise.
        with _schema_lock(url) if create else contextlib.nullcontext():
            return kind(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_interval_s,
                grace_period=grace_period_s,
                heartbeat_stale_trial_callback=stale_trial_callback,
                skip_table_creation=not create,
                skip_compatibility_check=current,
            )
    except RuntimeError as exc:  # optuna: the tables come from a newer (or older) Optuna
        raise KdsearchError(
            f"the storage {redact(url)!r} cannot be used by this kdsearch: {first_line(exc)} "
            "Use the Optuna version that made it, or another database"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise _unreachable(url, parsed, exc) from None


def _require_sqlite_folder(url: str, parsed: sqlalchemy.engine.URL) -> None:
    database = Path(parsed.database or "")
    folder = database.resolve().parent
    if database.exists():
        if not os.access(database, os.R_OK | os.W_OK):
            raise StorageUnavailable(
                f"the SQLite file {str(database)!r} of {redact(url)!r} is not readable and "
                "writable by this user; fix its permissions or give another --storage"
            )
    elif not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise StorageUnavailable(
            f"cannot create the SQLite file {str(database)!r} of {redact(url)!r}: its folder "
            f"{str(folder)!r} {'does not exist' if not folder.is_dir() else 'is read-only'}; "
            "give a file in a writable folder (--storage or $KDSEARCH_STORAGE)"
        )
    if database.exists() and not os.access(folder, os.W_OK | os.X_OK):
        # SQLite writes its journal beside the file: a read-only folder refuses every write.
        raise StorageUnavailable(
            f"the folder {str(folder)!r} of the SQLite file {str(database)!r} is read-only, "
            "and SQLite writes its journal there; make it writable or move the file"
        )


def _require_optuna_schema(url: str, parsed: sqlalchemy.engine.URL, missing_ok: bool) -> str | None:
    """Refuse a database whose tables are not Optuna's (a foreign ``studies`` table), and,
    unless ``missing_ok``, one without any (raises ``NoStudies``). Returns the schema's
    alembic revision (None: no tables, or none recorded)."""
    shown = redact(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not Path(database).is_file():
            if missing_ok:
                return None
            raise NoStudies(
                f"no storage at {shown!r} (the file does not exist): no study has been created "
                f"there; create one with `kdsearch study create STUDY.yaml`, or give --storage "
                f"(or ${STORAGE_ENV})"
            )
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_connect_args(url))
    try:
        with engine.connect() as conn:
            inspector = sqlalchemy.inspect(conn)
            tables = set(inspector.get_table_names())
            columns = (
                {c["name"] for c in inspector.get_columns("studies")}
                if "studies" in tables
                else set()
            )
            revision = (
                conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
                if "alembic_version" in tables
                else None
            )
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _unreachable(url, parsed, exc) from None
    finally:
        engine.dispose()
    if "studies" in tables and not (
        {"study_id", "study_name"} <= columns and "version_info" in tables
    ):
        raise KdsearchError(
            f"the database {shown!r} has a 'studies' table that is not Optuna's (columns: "
            f"{', '.join(sorted(columns)) or 'none'}); give kdsearch a database of its own"
        )
    if "studies" not in tables and not missing_ok:
        raise NoStudies(
            f"the storage {shown!r} holds no kdsearch study yet; create one with "
            f"`kdsearch study create STUDY.yaml`, or check --storage (or ${STORAGE_ENV})"
        )
    return revision


@functools.cache
def optuna_schema_head() -> str | None:
    """The alembic revision of the installed Optuna's schema: the one revision of its
    migration scripts that no other revises (read from their ``revision`` and
    ``down_revision`` lines, not by loading them as alembic does); None when that is not
    exactly one, and the caller lets Optuna check."""
    folder = Path(optuna.storages.__file__).parent / "_rdb" / "alembic" / "versions"
    line = re.compile(r'^(down_revision|revision)\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)
    revisions, revised = set(), set()
    for script in folder.glob("*.py"):
        for kind, value in line.findall(script.read_text()):
            (revisions if kind == "revision" else revised).add(value)
    heads = revisions - revised
    return heads.pop() if len(heads) == 1 else None


def _connect_args(url: str) -> dict[str, Any]:
    return {} if url.startswith("sqlite") else {"connect_args": {"connect_timeout": 10}}


_SCHEMA_LOCK_KEY = stable_int("kdsearch:schema")  # serialises Optuna's table creation


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Workers starting together on a fresh PostgreSQL database would race to create
    Optuna's tables (duplicate-key errors); one at a time, the others see them made."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_connect_args(url))
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
        listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        shown = name if len(name) <= 60 else name[:50] + f"... ({len(name)} chars)"
        raise KdsearchError(
            f"study {shown!r} does not exist in this storage (studies there: {listed or 'none'}); "
            "create it with `kdsearch study create STUDY.yaml` or check --storage"
        )


# --- critical sections -------------------------------------------------------------------


class LockBusy(KdsearchError):
    """A critical section's lock could not be taken in time (its holder is busy or frozen):
    transient, the caller tries again."""

    exit_code = 3


def lock_hold_s() -> int:
    """How long a critical section's holder may stay idle (``$KDSEARCH_LOCK_HOLD_S``)."""
    text = os.environ.get(LOCK_HOLD_ENV, "").strip()
    if not text:
        return LOCK_HOLD_S
    if not text.isdigit() or int(text) < 5:
        raise KdsearchError(
            f"${LOCK_HOLD_ENV} is {text!r}; it must be a whole number of seconds, at least 5 "
            f"(default {LOCK_HOLD_S}); set it so or unset it"
        )
    return int(text)


@contextlib.contextmanager
def critical_section(storage: KdsearchStorage, name: str, wait: bool = True) -> Iterator[bool]:
    """Run a short critical section (a claim, creating a study) on study ``name`` alone,
    in **one transaction**: every write the block makes through ``storage`` (Optuna's
    calls included) commits together at the end, or not at all.

    PostgreSQL: a transaction-level advisory lock. The server ends a holder's session that
    stays idle in its transaction for ``LOCK_HOLD_S`` (a frozen process): the lock is
    released and its writes are rolled back, so another worker can claim, and the frozen
    one, when it wakes, finds its connection gone and its claim undone: two claims never
    both land. Waiters wait up to ``LOCK_WAIT_S``, then raise ``LockBusy`` (they log and
    try again). SQLite (one machine): a file lock next to the database, then one
    transaction on the same file.

    Yields True; with ``wait=False``, yields False at once when another holds the lock
    (nothing runs then)."""
    engine = storage.engine
    conn = engine.connect()
    held = False
    try:
        if engine.dialect.name == "postgresql":
            transaction = conn.begin()
            conn.execute(
                sqlalchemy.text(
                    f"SET LOCAL idle_in_transaction_session_timeout = {lock_hold_s() * 1000}"
                )
            )
            key = {"k": stable_int(f"kdsearch:{name}", bits=64) - (1 << 63)}
            if wait:
                conn.execute(sqlalchemy.text(f"SET LOCAL lock_timeout = {LOCK_WAIT_S * 1000}"))
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), key)
                except sqlalchemy.exc.OperationalError as exc:
                    if "lock timeout" not in str(exc):
                        raise
                    raise LockBusy(
                        f"study {name!r}: its lock was held by another process for "
                        f"{LOCK_WAIT_S} s; trying again"
                    ) from None
                held = True
            else:
                held = bool(
                    conn.execute(
                        sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:k)"), key
                    ).scalar()
                )
            if not held:
                transaction.rollback()
                yield False
                return
            with _bound(storage, conn):
                yield True
            transaction.commit()
            return
        database = engine.url.database or "kdsearch"
        lock = Path(f"{database}.{stable_hash(f'kdsearch:{name}', length=12)}.lock")
        with file_lock(lock, wait=wait) as held:
            if not held:
                yield False
                return
            transaction = conn.begin()
            with _bound(storage, conn):
                yield True
            transaction.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            conn.rollback()
        if held:
            forget_cached_trials(storage)
        raise
    finally:
        with contextlib.suppress(Exception):
            conn.close()


@contextlib.contextmanager
def _bound(storage: KdsearchStorage, conn: sqlalchemy.engine.Connection) -> Iterator[None]:
    """Optuna's calls from this thread go through ``conn``'s transaction: its scoped
    session is replaced, for this thread only, by one joined to that transaction (each of
    Optuna's commits becomes a savepoint's release)."""
    session = Session(bind=conn, join_transaction_mode="create_savepoint")
    registry = storage.scoped_session.registry
    previous = registry() if registry.has() else None
    registry.set(session)
    try:
        yield
    finally:
        session.close()
        if previous is not None:
            registry.set(previous)
        else:
            registry.clear()


_CACHES: dict[int, list[Any]] = {}  # id(KdsearchStorage) -> optuna's caches wrapping it
_CACHES_LOCK = threading.Lock()


def track_cache(study: optuna.Study) -> optuna.Study:
    """Remember the trial cache Optuna wraps ``study``'s storage in, so a rolled-back
    critical section can empty it (``forget_cached_trials``)."""
    cache = study._storage
    backend = getattr(cache, "_backend", None)
    if backend is not None:
        with _CACHES_LOCK:
            _CACHES.setdefault(id(backend), []).append(cache)
    return study


def forget_cached_trials(storage: KdsearchStorage) -> None:
    """Empty Optuna's trial caches over ``storage``: after a rolled-back critical section
    they may hold trials that were never committed."""
    with _CACHES_LOCK:
        caches = list(_CACHES.get(id(storage), []))
    for cache in caches:
        with cache._lock:
            cache._studies.clear()
            cache._trial_id_to_study_id_and_number.clear()
            cache._study_id_and_number_to_trial_id.clear()


def assets_lock(storage: optuna.storages.RDBStorage, name: str) -> AbstractContextManager[None]:
    """Serialise building the study assets ``name`` across machines. Building can take
    minutes (fine-tuning a teacher): a session-level advisory lock (it dies with its
    session, so a killed holder never blocks the others), polled, so a stop signal still
    reaches the waiters. SQLite: a file lock."""
    return _polled_lock(storage, f"kdsearch-assets:{name}", poll_s=1.0)


@contextlib.contextmanager
def _polled_lock(storage: optuna.storages.RDBStorage, name: str, poll_s: float) -> Iterator[None]:
    engine = storage.engine
    if engine.dialect.name == "postgresql":
        key = {"k": stable_int(name, bits=64) - (1 << 63)}
        with engine.connect() as conn:
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
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created with its folder): serialises the
    processes of one machine, and is released by the kernel if the holder dies. Waiters
    say every ``LOCK_WAIT_S`` who holds it. Yields whether it is held (False only with
    ``wait=False``, when another process holds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        waited = 0.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                time.sleep(0.05)
                waited += 0.05
                if waited >= LOCK_WAIT_S:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    logger.warning("waiting for %s, held by process %s", path.name, holder)
                    waited = 0.0
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
