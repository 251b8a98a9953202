"""Hostile input: a malformed body gets a 4xx OperationOutcome, never a 500 or hang."""

from __future__ import annotations

import copy
import json
import uuid

import pytest
import requests
from conftest import FIXTURES, realdata, spine_request

SIGN = "/cds-services/pain-management-order-sign"
SELECT = "/cds-services/pain-management-order-select"
FEEDBACK = SIGN + "/feedback"

# Hook requests from shared/realdata (docs examples hold only `context`).
REALDATA_REQUESTS = {
    "cds-hooks-docs__order-select_example-r4.json": SELECT,
    "cds-hooks-docs__order-sign_example-r4.json": SIGN,
    "cds-hooks-sandbox__rx-view_order-select_captured.json": SELECT,
    "cds-hooks-sandbox__rx-sign_order-sign_captured.json": SIGN,
    "crd-test-kit__order_select_hook_request.json": SELECT,
    "davinci-crd-ri__r4-ordersign_requestWithHydratedPrefetchBundle.json": SIGN,
}


def request_body(name: str, fhir_server: str) -> dict:
    body = realdata(name)
    if "hook" not in body:
        hook = "order-select" if "order-select" in name else "order-sign"
        body = {"hook": hook, "hookInstance": str(uuid.uuid4()), **body}
    # Never let a mutated request reach a real EHR: point it at the loopback stub.
    if "fhirServer" in body:
        body["fhirServer"] = fhir_server
    return body


def assert_handled(response, what: str) -> None:
    """A 200 with cards, or a 4xx whose body is an OperationOutcome naming a problem."""
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.get_data(as_text=True)[:300]}"
    body = response.get_json(force=True, silent=True)
    if status == 200:
        assert isinstance(body.get("cards"), list), what
    else:
        assert body["resourceType"] == "OperationOutcome", what
        assert body["issue"] and all(i["diagnostics"] for i in body["issue"]), what


# --- size, content type, syntax ------------------------------------------------------


def test_body_over_the_limit_is_413(client, app):
    limit = app.extensions["pain_cds"].settings.max_body_bytes
    response = client.post(
        SIGN, data=b"[" + b" " * limit + b"]", content_type="application/json"
    )
    assert response.status_code == 413
    assert response.get_json(force=True) == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "too-costly",
                "diagnostics": "Request body is larger than the service accepts",
            }
        ],
    }


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413_over_http(live_server, chunked):
    limit = live_server.app.extensions["pain_cds"].settings.max_body_bytes
    payload = b'{"hook": "' + b"x" * (limit + 10) + b'"}'
    data = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
    response = requests.post(
        live_server.url + SIGN,
        data=data if chunked else payload,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["issue"][0]["code"] == "too-costly"


@pytest.mark.parametrize(
    "content_type, shown",
    [
        (None, "(none)"),
        ("text/plain", "text/plain"),
        ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
        ("multipart/form-data; boundary=x", "multipart/form-data"),
        ("application/xml", "application/xml"),
    ],
)
@pytest.mark.parametrize("path", [SIGN, SELECT, FEEDBACK])
def test_wrong_content_type_is_415(client, path, content_type, shown):
    response = client.post(path, data=b"{}", content_type=content_type)
    assert response.status_code == 415
    assert response.get_json(force=True)["issue"][0]["diagnostics"] == (
        f"Content-Type must be application/json, not {shown}"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"hook": "order-sign"',
        b'{"hook": "order-sign"} trailing',
        b"{'hook': 'order-sign'}",
        b'{"hook": "\xff\xfe"}',
        b"\x00\x01\x02",
        b'{"a": 1,}',
    ],
)
def test_invalid_json_is_400(client, raw):
    response = client.post(SIGN, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json(force=True)["issue"][0]["diagnostics"] == (
        "Request body is not valid JSON"
    )
    response = client.post(FEEDBACK, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json(force=True)["issue"][0]["diagnostics"] == (
        'Request body must be JSON: {"feedback": [...]}'
    )


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"feedback": "x"},
        {"feedback": [None]},
        {"feedback": [{"card": {}, "outcome": 1, "outcomeTimestamp": []}]},
        {"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": "x"}]},
        {"feedback": [{"card": "c" * 1_000, "outcome": "overridden"}] * 1000},
    ],
)
def test_malformed_feedback_is_400(client, body):
    response = client.post(FEEDBACK, json=body)
    assert response.status_code == 400
    assert_handled(response, repr(body)[:80])


@pytest.mark.parametrize("depth", [900, 5_000])
def test_deeply_nested_feedback_is_refused(client, depth):
    raw = '{"feedback": [' + "[" * depth + "]" * depth + "]}"
    response = client.post(FEEDBACK, data=raw, content_type="application/json")
    assert_handled(response, f"feedback nested {depth} deep")
    assert response.status_code == 400


@pytest.mark.parametrize("body", [[], [1, 2], "order-sign", 42, True, {}])
def test_body_of_the_wrong_shape_is_400(client, body):
    response = client.post(SIGN, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert_handled(response, repr(body))


NESTING_PLACES = {
    "prefetch": lambda body: body["prefetch"]["conditions"]["entry"][0]["resource"],
    "draft order": lambda body: body["context"]["draftOrders"]["entry"][0]["resource"],
    "extension": lambda body: body.setdefault("extension", {}),
}


@pytest.mark.parametrize("depth", [100, 900, 1_000, 5_000, 200_000])
@pytest.mark.parametrize("where", ["body", "prefetch", "draft order", "extension"])
def test_deep_nesting_is_refused_or_answered_never_500(client, fhir_stub, where, depth):
    nested = "[" * depth + "]" * depth
    body = spine_request(fhir_stub.url)
    if where == "body":
        raw = nested
    else:
        NESTING_PLACES[where](body)["note"] = "__nested__"
        raw = json.dumps(body).replace('"__nested__"', nested)
    response = client.post(SIGN, data=raw, content_type="application/json")
    assert_handled(response, f"{where} nested {depth} deep")
    if depth >= 1_000:
        assert response.status_code == 400
        assert response.get_json(force=True)["issue"][0]["diagnostics"] in {
            "Request body is nested too deeply",
            "Request body must be a JSON object",
        }


# --- wrong types at every field ------------------------------------------------------


def paths(value, prefix=(), *, bundle_entries=2):
    """Every path into `value`; only the first entries of a long array are walked."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, prefix + (key,), bundle_entries=bundle_entries)
    elif isinstance(value, list):
        for index, child in enumerate(value[:bundle_entries]):
            yield from paths(child, prefix + (index,), bundle_entries=bundle_entries)


def wrong_values(original):
    """Values of every JSON type other than the original's."""
    if isinstance(original, bool):
        return [None, "true", [], {}]
    if isinstance(original, str):
        return [None, 12, [], {}]
    if isinstance(original, (int, float)):
        return [None, "x", [], {"value": original}]
    if isinstance(original, list):
        return [None, "x", {}, [None]]
    if isinstance(original, dict):
        return [None, "x", [], 12]
    return ["x", 12, [], {}]


def replaced(body, path, value):
    copied = copy.deepcopy(body)
    if not path:
        return value
    target = copied
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copied


def mutation_failures(
    client, body, endpoint, bundle_entries=2
) -> tuple[int, list[str]]:
    """Send `body` with each field in turn given a value of the wrong type.

    Inside prefetch resources (many fields, all read by the same lenient record
    builder) one wrong type per field is sent, rotating through the types; every
    other field gets each wrong type.
    """
    failures, count = [], 0
    for index, path in enumerate(paths(body, bundle_entries=bundle_entries)):
        original = body
        for step in path:
            original = original[step]
        values = wrong_values(original)
        if len(path) > 4 and path[0] == "prefetch":
            values = [values[index % len(values)]]
        for value in values:
            count += 1
            response = client.post(endpoint, json=replaced(body, path, value))
            try:
                assert_handled(response, f"{'.'.join(map(str, path))} = {value!r}")
            except (AssertionError, KeyError, TypeError) as error:
                failures.append(str(error)[:300])
    return count, failures


@pytest.mark.parametrize("name", sorted(REALDATA_REQUESTS))
def test_wrong_type_at_every_field_of_realdata_requests(client, fhir_stub, name):
    body = request_body(name, fhir_stub.url)
    count, failures = mutation_failures(client, body, REALDATA_REQUESTS[name])
    assert count > 40
    assert failures == []


def test_wrong_type_at_every_field_of_a_spine_request(client, fhir_stub):
    # One entry per prefetch Bundle: the others have the same shape.
    body = spine_request(fhir_stub.url)
    count, failures = mutation_failures(client, body, SIGN, bundle_entries=1)
    assert count > 200
    assert failures == []


def test_wrong_types_are_named_in_the_outcome(client, fhir_stub):
    body = spine_request(fhir_stub.url)
    body["hookInstance"] = 7
    body["context"]["patientId"] = []
    body["context"]["draftOrders"] = "ServiceRequest/epidural-1"
    response = client.post(SIGN, json=body)
    assert response.status_code == 400
    expressions = {
        issue["expression"][0] for issue in response.get_json(force=True)["issue"]
    }
    assert expressions == {"hookInstance", "context.patientId", "context.draftOrders"}


# --- huge arrays and strings: answered, not hung -----------------------------------


def _post(live_server, body) -> requests.Response:
    # A hang would surface as requests' ReadTimeout, failing the test.
    return requests.post(live_server.url + SIGN, json=body, timeout=60)


def test_huge_draft_orders_bundle_is_refused_by_name(live_server, fhir_stub):
    body = spine_request(fhir_stub.url)
    entry = body["context"]["draftOrders"]["entry"][0]
    body["context"]["draftOrders"]["entry"] = [entry] * 12_000
    response = _post(live_server, body)
    assert response.status_code == 400
    assert response.json()["issue"] == [
        {
            "severity": "error",
            "code": "invalid",
            "diagnostics": "context.draftOrders: holds 12000 draft orders; "
            "at most 100 are judged in one call",
            "expression": ["context.draftOrders"],
        }
    ]


def test_hundred_draft_orders_are_answered(live_server, fhir_stub):
    body = spine_request(fhir_stub.url)
    entry = body["context"]["draftOrders"]["entry"][0]
    body["context"]["draftOrders"]["entry"] = [entry] * 100
    response = _post(live_server, body)
    assert response.status_code == 200
    assert isinstance(response.json()["cards"], list)


def test_huge_selections_list_is_refused_in_a_few_issues(live_server, fhir_stub):
    body = request_body(
        "cds-hooks-sandbox__rx-view_order-select_captured.json", fhir_stub.url
    )
    body["context"]["selections"] = [f"MedicationRequest/m{n}" for n in range(50_000)]
    response = requests.post(live_server.url + SELECT, json=body, timeout=60)
    assert response.status_code == 400
    issues = response.json()["issue"]
    # None is among the draft orders: ten are named, the rest counted in one issue.
    assert len(issues) == 11
    assert issues[0]["diagnostics"] == (
        "context.selections[0]: MedicationRequest/m0 is not among context.draftOrders"
    )
    assert issues[-1] == {
        "severity": "error",
        "code": "invalid",
        "diagnostics": "context.selections[10]: and 49990 more selections are not "
        "among context.draftOrders",
        "expression": ["context.selections[10]"],
    }


def test_huge_prefetch_bundle_is_answered(live_server, fhir_stub):
    body = spine_request(fhir_stub.url)
    vital = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    body["prefetch"]["observations"]["entry"] += [
        {"resource": {**vital, "id": f"v{n}"}} for n in range(20_000)
    ]
    response = _post(live_server, body)
    assert response.status_code == 200
    assert isinstance(response.json()["cards"], list)


def test_huge_string_is_answered(live_server, fhir_stub):
    body = spine_request(fhir_stub.url)
    body["hookInstance"] = "h" * 4_000_000
    response = _post(live_server, body)
    assert response.status_code in {200, 400}


@pytest.mark.parametrize("raw", ["null", " null\n"])
def test_a_null_body_is_told_to_be_an_object(client, raw):
    response = client.post(SIGN, data=raw, content_type="application/json")

    assert response.status_code == 400
    assert [i["diagnostics"] for i in response.get_json()["issue"]] == [
        "Request body must be a JSON object"
    ]


# --- found by a fresh-user review ----------------------------------------------------


@pytest.mark.parametrize(
    "extension, named",
    [
        (5, "extension: must be an array of extensions"),
        (["x"], "extension[0]: must be an extension (a JSON object)"),
        ([{"valueString": "a"}], "extension[0].url: is required"),
        (
            [{"url": "http://example.org/x", "extension": [None]}],
            "extension[0].extension[0]: must be an extension (a JSON object)",
        ),
    ],
)
def test_draft_order_extension_of_the_wrong_shape_is_400(client, extension, named):
    # The order is echoed in the coverage-information systemAction with our
    # extension added: its own extensions must be FHIR's shape, or the echo breaks.
    body = spine_request("http://127.0.0.1:1/fhir")
    body["context"]["draftOrders"]["entry"][0]["resource"]["extension"] = extension

    response = client.post(SIGN, json=body)

    assert response.status_code == 400
    assert response.get_json()["issue"][0]["diagnostics"] == (
        f"context.draftOrders.entry[0].resource.{named}"
    )


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_number_literals_are_not_json(client, number):
    body = json.dumps(spine_request("http://127.0.0.1:1/fhir"))
    raw = body.replace('"status": "draft"', f'"status": "draft", "priority": {number}')
    assert raw != body

    response = client.post(SIGN, data=raw, content_type="application/json")

    assert response.status_code == 400
    assert response.get_json()["issue"][0]["diagnostics"] == (
        "Request body is not valid JSON"
    )


def test_a_number_too_large_for_json_in_the_order_is_400(client):
    # 1e400 parses as infinity; echoed in the answer it would make it unreadable.
    body = (FIXTURES / "spine" / "esi-repeat-blind-met.json").read_text()
    raw = body.replace(
        '"status": "draft"',
        '"status": "draft", "quantityQuantity": {"value": 1e400}',
        1,
    )
    assert raw != body

    response = client.post(SIGN, data=raw, content_type="application/json")

    assert response.status_code == 400
    assert response.get_json()["issue"][0]["diagnostics"] == (
        "Request body holds a number too large for JSON"
    )


@pytest.mark.parametrize(
    "stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"]
)
def test_feedback_time_outside_utc_years_is_400(client, stamp):
    body = {
        "feedback": [
            {
                "card": "5863b50e-0000-0000-0000-000000000000",
                "outcome": "overridden",
                "outcomeTimestamp": stamp,
            }
        ]
    }

    response = client.post(FEEDBACK, json=body)

    assert response.status_code == 400
    assert response.get_json()["issue"][0]["diagnostics"] == (
        "feedback[0].outcomeTimestamp: must be a date-time from year 1 to 9999 in UTC"
    )
