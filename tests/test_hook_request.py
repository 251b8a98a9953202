"""The hook endpoint's answers to malformed, misdirected and oversized calls."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import FIXTURES

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


# --- prefetch values, draft orders and selections ------------------------------------


def excluded_epidural() -> dict:
    """The fixture order-sign call: a 62323 epidural for spine-esi-myofascial."""
    return json.loads((FIXTURES / "spine" / "esi-myofascial-excluded.json").read_text())


CONDITIONS_EXPECTED = (
    "prefetch.conditions: expected a searchset Bundle of Condition resources, an "
    "OperationOutcome or null, not "
)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1, "a number"),
        ("str", "a string"),
        ([], "an array"),
        ({"id": "x"}, "an object without a resourceType"),
        ({"resourceType": "Patient"}, "a Patient resource"),
    ],
)
def test_wrong_prefetch_value_is_named(client, value, shown):
    body = excluded_epidural()
    body["prefetch"]["conditions"] = value

    response = client.post(SIGN, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(CONDITIONS_EXPECTED + shown, expression="prefetch.conditions")
    )


def test_every_wrong_prefetch_key_is_named_with_the_other_errors(client):
    body = excluded_epidural()
    del body["hookInstance"]
    body["prefetch"]["patient"] = {"resourceType": "Condition"}
    body["prefetch"]["coverage"] = True

    response = client.post(SIGN, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(
            "hookInstance: Missing data for required field.",
            expression="hookInstance",
        ),
        issue(
            "prefetch.patient: expected a Patient resource, an OperationOutcome or "
            "null, not a Condition resource",
            expression="prefetch.patient",
        ),
        issue(
            "prefetch.coverage: expected a searchset Bundle of Coverage resources, an "
            "OperationOutcome or null, not a boolean",
            expression="prefetch.coverage",
        ),
    )


@pytest.mark.parametrize(
    "value",
    [
        {"resourceType": "OperationOutcome", "issue": []},
        {"resourceType": "Bundle", "type": "searchset"},
        None,
    ],
    ids=["operation-outcome", "bundle", "null"],
)
def test_outcome_bundle_and_null_are_accepted_under_any_key(client, value):
    body = excluded_epidural()
    body["prefetch"]["patient"] = value
    body["prefetch"]["conditions"] = value
    body["prefetch"]["user"] = "123"  # a key this service never asks for: not read

    assert client.post(SIGN, json=body).status_code == 200


@pytest.mark.parametrize(
    ("change", "diagnostics", "expression"),
    [
        (
            lambda orders: orders.update(entry={"resource": {}}),
            "must be an array of Bundle entries",
            "context.draftOrders.entry",
        ),
        (
            lambda orders: orders["entry"].insert(0, "ServiceRequest/1"),
            "must be a Bundle entry (a JSON object)",
            "context.draftOrders.entry[0]",
        ),
        (
            lambda orders: orders["entry"][0].update(resource=[]),
            "must be a FHIR resource (a JSON object)",
            "context.draftOrders.entry[0].resource",
        ),
        (
            lambda orders: orders["entry"][0].pop("resource"),
            "must be a FHIR resource (a JSON object)",
            "context.draftOrders.entry[0].resource",
        ),
        (
            lambda orders: orders["entry"][0]["resource"].pop("resourceType"),
            "is required",
            "context.draftOrders.entry[0].resource.resourceType",
        ),
    ],
    ids=["entry-object", "entry-string", "resource-array", "no-resource", "no-type"],
)
def test_malformed_draft_orders_are_named_by_path(
    client, change, diagnostics, expression
):
    body = excluded_epidural()
    change(body["context"]["draftOrders"])

    response = client.post(SIGN, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(f"{expression}: {diagnostics}", expression=expression)
    )


def test_draft_order_for_another_patient_is_refused(client):
    body = excluded_epidural()
    order = body["context"]["draftOrders"]["entry"][0]["resource"]
    order["subject"] = {"reference": "Patient/someone-else"}

    response = client.post(SIGN, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(
            "context.draftOrders.entry[0].resource.subject: names "
            "Patient/someone-else, not the context's patient "
            "Patient/spine-esi-myofascial",
            expression="context.draftOrders.entry[0].resource.subject",
        )
    )


@pytest.mark.parametrize(
    "subject",
    [
        {"reference": "Patient/spine-esi-myofascial"},
        {"reference": "https://ehr.example/fhir/Patient/spine-esi-myofascial"},
        {"reference": "urn:uuid:0c3e4a4e-3b8b-4f0e-9a52-7c2f9f3b1d10"},
        {"display": "the patient"},
    ],
    ids=["same", "same-absolute", "urn-uuid", "no-reference"],
)
def test_draft_order_for_this_patient_or_unknown_is_judged(client, subject):
    body = excluded_epidural()
    body["context"]["draftOrders"]["entry"][0]["resource"]["subject"] = subject

    assert client.post(SIGN, json=body).status_code == 200


def test_selection_not_among_the_draft_orders_is_named(client):
    body = excluded_epidural()
    body["hook"] = "order-select"
    body["context"]["selections"] = [
        "ServiceRequest/spine-esi-myofascial-order-62323",
        "ServiceRequest/not-drafted",
    ]

    response = client.post(SELECT, json=body)

    assert response.status_code == 400
    assert response.get_json() == outcome(
        issue(
            "context.selections[1]: ServiceRequest/not-drafted is not among "
            "context.draftOrders",
            expression="context.selections[1]",
        )
    )
