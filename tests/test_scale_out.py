"""Two replicas as Compose runs them: `pain-cds serve` twice on one PostgreSQL.

The same configuration (environment) for both, as `docker compose up --scale
pain-cds=2` gives; only the port differs, where Compose gives each container its own
address. The state that must be shared (JWT replay cache, feedback, audit) is read
back from the database itself.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import jwt
import pytest
import requests
import sqlalchemy as sa
from conftest import EVALUATION_DATE, spine_request
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.storage import Store

DATABASE_URL = os.environ.get(
    "PAIN_CDS_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PUBLIC_URL = "https://cds.plan.example"  # the load balancer's URL, the JWT audience
ISSUER = "https://ehr.example.org"
SIGN = "pain-management-order-sign"


def _postgres_problem() -> str | None:
    try:
        engine = sa.create_engine(DATABASE_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # any failure means: no database to test against
        return f"no PostgreSQL at PAIN_CDS_TEST_DATABASE_URL ({type(error).__name__})"
    return None


_PROBLEM = _postgres_problem()
# .ci/run sets this in CI, where these tests must run rather than be skipped.
_REQUIRED = bool(os.environ.get("PAIN_CDS_TEST_REQUIRE_POSTGRES"))
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(_PROBLEM is not None and not _REQUIRED, reason=_PROBLEM or ""),
]


@pytest.fixture
def shared_database():
    """A PostgreSQL schema of this test's own, dropped afterwards.

    The replicas reach it through `search_path` in the URL, exactly as they would
    reach a database of their own; nothing else in `test` is touched.
    """
    if _PROBLEM:
        pytest.fail(f"{_PROBLEM}, but PAIN_CDS_TEST_REQUIRE_POSTGRES is set")
    schema = f"pain_cds_scale_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(DATABASE_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in DATABASE_URL else "?"
    url = f"{DATABASE_URL}{separator}options=-csearch_path%3D{schema}"
    store = Store(url)
    yield url, store
    store.dispose()
    with admin.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


class Issuer:
    """The EHR: an ES384 key whose public half the service trusts inline."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP384R1())
        self.kid = f"ehr-{uuid.uuid4().hex[:8]}"
        jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg="ES384")
        self.config = json.dumps([{"iss": ISSUER, "jwks": {"keys": [jwk]}}])

    def token(self, path: str) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": PUBLIC_URL + path,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims,
            self.private,
            algorithm="ES384",
            headers={"kid": self.kid, "typ": "JWT"},
        )


def _post(replica, path: str, body: dict, token: str) -> requests.Response:
    return requests.post(
        replica.url + path,
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_two_replicas_share_replay_cache_feedback_and_audit(
    serve_process, shared_database
):
    url, store = shared_database
    issuer = Issuer()
    configuration = {
        "PAIN_CDS_DATABASE_URL": url,
        "PAIN_CDS_PUBLIC_URL": PUBLIC_URL,
        "PAIN_CDS_TRUSTED_ISSUERS": issuer.config,
        "PAIN_CDS_WORKERS": "2",
        "PAIN_CDS_EVALUATION_DATE": EVALUATION_DATE,
    }
    first, second = serve_process(configuration), serve_process(configuration)
    first.wait_ready()
    second.wait_ready()
    hook_path = f"/cds-services/{SIGN}"

    # A token the first replica accepted is refused by the second.
    token = issuer.token(hook_path)
    to_first = spine_request("http://127.0.0.1:9/fhir")
    answered = _post(first, hook_path, to_first, token)
    assert answered.status_code == 200
    replayed = spine_request("http://127.0.0.1:9/fhir")
    refused = _post(second, hook_path, replayed, token)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    # ...while a fresh token from the same EHR is served there.
    to_second = spine_request("http://127.0.0.1:9/fhir")
    assert _post(second, hook_path, to_second, issuer.token(hook_path)).status_code == (
        200
    )

    # Feedback on the first call's card, sent to each replica: one item in the store.
    card = answered.json()["cards"][0]["uuid"]
    feedback_path = f"/cds-services/{SIGN}/feedback"
    feedback = {
        "feedback": [
            {
                "card": card,
                "outcome": "overridden",
                "overrideReason": {"userComment": "imaging report attached"},
                "outcomeTimestamp": "2026-12-03T18:20:00Z",
            }
        ]
    }
    stored_first = _post(first, feedback_path, feedback, issuer.token(feedback_path))
    stored_second = _post(second, feedback_path, feedback, issuer.token(feedback_path))
    assert stored_first.json() == {"received": 1, "stored": 1}
    assert stored_second.json() == {"received": 1, "stored": 0}
    items = store.feedback_items()
    assert [
        (item["card"], item["outcome"], item["user_comment"]) for item in items
    ] == [(card, "overridden", "imaging report attached")]

    # The audit record holds the calls answered by both, and the refused replay
    # (whose body is not read: its hookInstance is unknown).
    def audited():
        calls = store.calls()
        return calls if len(calls) >= 3 else None

    calls = _wait_for(audited)
    assert sorted(
        ((call["hook_instance"] or "", call["status"]) for call in calls)
    ) == sorted(
        [
            (to_first["hookInstance"], 200),
            ("", 401),
            (to_second["hookInstance"], 200),
        ]
    )
    assert {tuple(call["order_codes"]) for call in calls if call["status"] == 200} == {
        ("62323",)
    }

    assert first.terminate() == 0
    assert second.terminate() == 0


def test_replicas_started_together_create_the_tables_once(
    serve_process, shared_database
):
    url, store = shared_database
    configuration = {"PAIN_CDS_DATABASE_URL": url, "PAIN_CDS_AUTH": "off"}
    replicas = [serve_process(configuration) for _ in range(3)]
    for replica in replicas:
        replica.wait_ready()
    with store.engine.connect() as connection:
        tables = sa.inspect(connection).get_table_names()
    assert sorted(tables) == [
        "cds_audit_call",
        "cds_feedback",
        "cds_issued_card",
        "cds_jwt_jti",
    ]
    assert [replica.terminate() for replica in replicas] == [0, 0, 0]
