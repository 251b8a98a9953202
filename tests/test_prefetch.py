"""Prefetch templates and the FHIR fallback for keys the client did not prefetch."""

from __future__ import annotations

import json
import threading
import time
from datetime import date
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from conftest import spine_request

from cds_service import create_app
from cds_service.model import CodeSystem, Coding, DataCategory
from cds_service.prefetch import QUERIES

FHIR = "https://ehr.example.org/fhir"
SIGN = "/cds-services/pain-management-order-sign"
EPIDURAL = Coding(CodeSystem.CPT, "62323")


class RecordingGuideline:
    """Covers one epidural code and keeps the record the service hands it.

    These tests are about how patient data is gathered, not what the guideline
    decides, so the engine is replaced by one that records what it was given.
    """

    def __init__(self):
        self.records = []
        self.relevance_answers = {}

    def covers(self, coding):
        return coding == Coding(coding.system, coding.code) and (
            (coding.system, coding.code) == (EPIDURAL.system, EPIDURAL.code)
        )

    def is_relevant(self, coding):
        return coding.code in {"72514-3", "278860009", "62323", "1121000119107"}

    def observation_codes(self):
        return [Coding(CodeSystem.LOINC, "72514-3")]

    def evaluate(self, record, orders, on):
        self.records.append((record, orders, on))
        return []


@pytest.fixture
def engine():
    return RecordingGuideline()


@pytest.fixture
def fake_client(settings, engine):
    return create_app(settings, guideline=engine).test_client()


def epidural_request(prefetch=None, **changes) -> dict:
    body = {
        "hook": "order-sign",
        "hookInstance": "0d6f7d4e-4f0b-4d52-9a8e-3c5f8b9e2a10",
        "fhirServer": FHIR,
        "fhirAuthorization": {
            "access_token": "opaque-token-123",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "pain-cds",
        },
        "context": {
            "userId": "Practitioner/example",
            "patientId": "pat-1",
            "draftOrders": {
                "resourceType": "Bundle",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "ServiceRequest",
                            "id": "esi-1",
                            "status": "draft",
                            "intent": "order",
                            "code": {
                                "coding": [
                                    {
                                        "system": "http://www.ama-assn.org/go/cpt",
                                        "code": "62323",
                                    }
                                ]
                            },
                            "subject": {"reference": "Patient/pat-1"},
                        }
                    }
                ],
            },
        },
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(changes)
    return body


def searchset(*resources, next_url=None) -> dict:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


LOW_BACK_PAIN = {
    "resourceType": "Condition",
    "id": "clbp",
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "code": {
        "coding": [
            {
                "system": "http://snomed.info/sct",
                "code": "278860009",
                "display": "Chronic low back pain (finding)",
            }
        ]
    },
    "subject": {"reference": "Patient/pat-1"},
    "onsetDateTime": "2014-02-05",
}
NECK_PAIN = {
    **LOW_BACK_PAIN,
    "id": "neck",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1121000119107"}]},
}
PAIN_SCORE = {
    "resourceType": "Observation",
    "id": "nrs-1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
    "subject": {"reference": "Patient/pat-1"},
    "effectiveDateTime": "2026-11-20",
    "valueInteger": 7,
}
EMPTY = {"resourceType": "Bundle", "type": "searchset", "total": 0}
FULL_PREFETCH = {
    "patient": {"resourceType": "Patient", "id": "pat-1"},
    "conditions": searchset(LOW_BACK_PAIN),
    "procedures": EMPTY,
    "observations": searchset(PAIN_SCORE),
    "medicationRequests": None,
    "medicationStatements": None,
    "coverage": None,
}


def test_discovery_templates_use_only_cds_hooks_2_tokens(client):
    services = client.get("/cds-services").get_json()["services"]

    for service in services:
        assert service["prefetch"]["conditions"] == (
            "Condition?patient={{context.patientId}}"
        )
        assert service["prefetch"]["coverage"] == (
            "Coverage?patient={{context.patientId}}&status=active"
        )
        for template in service["prefetch"].values():
            assert template.count("{{") == 1
            assert "{{context.patientId}}" in template


def test_observation_template_lists_the_guideline_score_codes(fake_client):
    services = fake_client.get("/cds-services").get_json()["services"]

    assert services[0]["prefetch"]["observations"] == (
        "Observation?patient={{context.patientId}}&code=http://loinc.org|72514-3"
    )


@responses.activate
def test_complete_prefetch_makes_no_fhir_call(fake_client, engine):
    response = fake_client.post(SIGN, json=epidural_request(FULL_PREFETCH))

    assert response.status_code == 200
    assert len(responses.calls) == 0
    record, orders, on = engine.records[0]
    assert [c.reference for c in record.conditions] == ["Condition/clbp"]
    assert [o.value for o in record.observations] == [7.0]
    assert record.unavailable == set()
    assert on == date(2026, 12, 3)
    assert [o.reference for o in orders] == ["ServiceRequest/esi-1"]


@responses.activate
def test_missing_keys_fetched_with_the_bearer_token(fake_client, engine):
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    prefetch.pop("observations")
    responses.get(f"{FHIR}/Condition", json=searchset(LOW_BACK_PAIN))
    responses.get(f"{FHIR}/Observation", json=searchset(PAIN_SCORE))

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    calls = sorted(responses.calls, key=lambda call: call.request.url)
    assert [urlsplit(c.request.url).path for c in calls] == [
        "/fhir/Condition",
        "/fhir/Observation",
    ]
    for call in calls:
        assert call.request.headers["Authorization"] == "Bearer opaque-token-123"
        assert call.request.headers["Accept"] == "application/fhir+json"
    assert parse_qs(urlsplit(calls[1].request.url).query) == {
        "patient": ["pat-1"],
        "code": ["http://loinc.org|72514-3"],
    }
    record = engine.records[0][0]
    assert [c.reference for c in record.conditions] == ["Condition/clbp"]
    assert [o.reference for o in record.observations] == ["Observation/nrs-1"]
    assert DataCategory.CONDITIONS in record.retrieved


@responses.activate
def test_open_server_is_queried_without_authorization(fake_client, engine):
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    responses.get(f"{FHIR}/Condition", json=searchset(LOW_BACK_PAIN))
    body = epidural_request(prefetch)
    del body["fhirAuthorization"]

    response = fake_client.post(SIGN, json=body)

    assert response.status_code == 200
    assert "Authorization" not in responses.calls[0].request.headers
    assert [c.reference for c in engine.records[0][0].conditions] == ["Condition/clbp"]


@responses.activate
def test_next_links_followed_up_to_the_page_cap(settings, engine):
    settings.fhir_page_cap = 2
    client = create_app(settings, guideline=engine).test_client()
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    responses.get(
        f"{FHIR}/Condition?patient=pat-1",
        json=searchset(LOW_BACK_PAIN, next_url=f"{FHIR}/Condition?page=2"),
        match=[responses.matchers.query_param_matcher({"patient": "pat-1"})],
    )
    responses.get(
        f"{FHIR}/Condition?page=2",
        json=searchset(NECK_PAIN, next_url=f"{FHIR}/Condition?page=3"),
        match=[responses.matchers.query_param_matcher({"page": "2"})],
    )

    response = client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    assert len(responses.calls) == 2  # page 3 is past the cap of 2
    record = engine.records[0][0]
    assert [c.reference for c in record.conditions] == [
        "Condition/clbp",
        "Condition/neck",
    ]
    # Page 3 was never read: the problem list is incomplete, not complete.
    assert record.unavailable == {DataCategory.CONDITIONS}


@responses.activate
def test_next_link_to_another_server_is_not_followed(fake_client, engine):
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    responses.get(
        f"{FHIR}/Condition",
        json=searchset(LOW_BACK_PAIN, next_url="https://elsewhere.example/Condition"),
    )

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    assert [c.request.url.split("?")[0] for c in responses.calls] == [
        f"{FHIR}/Condition"
    ]
    assert engine.records[0][0].unavailable == {DataCategory.CONDITIONS}


@responses.activate
def test_prefetch_next_page_on_fhir_server_is_fetched_with_the_token(
    fake_client, engine
):
    prefetch = dict(FULL_PREFETCH)
    prefetch["conditions"] = searchset(
        LOW_BACK_PAIN, next_url=f"{FHIR}/Condition?page=2"
    )
    responses.get(f"{FHIR}/Condition?page=2", json=searchset(NECK_PAIN))

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    (call,) = responses.calls
    assert call.request.headers["Authorization"] == "Bearer opaque-token-123"
    record = engine.records[0][0]
    assert [c.reference for c in record.conditions] == [
        "Condition/clbp",
        "Condition/neck",
    ]
    assert record.unavailable == set()


@responses.activate
def test_prefetch_next_page_that_fails_leaves_the_category_unavailable(
    fake_client, engine
):
    prefetch = dict(FULL_PREFETCH)
    prefetch["conditions"] = searchset(
        LOW_BACK_PAIN, next_url=f"{FHIR}/Condition?page=2"
    )
    responses.get(f"{FHIR}/Condition?page=2", status=500)

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    record = engine.records[0][0]
    assert [c.reference for c in record.conditions] == ["Condition/clbp"]
    assert record.unavailable == {DataCategory.CONDITIONS}


@responses.activate
@pytest.mark.parametrize(
    "fhir_server",
    [None, "https://other-ehr.example.org/fhir"],
    ids=["no-fhir-server", "other-server"],
)
def test_prefetch_next_page_off_fhir_server_is_not_fetched(
    fake_client, engine, fhir_server
):
    prefetch = dict(FULL_PREFETCH)
    prefetch["conditions"] = searchset(
        LOW_BACK_PAIN, next_url=f"{FHIR}/Condition?page=2"
    )
    body = epidural_request(prefetch, fhirServer=fhir_server)
    if fhir_server is None:
        del body["fhirServer"], body["fhirAuthorization"]

    response = fake_client.post(SIGN, json=body)

    assert response.status_code == 200
    assert len(responses.calls) == 0  # the token never leaves fhirServer
    record = engine.records[0][0]
    assert [c.reference for c in record.conditions] == ["Condition/clbp"]
    assert record.unavailable == {DataCategory.CONDITIONS}


@responses.activate
def test_null_keys_are_not_fetched(fake_client, engine):
    prefetch = {key: None for key in FULL_PREFETCH}

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    assert len(responses.calls) == 0
    record = engine.records[0][0]
    assert record.conditions == []
    assert record.unavailable == set()
    assert record.retrieved == set(DataCategory)


@responses.activate
def test_failed_fetch_marks_the_category_unavailable(fake_client, engine):
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    responses.get(
        f"{FHIR}/Condition",
        status=403,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "forbidden"}],
        },
    )

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    record = engine.records[0][0]
    assert record.unavailable == {DataCategory.CONDITIONS}
    assert [o.reference for o in record.observations] == ["Observation/nrs-1"]


def test_missing_keys_without_fhir_server_is_412(fake_client, engine):
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k not in ("procedures",)}
    body = epidural_request(prefetch)
    del body["fhirServer"]
    del body["fhirAuthorization"]

    response = fake_client.post(SIGN, json=body)

    assert response.status_code == 412
    assert response.get_json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "incomplete",
                "diagnostics": "Prefetch is missing procedures and the request has "
                "no fhirServer to fetch them from",
                "expression": ["prefetch"],
            }
        ],
    }
    assert engine.records == []


@responses.activate
def test_fhir_server_off_the_configured_list_is_never_queried(settings, engine):
    settings.fhir_servers = ["https://ehr.other.example/fhir"]
    client = create_app(settings, guideline=engine).test_client()
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "procedures"}

    response = client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 412
    assert response.get_json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "incomplete",
                "diagnostics": "Prefetch is missing procedures and fhirServer is not "
                "one this service may query (PAIN_CDS_FHIR_SERVERS)",
                "expression": ["fhirServer"],
            }
        ],
    }
    assert len(responses.calls) == 0
    assert engine.records == []


@responses.activate
def test_fhir_server_on_the_configured_list_is_queried(settings, engine):
    settings.fhir_servers = [FHIR + "/"]
    client = create_app(settings, guideline=engine).test_client()
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    responses.get(f"{FHIR}/Condition", json=searchset(LOW_BACK_PAIN))

    response = client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    assert [urlsplit(c.request.url).path for c in responses.calls] == [
        "/fhir/Condition"
    ]


def test_no_412_when_no_order_is_in_the_guideline(fake_client, engine):
    body = epidural_request()
    body["context"]["draftOrders"]["entry"][0]["resource"]["code"]["coding"][0][
        "code"
    ] = "99213"
    del body["fhirServer"]
    del body["fhirAuthorization"]

    response = fake_client.post(SIGN, json=body)

    assert response.status_code == 200
    assert response.get_json() == {"cards": []}
    assert engine.records == []


def test_operation_outcome_in_prefetch_marks_unavailable(fake_client, engine):
    prefetch = dict(FULL_PREFETCH)
    prefetch["procedures"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    record = engine.records[0][0]
    assert record.unavailable == {DataCategory.PROCEDURES}


def test_prefetch_value_wrapped_as_bundle_entry(fake_client, engine):
    prefetch = dict(FULL_PREFETCH)
    prefetch["conditions"] = {"fullUrl": "urn:uuid:1", "resource": LOW_BACK_PAIN}

    response = fake_client.post(SIGN, json=epidural_request(prefetch))

    assert response.status_code == 200
    assert [c.reference for c in engine.records[0][0].conditions] == ["Condition/clbp"]


def test_fetches_run_concurrently_within_the_deadline(settings, engine, fhir_stub):
    settings.fhir_deadline = 1.5
    settings.fhir_timeout = 1.0
    client = create_app(settings, guideline=engine).test_client()
    for resource_type in ("Condition", "Procedure", "Observation"):
        fhir_stub.reply(resource_type, body=EMPTY, delay=0.4)
    fhir_stub.reply("Patient/pat-1", body={"resourceType": "Patient", "id": "pat-1"})
    fhir_stub.reply("MedicationRequest", body=EMPTY, delay=0.4)
    fhir_stub.reply("MedicationStatement", body=EMPTY, delay=0.4)
    fhir_stub.reply("Coverage", body=EMPTY, delay=3.0)  # past the deadline

    response = client.post(SIGN, json=epidural_request(fhirServer=fhir_stub.url))

    assert response.status_code == 200
    record = engine.records[0][0]
    # Six 0.4 s queries fit in a 1.5 s deadline only when run side by side.
    assert record.unavailable == {DataCategory.COVERAGE}
    assert record.retrieved == set(DataCategory) - {DataCategory.COVERAGE}
    assert len(fhir_stub.calls) == 7


def test_unreachable_server_leaves_categories_unavailable(settings, engine):
    client = create_app(settings, guideline=engine).test_client()
    body = epidural_request(fhirServer="http://127.0.0.1:9/fhir")

    response = client.post(SIGN, json=body)

    assert response.status_code == 200
    assert engine.records[0][0].unavailable == set(DataCategory)
    assert json.loads(response.data) == {"cards": []}


def test_fallback_fetch_gives_the_same_answer_as_prefetch(client, fhir_stub):
    from conftest import spine_request

    prefetched = spine_request(fhir_stub.url)
    fetched = spine_request(fhir_stub.url)
    patient_id = fetched["context"]["patientId"]
    types = {
        "patient": None,
        "conditions": "Condition",
        "procedures": "Procedure",
        "observations": "Observation",
        "medicationRequests": "MedicationRequest",
    }
    for key, resource_type in types.items():
        value = fetched["prefetch"].pop(key)
        if resource_type is None:
            fhir_stub.reply(f"Patient/{patient_id}", body=value)
        else:
            # Served over two pages, to go through the paging as well.
            resources = [entry["resource"] for entry in value["entry"]]
            half = len(resources) // 2
            fhir_stub.bundle(
                resource_type, resources[:half], next_route=f"{resource_type}?p=2"
            )
            fhir_stub.bundle(f"{resource_type}?p=2", resources[half:])
    fetched["fhirAuthorization"] = {"access_token": "t0k3n", "token_type": "Bearer"}

    by_prefetch = client.post(SIGN, json=prefetched)
    by_fetch = client.post(SIGN, json=fetched)

    def visible(response):
        body = response.get_json()
        cards = [(c["summary"], c["detail"]) for c in body["cards"]]
        return cards, body.get("systemActions")

    assert by_prefetch.status_code == by_fetch.status_code == 200
    assert visible(by_fetch) == visible(by_prefetch)
    assert len(fhir_stub.calls) == 9  # patient, and two pages of each search
    assert {c.headers["Authorization"] for c in fhir_stub.calls} == {"Bearer t0k3n"}


def test_calls_fetching_at_once_each_get_all_their_queries_in_time(
    live_server, fhir_stub
):
    # Four calls of one worker fetch every key at once from an EHR that answers
    # each query after 0.7 s: every query of every call must start at once (a
    # shared pool too small for them queued some past the 2 s deadline).
    body = spine_request(fhir_stub.url)
    expected = requests.post(live_server.url + SIGN, json=body, timeout=10).json()
    patient_id = body["context"]["patientId"]
    for key, (_, template) in QUERIES.items():
        route = template.split("?")[0].replace("{{context.patientId}}", patient_id)
        value = body["prefetch"].get(key) or {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [],
        }
        fhir_stub.reply(route, body=value, delay=0.7)
    del body["prefetch"]
    answers: list[dict] = []

    def call() -> None:
        response = requests.post(live_server.url + SIGN, json=body, timeout=10)
        answers.append(response.json())

    callers = [threading.Thread(target=call) for _ in range(4)]
    started = time.monotonic()
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=10)

    assert answers == [expected] * 4
    assert time.monotonic() - started < 1.9
