"""Fuzzing over real HTTP with a real JWT per call: schemathesis from openapi.yaml,
and hypothesis mutations of the realdata requests. No call may get a 5xx.

Bounded for CI: about 150 schemathesis cases per operation and 150 mutations per
hook service; the module prints the number of cases run per endpoint.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import re
import threading
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests
import schemathesis
from conftest import EVALUATION_DATE, realdata, spine_request
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm
from werkzeug.serving import make_server

from cds_service.config import Settings

OPENAPI = Path(__file__).resolve().parent.parent / "cds_service" / "openapi.yaml"
ISS = "https://ehr.fuzz.example"
KID = "fuzz-es384"
SIGNING_KEY = ec.generate_private_key(ec.SECP384R1())
SCHEMATHESIS_EXAMPLES = 60
MUTATION_EXAMPLES = 150

# Cases sent per endpoint and status, and every 5xx seen (must stay empty).
CASES: collections.Counter = collections.Counter()
SERVER_ERRORS: list[str] = []


class FuzzTarget:
    """The app, authentication on, served by a threaded WSGI server on loopback."""

    def __init__(self, guideline, database: Path, fhir_url: str):
        # The public URL (JWT audience) needs the port, so bind before building.
        self._app = None
        self.server = make_server(
            "127.0.0.1", 0, lambda env, start: self._app(env, start), threaded=True
        )
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.fhir_url = fhir_url
        jwk = ECAlgorithm.to_jwk(SIGNING_KEY.public_key(), as_dict=True)
        jwk.update(kid=KID, use="sig")
        from cds_service import create_app

        self._app = create_app(
            Settings(
                public_url=self.url,
                trusted_issuers=json.dumps([{"iss": ISS, "jwks": {"keys": [jwk]}}]),
                database_url=f"sqlite:///{database}",
                evaluation_date=EVALUATION_DATE,
                fhir_timeout=0.5,
                fhir_deadline=1.0,
            ),
            guideline=guideline,
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, path: str) -> str:
        now = int(time.time())
        claims = {
            "iss": ISS,
            "aud": self.url + path,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, SIGNING_KEY, algorithm="ES384", headers={"kid": KID, "typ": "JWT"}
        )

    def close(self):
        self.server.shutdown()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def target(guideline, tmp_path_factory, _fhir_stub_server):
    served = FuzzTarget(
        guideline,
        tmp_path_factory.mktemp("fuzz") / "audit.sqlite",
        _fhir_stub_server.url,
    )
    yield served
    served.close()


def record(endpoint: str, response) -> None:
    CASES[(endpoint, response.status_code)] += 1
    if response.status_code >= 500:
        SERVER_ERRORS.append(
            f"{endpoint}: {response.status_code} {response.text[:200]}"
        )


def keep_on_loopback(body, fhir_url: str):
    """A generated fhirServer must never send the service off this machine."""
    if isinstance(body, dict) and "fhirServer" in body:
        body["fhirServer"] = fhir_url
    return body


REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-\.]{1,64}$")


def selections_among_drafts(body):
    """Generated selections name random orders; the service refuses any that is not
    in draftOrders (a rule OpenAPI cannot state), so keep those that are."""
    context = body.get("context") if isinstance(body, dict) else None
    if not isinstance(context, dict) or not isinstance(context.get("selections"), list):
        return body
    drafts = context.get("draftOrders")
    entries = drafts.get("entry") if isinstance(drafts, dict) else None
    references = {
        f"{entry['resource'].get('resourceType')}/{entry['resource'].get('id')}"
        for entry in (entries if isinstance(entries, list) else [])
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
    }
    # Only well-formed references are dropped: a malformed one must still be refused.
    context["selections"] = [
        s
        for s in context["selections"]
        if not (isinstance(s, str) and REFERENCE.match(s)) or s in references
    ]
    return body


# --- schemathesis, from the shipped OpenAPI description -----------------------------

schema = schemathesis.openapi.from_path(OPENAPI)


@schema.parametrize()
@settings(
    max_examples=SCHEMATHESIS_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_openapi_operations_never_fail_with_5xx(case, target):
    path = case.formatted_path
    case.body = selections_among_drafts(keep_on_loopback(case.body, target.fhir_url))
    headers = {"Authorization": "Bearer " + target.token(path)}
    response = case.call(base_url=target.url, headers=headers, timeout=15)
    record(f"{case.method} {case.path}", response)
    assert response.status_code < 500, response.text[:300]
    # The documented contract: status codes, content types and body schemas.
    case.validate_response(response, headers=headers)


def test_token_for_another_endpoint_is_refused_by_the_app(target):
    path = "/cds-services/pain-management-order-sign"
    token = target.token("/cds-services")
    response = requests.post(
        target.url + path,
        json=spine_request(target.fhir_url),
        headers={"Authorization": "Bearer " + token},
        timeout=15,
    )
    assert response.status_code == 401
    assert response.content == b""


def test_replayed_token_is_refused_by_the_app(target):
    url = target.url + "/cds-services"
    headers = {"Authorization": "Bearer " + target.token("/cds-services")}
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    assert requests.get(url, headers=headers, timeout=5).status_code == 401


# --- hypothesis: mutations of real requests -----------------------------------------

REQUEST_FILES = {
    "cds-hooks-sandbox__rx-view_order-select_captured.json": "order-select",
    "cds-hooks-sandbox__rx-sign_order-sign_captured.json": "order-sign",
    "crd-test-kit__order_select_hook_request.json": "order-select",
    "davinci-crd-ri__r4-ordersign_requestWithHydratedPrefetchBundle.json": "order-sign",
    "cds-hooks-docs__order-sign_example-r4.json": "order-sign",
}
SERVICE = {
    "order-select": "pain-management-order-select",
    "order-sign": "pain-management-order-sign",
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "2023", "2023-02-30", "Patient/", "T", "\u0000", "62323"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def _seed_requests(fhir_url: str) -> list[tuple[str, dict]]:
    seeds = []
    for name, hook in REQUEST_FILES.items():
        body = realdata(name)
        if "hook" not in body:
            body = {"hook": hook, "hookInstance": str(uuid.uuid4()), **body}
        seeds.append((hook, keep_on_loopback(body, fhir_url)))
    for cpt in ("62323", "64483", "64493", "27096", "20552"):
        seeds.append(("order-sign", spine_request(fhir_url, cpt=cpt)))
    return seeds


@functools.cache
def _seeds(fhir_url: str, hook: str) -> tuple[dict, ...]:
    return tuple(
        body for seed_hook, body in _seed_requests(fhir_url) if seed_hook == hook
    )


def _containers(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _containers(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            yield from _containers(child, path + (index,))


@st.composite
def mutated_requests(draw, fhir_url: str, hook: str):
    """A realdata request with 1-4 random edits: replace, delete, insert, or
    duplicate a value anywhere in it."""
    body = copy.deepcopy(draw(st.sampled_from(_seeds(fhir_url, hook))))
    for _ in range(draw(st.integers(1, 4))):
        places = list(_containers(body))
        path, value = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "delete", "insert", "duplicate"]))
        if not path:
            continue
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif action == "insert" and isinstance(value, dict):
            value[draw(st.text(max_size=12))] = draw(json_values)
        elif action == "insert" and isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(json_values))
        elif action == "duplicate" and isinstance(value, list) and value:
            value.extend(value * draw(st.integers(1, 3)))
    return keep_on_loopback(body, fhir_url)


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_mutated_realdata_requests_never_fail_with_5xx(target, hook):
    path = f"/cds-services/{SERVICE[hook]}"
    statuses = collections.Counter()

    @settings(
        max_examples=MUTATION_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(mutated_requests(target.fhir_url, hook))
    def send(body):
        response = requests.post(
            target.url + path,
            data=json.dumps(body),
            headers={
                "Authorization": "Bearer " + target.token(path),
                "Content-Type": "application/json",
            },
            timeout=15,
        )
        record(f"mutated {hook}", response)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400:
            assert response.json()["resourceType"] == "OperationOutcome"
        else:
            assert isinstance(response.json()["cards"], list)

    send()
    assert sum(statuses.values()) >= MUTATION_EXAMPLES
    # The mutations must reach the service's logic, not only the validator.
    assert statuses[200] > 0 and statuses[400] > 0


def test_no_server_error_in_the_whole_fuzz_run(capsys):
    with capsys.disabled():
        print()
        for (endpoint, status), count in sorted(CASES.items()):
            print(f"fuzz: {endpoint} -> {status}: {count} cases")
        print(f"fuzz: {sum(CASES.values())} cases, 5xx seen: {len(SERVER_ERRORS)}")
    assert SERVER_ERRORS == []
