"""Every public example request (shared/realdata, kept in tests/realdata) over HTTP."""

from __future__ import annotations

import uuid

import pytest
import requests
from conftest import REALDATA, realdata, spine_request

SERVICE = {
    "order-select": "pain-management-order-select",
    "order-sign": "pain-management-order-sign",
}

# Files that are hook requests, with the hook each is for. The docs examples hold
# only `context`; they are sent in an envelope naming the hook their file names.
REQUESTS = {
    "cds-hooks-docs__order-select_example-r4.json": "order-select",
    "cds-hooks-docs__order-select_example-stu3.json": "order-select",
    "cds-hooks-docs__order-sign_example-r4.json": "order-sign",
    "cds-hooks-sandbox__rx-view_order-select_captured.json": "order-select",
    "cds-hooks-sandbox__rx-sign_order-sign_captured.json": "order-sign",
    "crd-test-kit__order_select_hook_request.json": "order-select",
    "davinci-crd-ri__r4-ordersign_requestWithHydratedPrefetchBundle.json": "order-sign",
}
# The CRD test kit's request names Patient/example in its context but
# Patient/1288992 on its diet and medication orders; neither is judged, so the
# mismatch is passed over (a guideline order for another patient gets a 400).
PATIENT_VIEW = [
    "cds-hooks-docs__spec_request-patient-view-fhirauth.json",
    "cds-hooks-docs__spec_request-with-extension.json",
]


def envelope(name: str, hook: str) -> dict:
    body = realdata(name)
    if "hook" not in body:
        body = {"hook": hook, "hookInstance": str(uuid.uuid4()), **body}
    return body


def test_every_request_file_is_listed():
    requests_on_disk = {
        path.name
        for path in REALDATA.glob("*.json")
        if "context" in realdata(path.name)
    }
    assert requests_on_disk == set(REQUESTS) | set(PATIENT_VIEW)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_realdata_request_answered_over_http(live_server, name):
    hook = REQUESTS[name]
    response = requests.post(
        f"{live_server.url}/cds-services/{SERVICE[hook]}",
        json=envelope(name, hook),
        timeout=10,
    )

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    # None of these orders (diet, amoxicillin, acetaminophen, oxygen) is a
    # pain-management procedure: no card, and no patient data was fetched.
    assert response.json()["cards"] == []


@pytest.mark.parametrize("name", PATIENT_VIEW)
@pytest.mark.parametrize("hook", sorted(SERVICE))
def test_patient_view_refused_naming_the_hook(live_server, name, hook):
    response = requests.post(
        f"{live_server.url}/cds-services/{SERVICE[hook]}",
        json=realdata(name),
        timeout=10,
    )

    assert response.status_code == 400
    assert response.json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-supported",
                "diagnostics": f"This service answers the {hook} hook, "
                "not patient-view",
                "expression": ["hook"],
            }
        ],
    }


def test_sandbox_origin_gets_cors_headers_on_hook_answer(live_server):
    name = "cds-hooks-sandbox__rx-view_order-select_captured.json"
    response = requests.post(
        f"{live_server.url}/cds-services/pain-management-order-select",
        json=realdata(name),
        headers={"Origin": "https://sandbox.cds-hooks.org"},
        timeout=10,
    )

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == (
        "https://sandbox.cds-hooks.org"
    )


def test_synthea_back_pain_patient_with_an_epidural_order(live_server, fhir_stub):
    # The sandbox's order-sign body with its order replaced by a lumbar epidural
    # (CPT 62323) and the synthetic Synthea patient with chronic low back pain as
    # prefetch: the record holds back pain but no radicular diagnosis, no recent
    # pain score (the last is from 2020) and no functional measure, so the order
    # needs documentation.
    body = spine_request(fhir_stub.url)

    response = requests.post(
        f"{live_server.url}/cds-services/pain-management-order-sign",
        json=body,
        timeout=10,
    )

    assert response.status_code == 200
    assert [(c["indicator"], c["summary"]) for c in response.json()["cards"]] == [
        (
            "info",
            "Document for 62323 lumbar/sacral epidural, image-guided: radicular or "
            "discogenic pain (+2 more)",
        )
    ]
    assert fhir_stub.calls == []  # everything came from prefetch


def test_medication_order_outside_the_guideline_gets_no_cards(client):
    body = realdata("cds-hooks-sandbox__rx-view_order-select_captured.json")

    response = client.post(f"/cds-services/{SERVICE['order-select']}", json=body)

    assert response.get_json() == {"cards": []}


def test_epidural_with_everything_prefetched_gets_one_card(client, fhir_stub):
    body = spine_request(fhir_stub.url)

    response = client.post(f"/cds-services/{SERVICE['order-sign']}", json=body)

    assert len(response.get_json()["cards"]) == 1
    assert fhir_stub.calls == []
