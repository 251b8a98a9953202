"""A failing EHR: the FHIR fallback against a loopback stand-in that misbehaves."""

from __future__ import annotations

import collections
import io
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import jwt
import pytest
from conftest import EVALUATION_DATE, FIXTURES, REALDATA, spine_request
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service import create_app
from cds_service.config import Settings
from cds_service.hook_request import load_hook_request
from cds_service.logs import configure_logging
from cds_service.model import DataCategory
from cds_service.prefetch import QUERIES, FhirFetcher
from cds_service.record import UNAVAILABLE, build_record

TIMEOUT = 0.5  # per FHIR request
DEADLINE = 1.5  # for the whole fallback fetch
# Time allowed on top of the deadline for everything but the fetch itself.
MARGIN = 0.5
TOKEN = "ehr-access-token-3f9c"
SERVICE_OF_HOOK = {
    "order-select": "pain-management-order-select",
    "order-sign": "pain-management-order-sign",
}


def _outcome(code: str, text: str) -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def _condition(n: int, code: str = "M54.16") -> dict:
    return {
        "resourceType": "Condition",
        "id": f"c{n}",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}]
        },
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": "2025-01-10",
    }


def _bundle(entries: list[dict], next_url: str | None = None) -> dict:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": resource} for resource in entries],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


# A long history: one lumbar radiculopathy among 4,999 hypertension entries the
# guideline does not read (encoded once, so the stand-in answers at once).
LONG_HISTORY = json.dumps(
    _bundle([_condition(0)] + [_condition(n, "I10") for n in range(1, 5000)])
).encode()


class FhirStandIn:
    """A FHIR server on 127.0.0.1 whose answer per resource type is a named fault.

    Types without a fault answer an empty searchset Bundle. Every request is kept
    (path and Authorization header) so tests can see retries and paging.
    """

    def __init__(self):
        self.faults: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                stand_in.requests.append((self.path, self.headers.get("Authorization")))
                resource_type = urlsplit(self.path).path.split("/")[2]
                fault = stand_in.faults.get(resource_type)
                status, content_type, body = stand_in.answer(fault, self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), daemon=True
        ).start()

    def hits(self, resource_type: str) -> int:
        return sum(
            1 for path, _ in self.requests if path.startswith(f"/fhir/{resource_type}")
        )

    def answer(self, fault: str | None, path: str) -> tuple[int, str, bytes]:
        fhir_json = "application/fhir+json"
        if fault is None:
            return 200, fhir_json, json.dumps(_bundle([])).encode()
        if fault == "hang":
            self.release.wait(10)
            return 200, fhir_json, json.dumps(_bundle([])).encode()
        if fault == "slow":
            time.sleep(DEADLINE + 0.3)
            return 200, fhir_json, json.dumps(_bundle([_condition(1)])).encode()
        if fault.isdigit():
            body = _outcome("processing", f"stand-in answered {fault}")
            return int(fault), fhir_json, json.dumps(body).encode()
        if fault == "html":
            return 200, "text/html", b"<html><body>Service Unavailable</body></html>"
        if fault == "invalid-json":
            return 200, fhir_json, b'{"resourceType": "Bundle", "entry": [{'
        if fault == "operation-outcome":
            body = _outcome("too-costly", "search too broad")
            return 200, fhir_json, json.dumps(body).encode()
        if fault == "next-loop":
            # The next link points back at the page itself, forever.
            page = _bundle(
                [_condition(1)], next_url=self.url.rsplit("/fhir", 1)[0] + path
            )
            return 200, fhir_json, json.dumps(page).encode()
        if fault == "thousands":
            return 200, fhir_json, LONG_HISTORY
        if fault == "slow-503":
            time.sleep(0.7 * DEADLINE)
            return 503, fhir_json, json.dumps(_outcome("transient", "busy")).encode()
        if fault == "flaky-503":
            if self.hits("Condition") == 1:
                return (
                    503,
                    fhir_json,
                    json.dumps(_outcome("transient", "busy")).encode(),
                )
            return 200, fhir_json, json.dumps(_bundle([_condition(1)])).encode()
        raise ValueError(fault)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stand_in():
    server = FhirStandIn()
    yield server
    server.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/fhir"


FAULT_SETTINGS = Settings(fhir_timeout=TIMEOUT, fhir_deadline=DEADLINE)


def hook_request(fhir_server: str, prefetch: dict):
    body = {
        "hook": "order-sign",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": fhir_server,
        "fhirAuthorization": {
            "access_token": TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        },
        "context": {
            "userId": "Practitioner/example",
            "patientId": "p1",
            "draftOrders": {"resourceType": "Bundle", "entry": []},
        },
        "prefetch": prefetch,
    }
    return load_hook_request(body, "order-sign")


TEMPLATES = {key: query for key, (_, query) in QUERIES.items()}

# Every prefetch key but `conditions`, so that only Condition is fetched.
PREFETCHED = {
    "patient": {"resourceType": "Patient", "id": "p1"},
    "procedures": None,
    "observations": None,
    "medicationRequests": None,
    "medicationStatements": None,
    "coverage": None,
}

# fault -> (conditions lost?, Condition requests the stand-in should see)
FAULT_MATRIX = {
    "refused": (True, 0),
    "hang": (True, None),
    "slow": (True, None),
    "401": (True, 1),
    "403": (True, 1),
    "404": (True, 1),
    "429": (True, 3),
    "500": (True, 1),
    "503": (True, 3),
    "html": (True, 1),
    "invalid-json": (True, 1),
    "operation-outcome": (True, 1),
    "next-loop": (False, None),
    "thousands": (False, 1),
    "flaky-503": (False, 2),
}


@pytest.mark.parametrize("fault", list(FAULT_MATRIX))
def test_fallback_fetch_survives_fault(stand_in, fault):
    lost, expected_hits = FAULT_MATRIX[fault]
    stand_in.faults["Condition"] = fault
    server = closed_port_url() if fault == "refused" else stand_in.url
    fetcher = FhirFetcher(FAULT_SETTINGS)
    try:
        started = time.monotonic()
        values = fetcher.gather(hook_request(server, PREFETCHED), TEMPLATES)
        elapsed = time.monotonic() - started
    finally:
        fetcher.close()

    record = build_record(values, lambda coding: True, patient_id="p1")
    assert elapsed < DEADLINE + MARGIN
    assert (DataCategory.CONDITIONS in record.unavailable) is lost
    assert DataCategory.PROCEDURES in record.retrieved
    if lost:
        assert record.conditions == []
    elif fault == "thousands":
        assert len(record.conditions) == 5000
    else:
        assert [c.reference for c in record.conditions] == ["Condition/c1"]
    if expected_hits is not None:
        assert stand_in.hits("Condition") == expected_hits
    assert {auth for _, auth in stand_in.requests} <= {f"Bearer {TOKEN}"}


def test_next_link_loop_is_not_followed_round_and_round(stand_in):
    stand_in.faults["Condition"] = "next-loop"
    fetcher = FhirFetcher(FAULT_SETTINGS)
    try:
        values = fetcher.fetch(
            hook_request(stand_in.url, PREFETCHED),
            {"conditions": "Condition?patient={{context.patientId}}"},
        )
    finally:
        fetcher.close()
    assert len(values["conditions"]["entry"]) == 1
    assert stand_in.hits("Condition") == 1


def test_no_retry_is_sent_after_the_deadline(stand_in):
    # Each 503 takes 70% of the deadline: the one retry allowed in time is sent,
    # the next would land after the deadline and is not.
    stand_in.faults["Condition"] = "slow-503"
    fetcher = FhirFetcher(replace(FAULT_SETTINGS, fhir_timeout=DEADLINE))
    try:
        values = fetcher.fetch(
            hook_request(stand_in.url, PREFETCHED),
            {"conditions": "Condition?patient={{context.patientId}}"},
        )
        time.sleep(1.5 * DEADLINE)  # room for a late retry to show itself
    finally:
        fetcher.close()
    assert values == {"conditions": UNAVAILABLE}
    assert stand_in.hits("Condition") == 2


def test_unavailable_marker_is_used_for_lost_keys(stand_in):
    stand_in.faults["Condition"] = "500"
    fetcher = FhirFetcher(FAULT_SETTINGS)
    try:
        values = fetcher.fetch(
            hook_request(stand_in.url, PREFETCHED),
            {"conditions": "Condition?patient={{context.patientId}}"},
        )
    finally:
        fetcher.close()
    assert values == {"conditions": UNAVAILABLE}


# --- the whole service against the failing EHR --------------------------------------

SIGN = "/cds-services/pain-management-order-sign"
COVERAGE = {
    "resourceType": "Coverage",
    "id": "cov-1",
    "status": "active",
    "beneficiary": {"reference": "Patient/p1"},
    "payor": [{"display": "EmblemHealth"}],
    "period": {"start": "2026-01-01"},
}
UNAVAILABLE_SUMMARY = (
    "Coverage not fully checked for 62323 lumbar/sacral epidural, image-guided: "
    "problem list (conditions) unavailable"
)


def spine_call(fhir_server: str, missing: tuple[str, ...] = ("conditions",)) -> dict:
    """The epidural order-sign call, its `missing` keys left for the service to fetch
    from `fhir_server` with the EHR's access token."""
    body = spine_request(fhir_server)
    for key in missing:
        del body["prefetch"][key]
    patient = {"reference": f"Patient/{body['context']['patientId']}"}
    body["prefetch"]["coverage"] = _bundle([{**COVERAGE, "beneficiary": patient}])
    body["fhirAuthorization"] = {
        "access_token": TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds-service",
    }
    return body


def coverage_information(response_body: dict) -> dict[str, list]:
    """The sub-extensions of the one coverage-information systemAction, by url."""
    (action,) = response_body["systemActions"]
    (extension,) = action["resource"]["extension"]
    values: dict[str, list] = {}
    for sub in extension["extension"]:
        value = next(
            (v for k, v in sub.items() if k.startswith("value")), sub.get("extension")
        )
        values.setdefault(sub["url"], []).append(value)
    return values


@pytest.fixture
def fault_app(settings, guideline):
    faulty = replace(settings, fhir_timeout=TIMEOUT, fhir_deadline=DEADLINE)
    return create_app(faulty, guideline=guideline)


@pytest.mark.parametrize("fault", list(FAULT_MATRIX))
def test_service_answers_through_every_fault(fault_app, stand_in, fault):
    lost, _ = FAULT_MATRIX[fault]
    stand_in.faults["Condition"] = fault
    server = closed_port_url() if fault == "refused" else stand_in.url
    client = fault_app.test_client()

    started = time.monotonic()
    response = client.post(SIGN, json=spine_call(server))
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    # The fetch has DEADLINE; judging the record and writing cards get 1 s more.
    assert elapsed < DEADLINE + 1.0
    body = response.get_json()
    info = coverage_information(body)
    summaries = [card["summary"] for card in body["cards"]]
    if lost:
        assert info["covered"] == ["indeterminate"]
        (reason,) = info["reason"]
        assert reason["coding"][0]["code"] == "technical"
        assert reason["text"] == "Patient data could not be retrieved: conditions"
        assert summaries[0] == UNAVAILABLE_SUMMARY
        assert (
            "could not be retrieved from the EHR's FHIR server"
            in (body["cards"][0]["detail"])
        )
    else:
        assert info["covered"] != ["indeterminate"]
        assert UNAVAILABLE_SUMMARY not in summaries


def test_lost_data_is_not_documented_never_met(fault_app, stand_in):
    stand_in.faults["Condition"] = "503"
    body = fault_app.test_client().post(SIGN, json=spine_call(stand_in.url)).get_json()
    detail = next(c["detail"] for c in body["cards"] if "| Criterion |" in c["detail"])
    radicular = next(
        row for row in detail.splitlines() if row.startswith("| Epidural steroids need")
    )
    assert "**Not documented** (data could not be retrieved)" in radicular
    assert "The patient's conditions could not be retrieved from the EHR." in radicular


def test_fallback_fetch_to_an_unreachable_server_logs_no_patient_id(fault_app, caplog):
    # Nothing listens on port 9 (discard): every connect is refused and retried.
    body = spine_call("http://127.0.0.1:9/fhir")
    patient_id = body["context"]["patientId"]

    with caplog.at_level(logging.DEBUG):
        response = fault_app.test_client().post(SIGN, json=body)

    assert response.status_code == 200
    assert "fetch of conditions failed: ConnectionError" in caplog.messages
    assert patient_id not in caplog.text
    assert "Condition?patient" not in caplog.text


def test_everything_missing_and_the_ehr_down_is_still_answered(fault_app):
    missing = (
        "patient",
        "conditions",
        "procedures",
        "observations",
        "medicationRequests",
        "medicationStatements",
    )
    client = fault_app.test_client()
    response = client.post(SIGN, json=spine_call(closed_port_url(), missing))
    assert response.status_code == 200
    info = coverage_information(response.get_json())
    assert info["covered"] == ["indeterminate"]
    assert info["reason"][0]["text"] == (
        "Patient data could not be retrieved: patient, conditions, procedures, "
        "observations, medications"
    )


def test_irrelevant_data_lost_does_not_make_coverage_indeterminate(fault_app, stand_in):
    # The Patient read fails; no criterion of the epidural rule reads it.
    stand_in.faults["Patient"] = "500"
    client = fault_app.test_client()
    response = client.post(SIGN, json=spine_call(stand_in.url, ("patient",)))
    assert response.status_code == 200
    assert coverage_information(response.get_json())["covered"] != ["indeterminate"]


# --- no secrets or patient details in the logs of a full run -------------------------


class RawRecords(logging.Handler):
    """Keeps every record as emitted by the code, before any redaction."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in vars(record).items() if k not in {"args", "msg"}}
        self.lines.append(record.getMessage() + " " + repr(fields))


def _patients(value) -> list[dict]:
    if isinstance(value, dict):
        found = [value] if value.get("resourceType") == "Patient" else []
        return found + [p for child in value.values() for p in _patients(child)]
    if isinstance(value, list):
        return [p for child in value for p in _patients(child)]
    return []


def _personal_details(bodies: list[dict]) -> set[str]:
    details = set()
    for patient in (p for body in bodies for p in _patients(body)):
        for name in patient.get("name") or []:
            details.update(part for part in name.get("given") or [] if len(part) > 2)
            if len(name.get("family") or "") > 2:
                details.add(name["family"])
        # A bare year ("1970") would match durations and ports; full dates only.
        if len(patient.get("birthDate") or "") >= 10:
            details.add(patient["birthDate"])
    return details


def _run_requests(stand_in) -> list[dict]:
    """Every fixture and realdata hook request, some with data fetched from a
    failing EHR, each under a fresh JWT; plus refused tokens and feedback."""
    bodies = []
    for path in sorted(FIXTURES.glob("**/*.json")):
        body = json.loads(path.read_text())
        if isinstance(body, dict) and body.get("hook") in SERVICE_OF_HOOK:
            bodies.append(body)
    for name in sorted(REALDATA.glob("*.json")):
        body = json.loads(name.read_text())
        if isinstance(body, dict) and "context" in body:
            hook = body.get("hook") or (
                "order-select" if "order-select" in name.name else "order-sign"
            )
            if hook in SERVICE_OF_HOOK:
                bodies.append({"hookInstance": str(uuid.uuid4()), "hook": hook, **body})
    for fault in ("500", "html", "slow", "operation-outcome"):
        body = spine_request(stand_in.url)
        del body["prefetch"]["conditions"]
        body["fhirAuthorization"] = {
            "access_token": f"{TOKEN}-{fault}",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        }
        bodies.append(body)
    for body in bodies:
        if "fhirServer" in body:
            body["fhirServer"] = stand_in.url
    return bodies


def test_logs_of_a_full_run_hold_no_token_jwt_name_or_birth_date(
    stand_in, guideline, tmp_path, monkeypatch
):
    stand_in.faults["Condition"] = "500"
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="log-test", use="sig")
    settings = Settings(
        public_url="https://cds.plan.example",
        trusted_issuers=json.dumps(
            [{"iss": "https://ehr.example", "jwks": {"keys": [jwk]}}]
        ),
        database_url=f"sqlite:///{tmp_path / 'audit.sqlite'}",
        evaluation_date=EVALUATION_DATE,
        fhir_timeout=TIMEOUT,
        fhir_deadline=DEADLINE,
        log_level="DEBUG",
    )
    jwts: list[str] = []

    def bearer(path: str, **claims) -> dict:
        now = int(time.time())
        payload = {
            "iss": "https://ehr.example",
            "aud": settings.public_url + path,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            **claims,
        }
        token = jwt.encode(payload, key, algorithm="ES384", headers={"kid": "log-test"})
        jwts.append(token)
        return {"Authorization": f"Bearer {token}"}

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    produced = io.StringIO()
    raw = RawRecords()
    try:
        monkeypatch.setattr(sys, "stderr", produced)
        configure_logging(settings)
        root.handlers.insert(0, raw)
        client = create_app(settings, guideline=guideline).test_client()

        bodies = _run_requests(stand_in)
        statuses = collections.Counter()
        for body in bodies:
            path = f"/cds-services/{SERVICE_OF_HOOK[body['hook']]}"
            response = client.post(path, json=body, headers=bearer(path))
            statuses[response.status_code] += 1
            # The same token again (replay), and one for the wrong endpoint.
            client.post(path, json=body, headers={"Authorization": jwts[-1]})
            client.post(path, json=body, headers=bearer("/cds-services"))
        feedback = f"/cds-services/{SERVICE_OF_HOOK['order-sign']}/feedback"
        client.post(
            feedback,
            json={
                "feedback": [
                    {
                        "card": "c",
                        "outcome": "overridden",
                        "outcomeTimestamp": "2026-12-03T10:00:00Z",
                    }
                ]
            },
            headers=bearer(feedback),
        )
        client.get("/cds-services", headers=bearer("/cds-services"))
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)

    assert statuses == {200: len(bodies)}, statuses
    secrets = (
        set(jwts)
        | {TOKEN}
        | {
            body["fhirAuthorization"]["access_token"]
            for body in bodies
            if isinstance(body.get("fhirAuthorization"), dict)
        }
    )
    personal = _personal_details(bodies)
    assert len(personal) >= 6  # the fixtures and realdata do carry names and dates
    for output in ("\n".join(raw.lines), produced.getvalue()):
        assert output.count("\n") > 100
        assert re.search(r"eyJ[A-Za-z0-9_-]{5,}\.", output) is None
        assert [s for s in secrets if s in output] == []
        assert [p for p in personal if p in output] == []
