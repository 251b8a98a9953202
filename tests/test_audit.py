"""Audit of every hook call and the JWT replay cache, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask, Response, g, jsonify, request

from cds_service import storage
from cds_service.errors import Issue, ServiceError, register_error_handlers

SECRET_TOKEN = "eyJhbGciOiJFUzM4NCJ9.c2VjcmV0LXRva2VuLW5ldmVyLXN0b3JlZA.sig"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HI = {i: f"d5b6a3c2-1f0e-4d9c-8b7a-6e5f4d3c2b{i:02d}" for i in range(1, 10)}


@pytest.fixture
def audited_client(store):
    """A bare app whose hook handler behaves like api.py: it sets g.audit_entry."""
    app = Flask(__name__)
    register_error_handlers(app)
    storage.init_app(app, store=store)

    @app.before_request
    def refuse_without_token():
        # Stands in for auth.init_app: a refused call never reaches the handler.
        if request.method == "POST" and "Authorization" not in request.headers:
            return Response(status=401)
        return None

    @app.post("/cds-services/<service_id>")
    def hook(service_id):
        body = request.get_json()
        if body.get("hook") != "order-sign":
            raise ServiceError(400, Issue("hook: wrong hook", expression="hook"))
        g.audit_entry = {
            "hook_instance": body["hookInstance"],
            "service": service_id,
            "hook": body["hook"],
            "order_codes": ["64493", "97110"],
            "determinations": [{"code": "64493", "outcome": "not-covered"}],
            "card_summaries": ["Remove 64493 lumbar/sacral facet injection"],
            "access_token": SECRET_TOKEN,  # must never reach the store
        }
        return jsonify({"cards": []})

    @app.get("/cds-services")
    def discovery():
        return jsonify({"services": []})

    return app.test_client()


def call(client, body, token=True):
    headers = {"Authorization": f"Bearer {SECRET_TOKEN}"} if token else {}
    with client.post(
        "/cds-services/pain-management-order-sign", json=body, headers=headers
    ) as r:
        return r.status_code


def test_answered_call_is_recorded_with_every_field(audited_client, store):
    before = datetime.now(UTC)
    status = call(audited_client, {"hook": "order-sign", "hookInstance": HI[1]})

    assert status == 200
    [row] = store.calls()
    assert row["hook_instance"] == HI[1]
    assert row["service"] == "pain-management-order-sign"
    assert row["hook"] == "order-sign"
    assert row["order_codes"] == ["64493", "97110"]
    assert row["determinations"] == [{"code": "64493", "outcome": "not-covered"}]
    assert row["card_summaries"] == ["Remove 64493 lumbar/sacral facet injection"]
    assert row["status"] == 200
    assert 0 < row["duration_ms"] < 5000
    assert before - timedelta(seconds=1) <= row["at"] <= datetime.now(UTC)


def test_refused_and_rejected_calls_are_recorded_too(audited_client, store):
    call(audited_client, {"hook": "order-select", "hookInstance": HI[2]})
    call(audited_client, {"hook": "order-sign", "hookInstance": HI[3]}, token=False)

    rows = store.calls()
    assert [(r["status"], r["hook_instance"], r["hook"]) for r in rows] == [
        (400, HI[2], "order-select"),
        # The body of an unauthenticated call is not even read.
        (401, None, None),
    ]
    assert all(r["service"] == "pain-management-order-sign" for r in rows)


@pytest.mark.parametrize(
    "hook, hook_instance, recorded",
    [
        ("Zzyzxfamily-1931-07-19", "Zzyzx family 1931-07-19", ("unsupported", None)),
        ("patient-view", HI[7].upper(), ("unsupported", HI[7])),
        ({"name": "x"}, "x" * 5000, ("unsupported", None)),
        ("order-select", "fixture-tpi-routine", ("order-select", None)),
        (None, None, (None, None)),
    ],
)
def test_caller_text_is_never_stored(
    audited_client, store, hook, hook_instance, recorded
):
    call(audited_client, {"hook": hook, "hookInstance": hook_instance})

    [row] = store.calls()
    assert (row["hook"], row["hook_instance"]) == recorded
    assert row["status"] == 400


def test_caller_codes_and_service_paths_are_not_stored_as_sent(store):
    store.record_call(
        {
            "hook_instance": HI[8],
            "service": "pain-management-order-sign",
            "hook": "order-sign",
            "order_codes": ["64493", "J1170", "Zzyzx 1931-07-19", 97110, "0766T"],
            "determinations": [{"code": "Zzyzx", "outcome": "covered", "x": "y"}],
            "card_summaries": [],
            "status": 200,
            "duration_ms": 1.0,
        }
    )

    [row] = store.calls()
    assert row["order_codes"] == ["64493", "J1170", "other", "other", "0766T"]
    assert row["determinations"] == [{"code": "other", "outcome": "covered"}]


def test_a_call_to_an_unknown_service_path_is_recorded_as_unsupported(client, app):
    with client.post("/cds-services/Zzyzxfamily-1931-07-19", json={}) as response:
        assert response.status_code == 404
    [row] = app.extensions["store"].calls()
    assert (row["service"], row["hook"], row["status"]) == ("unsupported", None, 404)


def test_other_endpoints_are_not_hook_calls(audited_client, store):
    with audited_client.get("/cds-services") as response:
        assert response.status_code == 200
    assert store.calls() == []


def test_no_token_is_ever_stored(audited_client, store, tmp_path):
    call(audited_client, {"hook": "order-sign", "hookInstance": HI[4]})
    call(audited_client, {"hook": "order-sign", "hookInstance": HI[5]}, token=False)

    dumped = json.dumps(store.calls(), default=str)
    assert SECRET_TOKEN not in dumped and "access_token" not in dumped
    if store.dialect == "sqlite":
        database = Path(store.engine.url.database)
        for path in database.parent.glob(database.name + "*"):  # file, -wal, -shm
            assert SECRET_TOKEN.encode() not in path.read_bytes()


def test_schema_is_created_on_start(store):
    tables = set(sa.inspect(store.engine).get_table_names(schema=store.schema))
    assert {
        "cds_audit_call",
        "cds_feedback",
        "cds_issued_card",
        "cds_jwt_jti",
    } <= tables
    store.create_schema()  # a second start (another worker) changes nothing


def test_the_service_audits_its_hook_calls(client, app):
    body = json.loads(
        next(FIXTURES.rglob("facet-myofascial-excluded.json")).read_text()
    )
    body["hookInstance"] = HI[6]
    with client.post("/cds-services/pain-management-order-sign", json=body) as response:
        assert response.status_code == 200
    [row] = app.extensions["store"].calls()
    assert row["hook_instance"] == body["hookInstance"]
    assert row["determinations"] == [{"code": "64493", "outcome": "not-covered"}]
    assert row["card_summaries"] == [
        "Remove 64493 lumbar/sacral facet injection, not covered: myofascial pain, "
        "where a facet block is not indicated"
    ]


# --- the audit writer: rows written behind the answers ------------------------------


def _entry(n: int, status: int = 200) -> dict:
    return {
        "hook_instance": HI[n],
        "service": "pain-management-order-sign",
        "hook": "order-sign",
        "order_codes": ["62323"],
        "determinations": [{"code": "62323", "outcome": "covered"}],
        "card_summaries": [],
        "status": status,
        "duration_ms": 4.0,
    }


def _reader(store):
    """Another Store on the same database: it sees only what was committed."""
    return storage.Store(store.url, schema=store.schema)


def _wait_for_rows(reader, count: int, seconds: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        rows = reader.calls()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def test_queued_rows_are_written_without_anyone_asking(store):
    writer = storage.AuditWriter(store, interval=0.05)
    for n in (1, 2, 3):
        writer.put(_entry(n))

    rows = _wait_for_rows(_reader(store), 3)

    assert [row["hook_instance"] for row in rows] == [HI[1], HI[2], HI[3]]
    assert [row["status"] for row in rows] == [200, 200, 200]


def test_a_row_after_a_quiet_spell_is_written_within_the_interval(store):
    # The thread has written the first row and sleeps until the next one comes.
    writer = storage.AuditWriter(store, interval=0.05)
    reader = _reader(store)
    writer.put(_entry(1))
    assert len(_wait_for_rows(reader, 1)) == 1
    time.sleep(0.3)

    writer.put(_entry(2))
    started = time.monotonic()
    rows = _wait_for_rows(reader, 2, seconds=3.0)

    assert [row["hook_instance"] for row in rows] == [HI[1], HI[2]]
    assert time.monotonic() - started < 1.0


def test_many_calls_share_one_commit_in_the_order_they_came(store, monkeypatch):
    commits = []
    write = store.record_calls
    monkeypatch.setattr(
        store, "record_calls", lambda rows: (commits.append(len(rows)), write(rows))
    )
    writer = storage.AuditWriter(store, interval=30, batch=1_000)
    for n in range(1, 10):
        writer.put(_entry(n))
    writer.flush()

    assert commits == [9]
    assert [row["hook_instance"] for row in store.calls()] == [
        HI[n] for n in range(1, 10)
    ]


def test_a_full_queue_is_written_by_the_caller_not_dropped(store):
    # The thread would wait 30 s; the third row makes the answering thread write.
    writer = storage.AuditWriter(store, interval=30, batch=1_000, max_pending=3)
    for n in (1, 2, 3):
        writer.put(_entry(n))

    assert [row["hook_instance"] for row in _reader(store).calls()] == [
        HI[1],
        HI[2],
        HI[3],
    ]


def test_reading_the_audit_includes_calls_still_queued(store):
    writer = store.audit
    writer.interval = 30
    writer.put(_entry(4))

    assert [row["hook_instance"] for row in store.calls()] == [HI[4]]


def test_a_failing_database_loses_the_rows_with_a_log_line_not_the_call(
    store, monkeypatch, caplog
):
    def refuse(rows):
        raise sa.exc.OperationalError("INSERT", {}, Exception("database is gone"))

    monkeypatch.setattr(store, "record_calls", refuse)
    writer = storage.AuditWriter(store, interval=30)
    writer.put(_entry(5))
    writer.put(_entry(6))
    writer.flush()

    [record] = [r for r in caplog.records if r.name == "cds_service.storage"]
    assert (record.levelname, record.getMessage(), record.rows) == (
        "ERROR",
        "audit records not written",
        2,
    )


def test_an_idle_writer_holds_no_thread(store):
    writer = storage.AuditWriter(store, interval=0.01, idle_seconds=0.05)
    writer.put(_entry(7))
    thread = writer._thread

    thread.join(timeout=5)

    assert not thread.is_alive() and writer._thread is None
    writer.put(_entry(8))  # a later call starts another
    assert [row["hook_instance"] for row in _wait_for_rows(_reader(store), 2)] == [
        HI[7],
        HI[8],
    ]


def test_a_process_leaving_writes_what_it_still_held(store, tmp_path):
    # Without a flush and with the thread asleep for a minute: the exit handler
    # writes the row (gunicorn workers leave the same way on a graceful stop).
    script = tmp_path / "leave.py"
    script.write_text(
        "import sys\n"
        "from cds_service import storage\n"
        "store = storage.Store(sys.argv[1], schema=sys.argv[2] or None)\n"
        "store.audit.interval = 60\n"
        f"store.audit.put({_entry(9)!r})\n"
    )
    subprocess.run(
        [sys.executable, str(script), store.url, store.schema or ""],
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    )

    assert [row["hook_instance"] for row in store.calls()] == [HI[9]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_does_not_write_its_parents_rows(store):
    writer = storage.AuditWriter(store, interval=30)
    writer.put(_entry(1))  # pending in the parent when gunicorn forks
    child = os.fork()
    if child == 0:  # the worker: its own row only
        try:
            writer.put(_entry(2))
            writer.flush()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    writer.flush()

    assert sorted(row["hook_instance"] for row in store.calls()) == [HI[1], HI[2]]


# --- JWT jti replay cache ------------------------------------------------------------


def test_a_jti_is_accepted_once(store):
    expires = datetime.now(UTC) + timedelta(minutes=5)
    assert store.remember_jti("https://ehr.example.org", "jti-1", expires) is True
    assert store.remember_jti("https://ehr.example.org", "jti-1", expires) is False
    assert store.remember_jti("https://other.example.org", "jti-1", expires) is True


def test_an_expired_jti_no_longer_blocks(store):
    past = datetime.now(UTC) - timedelta(seconds=1)
    assert store.remember_jti("https://ehr.example.org", "jti-2", past) is True
    future = datetime.now(UTC) + timedelta(minutes=5)
    assert store.remember_jti("https://ehr.example.org", "jti-2", future) is True
    assert store.remember_jti("https://ehr.example.org", "jti-2", future) is False


def test_concurrent_replays_let_exactly_one_through(store):
    expires = datetime.now(UTC) + timedelta(minutes=5)
    results = []
    start = threading.Barrier(8)

    def attempt():
        start.wait()
        results.append(store.remember_jti("https://ehr.example.org", "jti-3", expires))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_naive_datetimes_are_refused(store):
    with pytest.raises(sa.exc.StatementError):
        store.remember_jti("https://ehr.example.org", "jti-4", datetime(2030, 1, 1))
