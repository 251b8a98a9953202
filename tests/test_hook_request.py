"""The hook endpoint's answers to malformed, misdirected and oversized calls."""

from __future__ import annotations

import logging

import pytest

SIGN = "/cds-services/pain-management-order-sign"
SELECT = "/cds-services/pain-management-order-select"


def outcome(*issues) -> dict:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def issue(diagnostics, code="invalid", expression=None) -> dict:
    entry = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        entry["expression"] = [expression]
    return entry


def sign_request(**changes) -> dict:
    body = {
        "hook": "order-sign",
        "hookInstance": "5a2a5c8e-0d63-4a7b-9c55-1d1b3d9f0a11",
        "context": {
            "userId": "Practitioner/example",
            "patientId": "p1",
            "draftOrders": {"resourceType": "Bundle", "entry": []},
        },
        "prefetch": {},
    }
    body.update(changes)
    return body


def test_malformed_body_names_every_wrong_field(client):
    body = {
        "hook": "order-select",
        "fhirAuthorization": {"token_type": "Bearer", "expires_in": "soon"},
        "context": {
            "userId": "Dr Smith",
            "selections": ["ServiceRequest/ok-1", 7],
            "draftOrders": {"resourceType": "Patient"},
        },
        "prefetch": ["not", "an", "object"],
    }

    response = client.post(SELECT, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(
            "hookInstance: Missing data for required field.", "invalid", "hookInstance"
        ),
        issue(
            "fhirAuthorization.access_token: Missing data for required field.",
            "invalid",
            "fhirAuthorization.access_token",
        ),
        issue(
            "fhirAuthorization.expires_in: Not a valid integer.",
            "invalid",
            "fhirAuthorization.expires_in",
        ),
        issue(
            "context.userId: must be a relative reference of the form Type/id",
            "invalid",
            "context.userId",
        ),
        issue(
            "context.patientId: Missing data for required field.",
            "invalid",
            "context.patientId",
        ),
        issue(
            "context.draftOrders: must be a FHIR Bundle of draft orders",
            "invalid",
            "context.draftOrders",
        ),
        issue(
            "context.selections[1]: Not a valid string.",
            "invalid",
            "context.selections[1]",
        ),
        issue("prefetch: Not a valid mapping type.", "invalid", "prefetch"),
        issue(
            "fhirServer: is required when fhirAuthorization is sent",
            "invalid",
            "fhirServer",
        ),
    )


def test_order_select_needs_selections(client):
    body = sign_request(hook="order-select")

    response = client.post(SELECT, json=body)

    assert response.status_code == 400
    assert response.get_json()["issue"] == [
        issue(
            "context.selections: Missing data for required field.",
            expression="context.selections",
        )
    ]


def test_hook_not_served_by_this_service(client):
    response = client.post(SELECT, json=sign_request())

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(
            "This service answers the order-select hook, not order-sign",
            "not-supported",
            "hook",
        )
    )


def test_unknown_service(client):
    response = client.post("/cds-services/opioid-review", json=sign_request())

    assert response.status_code == 404
    assert response.get_json() == outcome(
        issue(
            "No CDS service 'opioid-review'; discovery is at GET /cds-services",
            "not-found",
        )
    )


def test_get_on_a_service_is_405_with_allow(client):
    response = client.get(SIGN)

    assert response.status_code == 405
    # Werkzeug builds the header from a set, so its order varies between runs.
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed == {"OPTIONS", "POST"}
    assert response.get_json() == outcome(
        issue("Method not allowed on this endpoint", "not-supported")
    )


def test_non_json_content_type_is_415(client):
    response = client.post(SIGN, data="hook=order-sign", content_type="text/plain")

    assert response.status_code == 415
    assert response.get_json() == outcome(
        issue("Content-Type must be application/json, not text/plain", "not-supported")
    )


def test_fhir_json_content_type_accepted(client):
    response = client.post(
        SIGN, json=sign_request(), content_type="application/fhir+json"
    )

    assert response.status_code == 200
    assert response.get_json()["cards"] == []


def test_unparsable_json_is_400(client):
    response = client.post(SIGN, data='{"hook": ', content_type="application/json")

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue("Request body is not valid JSON", "structure")
    )


@pytest.mark.parametrize("body", [[], "order-sign", 42])
def test_body_that_is_not_an_object_is_400(client, body):
    response = client.post(SIGN, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(issue("Request body must be a JSON object"))


def test_oversized_body_is_413(client, settings):
    padding = "x" * settings.max_body_bytes
    response = client.post(SIGN, json=sign_request(extension={"pad": padding}))

    assert response.status_code == 413
    assert response.get_json() == outcome(
        issue("Request body is larger than the service accepts", "too-costly")
    )


def test_unknown_fields_and_extensions_are_ignored(client):
    body = sign_request(extension={"com.example.flag": True}, futureField=[1, 2])
    body["context"]["somethingNew"] = {"a": 1}

    response = client.post(SIGN, json=body)

    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_null_fhir_authorization_is_accepted(client):
    response = client.post(SIGN, json=sign_request(fhirAuthorization=None))

    assert response.status_code == 200


def test_unexpected_error_is_500_operation_outcome(client, app, monkeypatch):
    from cds_service import api

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(api, "orders_from_bundle", broken)
    response = client.post(SIGN, json=sign_request())

    assert response.status_code == 500
    assert response.get_json() == outcome(
        issue("Internal error; the service log has details", "exception")
    )


def test_one_log_line_per_call_without_token_or_patient(client, caplog):
    body = sign_request(
        fhirServer="https://ehr.example.org/fhir",
        fhirAuthorization={"access_token": "secret-token-abc", "token_type": "Bearer"},
    )
    body["prefetch"] = {
        "patient": {"resourceType": "Patient", "birthDate": "1970-01-01"}
    }

    with caplog.at_level(logging.INFO, logger="cds_service.api"):
        client.post(SIGN, json=body)
        client.post(SIGN, data="hook=order-sign", content_type="text/plain")

    calls = [r for r in caplog.records if r.getMessage() == "hook call"]
    assert [
        (r.hookInstance, r.service, r.hook, r.status, r.outcome) for r in calls
    ] == [
        (
            "5a2a5c8e-0d63-4a7b-9c55-1d1b3d9f0a11",
            "pain-management-order-sign",
            "order-sign",
            200,
            "no-guideline-order",
        ),
        (None, "pain-management-order-sign", "order-sign", 415, "refused-415"),
    ]
    assert all(isinstance(r.duration_ms, float) for r in calls)
    logged = " ".join(str(vars(r)) for r in caplog.records)
    assert "secret-token-abc" not in logged and "1970-01-01" not in logged
