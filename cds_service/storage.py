"""The service's record in SQL: hook-call audit, feedback, issued cards, JWT ids."""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from flask import Flask, Response, g, request
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

EXTENSION_KEY = "store"

# A hook call is a POST to /cds-services/{id}; feedback has its own path below it.
_HOOK_PATH = re.compile(r"^/cds-services/[^/]+/?$")
_AUDIT_FIELDS = (
    "hook_instance",
    "service",
    "hook",
    "order_codes",
    "determinations",
    "card_summaries",
)

# What a caller sends is stored only when it is one of a few known shapes, so that
# free text (a patient's name or birth date typed into the wrong field) never
# reaches the record: hooks we serve, uuids, billing-code-shaped codes.
SERVED_HOOKS = ("order-select", "order-sign")
UNSUPPORTED = "unsupported"
_UUID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE
)
# CPT (5 digits, or 4 digits and a letter) and HCPCS Level II (a letter, 4 digits).
_BILLING_CODE = re.compile(r"^(?:[0-9]{4}[0-9A-Z]|[A-Z][0-9]{4})$")


class UTCDateTime(sa.types.TypeDecorator):
    """Timestamps stored as naive UTC everywhere, read back as aware UTC.

    SQLite has no time zones; storing naive UTC on every backend keeps comparisons
    (jti expiry, report windows) identical on SQLite and PostgreSQL.
    """

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None else None


metadata = sa.MetaData()

audit_calls = sa.Table(
    "cds_audit_call",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False, index=True),
    sa.Column("hook_instance", sa.String(128)),
    sa.Column("service", sa.String(128)),
    sa.Column("hook", sa.String(64)),
    sa.Column("order_codes", sa.JSON, nullable=False),
    sa.Column("determinations", sa.JSON, nullable=False),
    sa.Column("card_summaries", sa.JSON, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
)

feedback = sa.Table(
    "cds_feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("service", sa.String(128), nullable=False),
    sa.Column("card", sa.String(128), nullable=False, index=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("outcome_timestamp", UTCDateTime, nullable=False),
    sa.Column("accepted_suggestions", sa.JSON, nullable=False),
    sa.Column("override_system", sa.String(512)),
    sa.Column("override_code", sa.String(256)),
    sa.Column("override_display", sa.String(512)),
    sa.Column("user_comment", sa.Text),
    # CDS Hooks lets the same card get feedback more than once (each with its own
    # outcomeTimestamp); the same item sent twice is one item.
    sa.UniqueConstraint(
        "service", "card", "outcome", "outcome_timestamp", name="uq_cds_feedback_item"
    ),
)

issued_cards = sa.Table(
    "cds_issued_card",
    metadata,
    sa.Column("uuid", sa.String(64), primary_key=True),
    sa.Column("order_fingerprint", sa.String(64), nullable=False, index=True),
    sa.Column("stance", sa.String(32), nullable=False),
    sa.Column("summary", sa.String(200), nullable=False),
    sa.Column("first_issued_at", UTCDateTime, nullable=False),
)

jwt_ids = sa.Table(
    "cds_jwt_jti",
    metadata,
    sa.Column("issuer", sa.String(512), primary_key=True),
    sa.Column("jti", sa.String(256), primary_key=True),
    sa.Column("expires_at", UTCDateTime, nullable=False, index=True),
)


@dataclass(frozen=True)
class FeedbackItem:
    """One validated CDS Hooks feedback item."""

    card: str
    outcome: str
    outcome_timestamp: datetime
    accepted_suggestions: tuple[str, ...] = ()
    override_system: str | None = None
    override_code: str | None = None
    override_display: str | None = None
    user_comment: str | None = None


class Store:
    """SQLAlchemy store: one engine per process, one session per unit of work.

    `url` is any SQLAlchemy URL (SQLite file by default, PostgreSQL in production);
    `schema` puts the tables in another PostgreSQL schema (tests use one each).
    """

    def __init__(self, url: str, *, schema: str | None = None):
        self.url = url
        self.schema = schema
        self._engine: Engine | None = None
        self._pid: int | None = None
        self._sessions: sessionmaker | None = None
        self._lock = threading.Lock()
        self._last_purge = 0.0
        # uuids this process already wrote: the same card issued again (the usual
        # case while a clinician edits an order set) costs no write.
        self._known_cards: set[str] = set()
        self.audit = AuditWriter(self)

    @property
    def engine(self) -> Engine:
        # Engines must not cross a fork (gunicorn workers): each process makes its own.
        if self._engine is None or self._pid != os.getpid():
            with self._lock:
                if self._engine is None or self._pid != os.getpid():
                    self._engine = self._create_engine()
                    self._pid = os.getpid()
                    self._sessions = sessionmaker(self._engine)
        return self._engine

    def _create_engine(self) -> Engine:
        url = sa.engine.make_url(self.url)
        # Bound values (card text, hookInstance, jti) never reach a log line or an
        # exception message, whatever level the operator sets for sqlalchemy.
        options: dict = {"pool_pre_ping": True, "hide_parameters": True}
        if url.get_backend_name() == "postgresql":
            # Readiness checks and audit writes must not hang on an unreachable host.
            options["connect_args"] = {"connect_timeout": 5}
        if url.get_backend_name() == "sqlite":
            options = {
                "hide_parameters": True,
                "connect_args": {"timeout": 10, "check_same_thread": False},
            }
        engine = sa.create_engine(url, **options)
        if url.get_backend_name() == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        if self.schema:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        return engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        self.engine  # noqa: B018 (creates the engine and session factory)
        with self._sessions() as session, session.begin():
            yield session

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create_schema(self) -> None:
        """Create the tables if missing; safe when several workers start at once."""
        with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                if self.schema:
                    connection.execute(
                        sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                    )
                # Serialises concurrent create_all calls of replicas starting together.
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(74657301)"))
            metadata.create_all(connection)

    def drop_schema(self) -> None:
        with self.engine.begin() as connection:
            if self.dialect == "postgresql" and self.schema:
                connection.execute(
                    sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                )
            else:
                metadata.drop_all(connection)

    def dispose(self) -> None:
        self.audit.flush()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- audit -----------------------------------------------------------------

    def record_call(self, entry: dict) -> None:
        """Store one hook call now; only the audit fields are kept (never a token)."""
        self.record_calls([audit_row(entry)])

    def record_calls(self, rows: list[dict]) -> None:
        """Store rows made by `audit_row`, in one transaction and one statement."""
        if not rows:
            return
        # A Core insert with a list of parameters is one executemany, its compiled
        # form cached: a batch costs little more than a single row.
        with self.engine.begin() as connection:
            connection.execute(audit_calls.insert(), rows)

    def calls(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[dict]:
        # This process's calls not yet written are part of the answer.
        self.audit.flush()
        return self._rows(audit_calls, audit_calls.c.at, since, until)

    def _rows(self, table, at, since, until) -> list[dict]:
        """The rows of `table` whose time `at` is in [since, until), oldest first."""
        query = sa.select(table).order_by(table.c.id)
        if since:
            query = query.where(at >= since)
        if until:
            query = query.where(at < until)
        with self.session() as session:
            return [dict(row._mapping) for row in session.execute(query)]

    # --- feedback --------------------------------------------------------------

    def add_feedback(self, service: str, items: Iterable[FeedbackItem]) -> int:
        """Store feedback items; returns how many were new (duplicates are skipped)."""
        now = datetime.now(UTC)
        rows = [
            {
                "received_at": now,
                "service": service,
                "card": item.card,
                "outcome": item.outcome,
                "outcome_timestamp": item.outcome_timestamp,
                "accepted_suggestions": list(item.accepted_suggestions),
                "override_system": item.override_system,
                "override_code": item.override_code,
                "override_display": item.override_display,
                "user_comment": item.user_comment,
            }
            for item in items
        ]
        with self.session() as session:
            return self._insert_many_new(session, feedback, rows)

    def feedback_items(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[dict]:
        return self._rows(feedback, feedback.c.received_at, since, until)

    # --- cards (the accepted-card rule of cards.build_response) -----------------

    def remember_cards(self, cards) -> None:
        cards = [card for card in cards if card.uuid not in self._known_cards]
        if not cards:
            return
        now = datetime.now(UTC)
        with self.session() as session:
            for card in cards:
                self._insert_new(
                    session,
                    issued_cards,
                    {
                        "uuid": card.uuid,
                        "order_fingerprint": card.order_fingerprint,
                        "stance": card.stance,
                        "summary": card.summary[:200],
                        "first_issued_at": now,
                    },
                )
        if len(self._known_cards) > 100_000:
            self._known_cards.clear()
        self._known_cards.update(card.uuid for card in cards)

    def accepted_stances(self, fingerprints: list[str]) -> dict[str, set[str]]:
        """Stances of the cards accepted for these orders.

        A card counts as accepted when its latest feedback (by outcomeTimestamp)
        is `accepted`: a later override withdraws the acceptance.
        """
        if not fingerprints:
            return {}
        query = (
            sa.select(
                issued_cards.c.order_fingerprint,
                issued_cards.c.stance,
                feedback.c.outcome,
                feedback.c.outcome_timestamp,
                feedback.c.card,
            )
            .join(feedback, feedback.c.card == issued_cards.c.uuid)
            .where(issued_cards.c.order_fingerprint.in_(fingerprints))
            .order_by(feedback.c.outcome_timestamp, feedback.c.id)
        )
        latest: dict[str, tuple[str, str, str]] = {}
        with self.session() as session:
            for fingerprint, stance, outcome, _, card in session.execute(query):
                latest[card] = (fingerprint, stance, outcome)
        result: dict[str, set[str]] = {}
        for fingerprint, stance, outcome in latest.values():
            if outcome == "accepted":
                result.setdefault(fingerprint, set()).add(stance)
        return result

    # --- JWT replay cache --------------------------------------------------------

    def remember_jti(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        """Record a token id until it expires; False when it was seen before.

        The primary key (issuer, jti) makes the check atomic across replicas that
        share the database: of two concurrent calls with one token, one insert wins.
        """
        now = datetime.now(UTC)
        with self.session() as session:
            # An expired entry for the same id must not block it forever.
            session.execute(
                jwt_ids.delete().where(
                    jwt_ids.c.issuer == issuer,
                    jwt_ids.c.jti == jti,
                    jwt_ids.c.expires_at < now,
                )
            )
            fresh = self._insert_new(
                session,
                jwt_ids,
                {"issuer": issuer, "jti": jti, "expires_at": expires_at},
            )
        self._purge_expired(now)
        return bool(fresh)

    def _purge_expired(self, now: datetime) -> None:
        # At most once a minute per process: the table stays as small as the set of
        # tokens still alive, without a delete on every call.
        if time.monotonic() - self._last_purge < 60:
            return
        self._last_purge = time.monotonic()
        with self.session() as session:
            session.execute(jwt_ids.delete().where(jwt_ids.c.expires_at < now))

    # --- helpers -----------------------------------------------------------------

    def _insert_many_new(
        self, session: Session, table: sa.Table, rows: list[dict]
    ) -> int:
        """Insert rows in one batched statement, skipping existing unique keys.

        Returns how many were inserted. One round trip per batch, not per row:
        a feedback call with a hundred items is one statement.
        """
        if not rows:
            return 0
        if self.dialect == "postgresql":
            statement = postgresql.insert(table).on_conflict_do_nothing()
        elif self.dialect == "sqlite":
            statement = sqlite.insert(table).on_conflict_do_nothing()
        else:
            return sum(self._insert_new(session, table, row) for row in rows)
        inserted = session.execute(
            statement.returning(*table.primary_key.columns), rows
        )
        return len(inserted.all())

    def _insert_new(self, session: Session, table: sa.Table, row: dict) -> int:
        """Insert unless a row with the same unique key exists; 1 if inserted."""
        if self.dialect == "postgresql":
            statement = postgresql.insert(table).values(**row).on_conflict_do_nothing()
        elif self.dialect == "sqlite":
            statement = sqlite.insert(table).values(**row).on_conflict_do_nothing()
        else:
            try:
                with session.begin_nested():
                    session.execute(table.insert().values(**row))
                return 1
            except IntegrityError:
                return 0
        # RETURNING, not rowcount: psycopg 3 reports -1 rows for this statement,
        # which read as "inserted" let a replayed jti through on PostgreSQL.
        inserted = session.execute(statement.returning(*table.primary_key.columns))
        return 1 if inserted.first() is not None else 0


def audit_row(entry: dict) -> dict:
    """The row stored for a hook call: the audit fields only, caller text made safe."""
    return {
        "at": entry.get("at") or datetime.now(UTC),
        "hook_instance": safe_hook_instance(entry.get("hook_instance")),
        "service": _text(entry.get("service"), 128),
        "hook": safe_hook(entry.get("hook")),
        "order_codes": [_code(code) for code in _list(entry.get("order_codes"))],
        "determinations": [
            {"code": _code(item.get("code")), "outcome": item.get("outcome")}
            for item in _list(entry.get("determinations"))
            if isinstance(item, dict)
        ],
        "card_summaries": list(entry.get("card_summaries") or []),
        "status": int(entry["status"]),
        "duration_ms": float(entry["duration_ms"]),
    }


class AuditWriter:
    """Hook-call rows written behind the answers, many calls to one commit.

    A row per call in a transaction of its own held each answering thread on the
    database (and, on SQLite, on the other workers' write lock) for longer than
    judging the order took. Rows are queued instead and a thread of this process
    writes what has gathered every `interval` seconds, or as soon as `batch` rows
    wait. Nothing is dropped to keep up: past `max_pending` waiting rows the
    answering thread writes them itself. Pending rows are written by `flush()`,
    which reading the audit, disposing of the store and leaving the process
    (gunicorn's graceful stop included) all call; only a process killed outright
    loses what it had not written, at most `interval` seconds of calls.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 0.1,
        batch: int = 100,
        max_pending: int = 5_000,
        idle_seconds: float = 30.0,
    ):
        self.store = store
        self.interval = interval
        self.batch = batch
        self.max_pending = max_pending
        self.idle_seconds = idle_seconds
        self._pid: int | None = None
        self._prepare()
        _writers.add(self)

    def _prepare(self) -> None:
        # Locks, the queue and the thread belong to one process: a forked gunicorn
        # worker starts empty (its parent writes its own rows) with a thread of its
        # own, started by the first call it answers.
        self._pid = os.getpid()
        self._pending: list[dict] = []
        self._wake = threading.Condition()
        self._writing = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, entry: dict) -> None:
        """Queue the audit row of one call."""
        try:
            row = audit_row(entry)
        except Exception:
            # Losing an audit row must not turn an answered call into an error.
            logger.exception("audit record not written")
            return
        if self._pid != os.getpid():
            self._prepare()
        with self._wake:
            self._pending.append(row)
            waiting = len(self._pending)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pain-cds-audit", daemon=True
                )
                self._thread.start()
            elif waiting == 1 or waiting >= self.batch:
                # The first row wakes the idle thread, which then gathers for
                # `interval`; a full batch cuts the gathering short.
                self._wake.notify()
        if waiting >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        """Write every row queued so far in this process, before returning."""
        if self._pid != os.getpid():
            return
        # Held while taking the rows and writing them, so rows reach the table in
        # the order they were queued, whoever writes them.
        with self._writing:
            with self._wake:
                rows, self._pending = self._pending, []
            self._write(rows)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._wake.wait_for(lambda: self._pending, self.idle_seconds):
                    # Idle: the thread ends and the next call starts another, so
                    # an app that is no longer called holds no thread.
                    self._thread = None
                    return
                # Gather for up to `interval`, so one commit carries many calls.
                self._wake.wait_for(
                    lambda: len(self._pending) >= self.batch, self.interval
                )
            self.flush()

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            return
        try:
            self.store.record_calls(rows)
        except Exception:
            # A database that fails must not fail the calls; the loss is logged.
            logger.exception("audit records not written", extra={"rows": len(rows)})


# Every writer, so that leaving the process writes what each still holds.
_writers: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


@atexit.register
def _flush_writers() -> None:
    for writer in list(_writers):
        writer.flush()


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets the report read while workers write; busy_timeout makes concurrent
    # writers wait instead of failing with "database is locked".
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    # In WAL mode NORMAL never corrupts the file; a power cut may lose the last
    # commits, an acceptable price for not waiting on fsync at every hook call.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def safe_hook(value: object) -> str | None:
    """The hook as recorded: one we serve, "unsupported" for anything else."""
    if value is None:
        return None
    return value if value in SERVED_HOOKS else UNSUPPORTED


def safe_hook_instance(value: object) -> str | None:
    """A hookInstance is kept only when it is a uuid (CDS Hooks 2.0 says it is)."""
    return value.lower() if isinstance(value, str) and _UUID.match(value) else None


def _code(value: object) -> str:
    return value if isinstance(value, str) and _BILLING_CODE.match(value) else "other"


def _list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else []


# --- Flask wiring ----------------------------------------------------------------


def init_app(app: Flask, settings=None, store: Store | None = None) -> Store:
    """Open the store (schema created now) and audit every hook call.

    The audit row is queued once the response is ready and written by the store's
    `AuditWriter`, so the database never adds to the caller's wait; status and
    duration are measured here, the rest comes from `flask.g.audit_entry` set by
    the handler.
    """
    if store is None:
        if settings is None:
            from cds_service.config import Settings

            settings = Settings.from_env()
        store = Store(settings.database_url)
    store.create_schema()
    app.extensions[EXTENSION_KEY] = store

    def start_clock() -> None:
        g.audit_started = time.perf_counter()

    def audit(response: Response) -> Response:
        if request.method != "POST" or not _HOOK_PATH.match(request.path):
            return response
        store.audit.put(_audit_entry(response))
        return response

    # First, so that calls refused by an earlier before_request (401) are timed too.
    app.before_request_funcs.setdefault(None, []).insert(0, start_clock)
    app.after_request(audit)
    return store


def _audit_entry(response: Response) -> dict:
    started = g.get("audit_started")
    duration = (time.perf_counter() - started) * 1000 if started else 0.0
    given = g.get("audit_entry") or _from_body(response.status_code)
    entry = {key: given.get(key) for key in _AUDIT_FIELDS}
    if not entry["service"]:
        entry["service"] = _served_service(
            (request.view_args or {}).get("service_id")
            or request.path.rstrip("/").rsplit("/", 1)[-1]
        )
    entry.update(
        at=datetime.now(UTC), status=response.status_code, duration_ms=duration
    )
    return entry


def _served_service(service_id: str) -> str:
    """The path's service id when it names one of ours, else "unsupported"."""
    from cds_service.api import SERVICES

    return service_id if service_id in SERVICES else UNSUPPORTED


def _from_body(status: int) -> dict:
    """hookInstance and hook of a call the handler did not answer (refused, broken).

    Bodies of unauthenticated or oversized calls are not read at all.
    """
    if status in (401, 413, 415) or not request.is_json:
        return {}
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        # json.loads gives up on deeply nested bodies before silent= can apply.
        return {}
    if not isinstance(body, dict):
        return {}
    return {"hook_instance": body.get("hookInstance"), "hook": body.get("hook")}
