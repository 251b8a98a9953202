"""Health and readiness endpoints, Prometheus metrics and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
from conftest import EVALUATION_DATE, spine_request
from prometheus_client import REGISTRY

from cds_service import create_app
from cds_service.config import Settings
from cds_service.logs import RedactSecrets, configure_logging, scrub

SIGN = "pain-management-order-sign"
# A JWT-shaped string (header {"alg":"ES384"}, payload {"iss":"x"}) and a bearer token.
JWT = "eyJhbGciOiJFUzM4NCJ9.eyJpc3MiOiJ4In0.c2lnbmF0dXJl"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- /healthz and /readyz ---------------------------------------------------------


def test_healthz_is_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_checks_the_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok"}


def test_readyz_is_503_with_an_operation_outcome_when_the_database_is_gone(
    tmp_path, guideline
):
    folder = tmp_path / "db"
    folder.mkdir()
    settings = Settings(auth=False, database_url=f"sqlite:///{folder / 'a.sqlite'}")
    app = create_app(settings, guideline=guideline)
    client = app.test_client()
    assert client.get("/readyz").status_code == 200

    shutil.rmtree(folder)
    app.extensions["store"].dispose()  # pooled connections would hide the loss

    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/fhir+json"
    assert response.get_json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "transient",
                "diagnostics": "Not ready: database unreachable (OperationalError)",
            }
        ],
    }
    # Liveness stays green: a database outage is no reason to restart the process.
    assert client.get("/healthz").status_code == 200


def test_health_and_metrics_need_no_token(tmp_path, guideline):
    settings = Settings(auth=True, database_url=f"sqlite:///{tmp_path / 'a.sqlite'}")
    client = create_app(settings, guideline=guideline).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/cds-services").status_code == 401


# --- /metrics -------------------------------------------------------------------------


def test_metrics_count_calls_determinations_and_latency(app, client):
    calls = dict(service=SIGN, hook="order-sign", status="200")
    before = {
        "calls": sample("pain_cds_hook_calls_total", **calls),
        "latency": sample("pain_cds_hook_duration_seconds_count", service=SIGN),
    }
    with client.post(
        f"/cds-services/{SIGN}", json=spine_request("http://127.0.0.1:9/fhir")
    ) as response:
        assert response.status_code == 200
    audit = app.extensions["store"].calls()[-1]
    [determination] = audit["determinations"]
    assert determination["code"] == "62323"
    determinations_before = sample(
        "pain_cds_determinations_total", **determination
    )  # read after the call: the label pair is known only now
    assert sample("pain_cds_hook_calls_total", **calls) == before["calls"] + 1
    assert (
        sample("pain_cds_hook_duration_seconds_count", service=SIGN)
        == before["latency"] + 1
    )
    assert determinations_before >= 1

    with client.post(
        f"/cds-services/{SIGN}", json=spine_request("http://127.0.0.1:9/fhir")
    ):
        pass
    assert (
        sample("pain_cds_determinations_total", **determination)
        == determinations_before + 1
    )

    text = client.get("/metrics").get_data(as_text=True)
    assert (
        'pain_cds_hook_calls_total{hook="order-sign",'
        f'service="{SIGN}",status="200"}} {before["calls"] + 2}'
    ) in text


def test_refused_calls_are_counted_by_status_and_unknown_services_pooled(client):
    bad = dict(service=SIGN, hook="order-sign", status="400")
    unknown = dict(service="unknown", hook="unknown", status="404")
    before = (
        sample("pain_cds_hook_calls_total", **bad),
        sample("pain_cds_hook_calls_total", **unknown),
    )
    assert client.post(f"/cds-services/{SIGN}", json={"hook": 1}).status_code == 400
    assert client.post("/cds-services/nope-1", json={}).status_code == 404
    assert client.post("/cds-services/nope-2", json={}).status_code == 404
    assert sample("pain_cds_hook_calls_total", **bad) == before[0] + 1
    assert sample("pain_cds_hook_calls_total", **unknown) == before[1] + 2


def test_metrics_count_fhir_fallback_queries_and_failures(client, fhir_stub):
    body = spine_request(fhir_stub.url)
    del body["prefetch"]["conditions"]
    del body["prefetch"]["procedures"]
    fhir_stub.reply("Condition", body={"resourceType": "Bundle", "type": "searchset"})
    fhir_stub.reply("Procedure", status=500, body={"resourceType": "OperationOutcome"})
    before = {
        key: (
            sample("pain_cds_fhir_fallback_queries_total", query=key),
            sample("pain_cds_fhir_fallback_failures_total", query=key),
        )
        for key in ("conditions", "procedures")
    }
    assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
    assert sample("pain_cds_fhir_fallback_queries_total", query="conditions") == (
        before["conditions"][0] + 1
    )
    assert (
        sample("pain_cds_fhir_fallback_failures_total", query="conditions")
        == (before["conditions"][1])
    )
    assert sample("pain_cds_fhir_fallback_queries_total", query="procedures") == (
        before["procedures"][0] + 1
    )
    assert sample("pain_cds_fhir_fallback_failures_total", query="procedures") == (
        before["procedures"][1] + 1
    )


def test_metrics_are_the_prometheus_text_format(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == (
        "text/plain; version=1.0.0; charset=utf-8"
    )
    types = [
        line
        for line in response.get_data(as_text=True).splitlines()
        if line.startswith("# TYPE pain_cds_")
    ]
    assert types == [
        "# TYPE pain_cds_hook_calls_total counter",
        "# TYPE pain_cds_hook_duration_seconds histogram",
        "# TYPE pain_cds_determinations_total counter",
        "# TYPE pain_cds_fhir_fallback_queries_total counter",
        "# TYPE pain_cds_fhir_fallback_failures_total counter",
    ]


# --- logs -----------------------------------------------------------------------------


@pytest.fixture
def json_log():
    """The root logger as `serve` sets it up, writing into a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging(Settings(log_format="json", log_level="INFO"))
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    yield buffer
    root.handlers[:], level = saved
    root.setLevel(level)


def test_a_hook_call_is_one_json_line_without_token_or_patient(json_log, guideline):
    settings = Settings(
        auth=False, database_url="sqlite://", evaluation_date=EVALUATION_DATE
    )
    client = create_app(settings, guideline=guideline).test_client()
    body = spine_request("http://127.0.0.1:9/fhir")
    body["fhirAuthorization"] = {
        "access_token": "secret-ehr-token-123",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds-service",
    }
    response = client.post(
        f"/cds-services/{SIGN}",
        json=body,
        headers={"Authorization": f"Bearer {JWT}"},
    )
    assert response.status_code == 200

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    [call] = [line for line in lines if line["message"] == "hook call"]
    assert call["hookInstance"] == body["hookInstance"]
    assert call["service"] == SIGN
    assert call["status"] == 200
    assert isinstance(call["duration_ms"], float)
    # Authentication is off here: the call's one line is also its warning.
    assert (call["level"], call["auth"]) == ("WARNING", "off")
    assert [
        line for line in lines if line["message"].startswith("unauthenticated")
    ] == []
    assert call["logger"] == "cds_service.api"
    assert call["time"].endswith("+00:00")
    text = json_log.getvalue()
    patient = body["prefetch"]["patient"]
    for secret in ("secret-ehr-token-123", JWT, patient["birthDate"]):
        assert secret not in text
    for name in patient["name"]:
        assert name["family"] not in text


def test_a_hook_instance_that_is_not_a_uuid_is_not_logged(json_log, guideline):
    settings = Settings(
        auth=False, database_url="sqlite://", evaluation_date=EVALUATION_DATE
    )
    client = create_app(settings, guideline=guideline).test_client()
    body = spine_request("http://127.0.0.1:9/fhir")
    body["hookInstance"] = "Zebediah Quuxlington born 1961-07-14"

    assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    [call] = [line for line in lines if line["message"] == "hook call"]
    assert (call["hookInstance"], call["status"]) == (None, 200)
    assert "Quuxlington" not in json_log.getvalue()


def test_secrets_are_scrubbed_from_messages_arguments_and_extras(json_log):
    logging.getLogger("cds_service.test").warning(
        "refused %s from %s",
        f"Bearer {JWT}",
        "ehr",
        extra={
            "authorization": "Basic dXNlcjpwYXNz",
            "details": {"token": "abc", "header": f"x {JWT} y"},
        },
    )
    [line] = [json.loads(text) for text in json_log.getvalue().splitlines()]
    assert line["message"] == "refused Bearer [redacted] from ehr"
    assert line["authorization"] == "[redacted]"
    assert line["details"] == {"token": "[redacted]", "header": "x [redacted] y"}


def test_scrub_leaves_ordinary_text_alone():
    assert scrub("epidural 62323 at L4-L5, bearer of news") == (
        "epidural 62323 at L4-L5, bearer of news"
    )
    assert scrub(f"token={JWT}") == "token=[redacted]"


def test_redaction_applies_to_records_of_every_logger():
    record = logging.makeLogRecord(
        {"msg": "jwt %s", "args": (JWT,), "access_token": "t0ken"}
    )
    assert RedactSecrets().filter(record) is True
    assert record.getMessage() == "jwt [redacted]"
    assert record.access_token == "[redacted]"


def test_patient_ids_in_fhir_urls_are_scrubbed():
    assert scrub(
        "Retrying (total=1) after connection broken by 'NewConnectionError': "
        "/fhir/Condition?patient=0b575c00-26a1&code=http://loinc.org|72514-3"
    ) == (
        "Retrying (total=1) after connection broken by 'NewConnectionError': "
        "/fhir/Condition?[redacted]"
    )
    assert scrub("GET https://ehr.example/fhir/Patient/0b575c00-26a1 HTTP/1.1") == (
        "GET https://ehr.example/fhir/Patient/[redacted] HTTP/1.1"
    )
