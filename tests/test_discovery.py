"""Discovery, and CORS for the browser-based CDS Hooks sandbox."""

from __future__ import annotations

import pytest
from conftest import realdata

SANDBOX = "https://sandbox.cds-hooks.org"
PREFETCH_KEYS = [
    "patient",
    "conditions",
    "procedures",
    "observations",
    "medicationRequests",
    "medicationStatements",
    "coverage",
]


def test_discovery_lists_both_services(client):
    response = client.get("/cds-services")

    assert response.status_code == 200
    services = response.get_json()["services"]
    assert [(s["id"], s["hook"]) for s in services] == [
        ("pain-management-order-select", "order-select"),
        ("pain-management-order-sign", "order-sign"),
    ]
    assert services[0]["title"] == (
        "Pain management prior authorization: order selection"
    )
    assert services[1]["title"] == "Pain management prior authorization: order signing"
    for service in services:
        assert list(service["prefetch"]) == PREFETCH_KEYS
        assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
        assert service["prefetch"]["medicationStatements"] == (
            "MedicationStatement?patient={{context.patientId}}"
        )
        assert service["extension"]["davinci-crd.version"] == ["2.2"]


def test_observation_template_names_pain_and_function_codes(client, guideline):
    template = client.get("/cds-services").get_json()["services"][0]["prefetch"][
        "observations"
    ]

    expected = "Observation?patient={{context.patientId}}"
    codes = [f"http://loinc.org|{c.code}" for c in guideline.observation_codes()]
    if codes:
        expected += "&code=" + ",".join(codes)
    assert template == expected


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/cds-services", "GET"),
        ("/cds-services/pain-management-order-select", "POST"),
        ("/cds-services/pain-management-order-sign", "POST"),
        ("/cds-services/pain-management-order-sign/feedback", "POST"),
    ],
)
def test_preflight_allows_authorization_and_content_type(client, path, method):
    response = client.options(
        path,
        headers={
            "Origin": SANDBOX,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert response.headers["Access-Control-Allow-Methods"] == "GET, OPTIONS, POST"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type"
    )


def test_origins_restricted_by_setting(settings, guideline):
    from cds_service import create_app

    settings.cors_origins = ["https://ehr.example.org"]
    client = create_app(settings, guideline=guideline).test_client()

    allowed = client.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    refused = client.get("/cds-services", headers={"Origin": SANDBOX})

    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_error_answers_carry_cors_headers(client):
    response = client.post(
        "/cds-services/unknown", json={}, headers={"Origin": SANDBOX}
    )

    assert response.status_code == 404
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX


def test_only_browser_calls_get_cors_headers_on_hook_answers(client):
    # A browser names its Origin on every POST; a call from an EHR's server names
    # none and gets its answer without the CORS pass. Discovery (a GET, which a
    # shared cache could hand to a browser) keeps the header either way.
    body = realdata("cds-hooks-sandbox__rx-view_order-select_captured.json")
    path = "/cds-services/pain-management-order-select"

    from_server = client.post(path, json=body)
    from_browser = client.post(path, json=body, headers={"Origin": SANDBOX})
    discovery = client.get("/cds-services")

    assert from_server.status_code == from_browser.status_code == 200
    assert from_server.json == from_browser.json
    assert "Access-Control-Allow-Origin" not in from_server.headers
    assert from_browser.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert discovery.headers["Access-Control-Allow-Origin"] == "*"
