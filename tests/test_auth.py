"""JWT verification: every CDS Hooks trust rule, with real keys and a loopback JWKS."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler

import jwt
import pytest
from conftest import QuietHTTPServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.utils import base64url_encode

from cds_service import auth
from cds_service.auth import AuthError, Verifier, bearer_token
from cds_service.config import Settings
from cds_service.jwks import (
    DEV_SANDBOX_ISSUER,
    IssuerConfigError,
    KeyResolver,
    load_trusted_issuers,
)

BASE = "https://cds.plan.example"
AUD = BASE + "/cds-services/pain-order-sign"
ISS = "https://ehr.example.org/fhir"


# --- keys and a JWKS served over loopback --------------------------------------------


class Key:
    """A freshly generated signing key with its public JWK."""

    def __init__(self, alg: str, kid: str | None = None):
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg == "ES384":
            self.private = ec.generate_private_key(ec.SECP384R1())
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        else:
            self.private = rsa.generate_private_key(
                public_exponent=65537, key_size=2048
            )
        algorithm = ECAlgorithm if alg.startswith("ES") else RSAAlgorithm
        self.jwk = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update(kid=self.kid, use="sig")

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {alg: Key(alg) for alg in ("ES384", "RS384", "ES256", "RS256")}


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving JWK Sets by path, counting fetches."""

    def __init__(self):
        self.sets: dict[str, object] = {}
        self.hits: dict[str, int] = {}
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                time.sleep(server.delay)
                if self.path not in server.sets:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = server.sets[self.path]
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), daemon=True
        )
        self.thread.start()

    def publish(self, path: str, *keys: Key) -> str:
        self.sets[path] = {"keys": [key.jwk for key in keys]}
        return self.url + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server():
    server = JwksServer()
    yield server
    server.close()


class MemoryReplayCache:
    """Stands in for `Store.remember_jti` (same contract) in these unit tests."""

    def __init__(self):
        self.seen: dict[tuple[str, str], datetime] = {}

    def remember_jti(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        if (issuer, jti) in self.seen:
            return False
        self.seen[(issuer, jti)] = expires_at
        return True


def make_token(key: Key, *, header=None, drop=(), **claims) -> str:
    now = int(time.time())
    payload = {
        "iss": ISS,
        "aud": AUD,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    payload.update(claims)
    for name in drop:
        payload.pop(name)
    headers = {"kid": key.kid, "typ": "JWT"}
    headers.update(header or {})
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


def make_verifier(issuers_json, *, cooldown=30.0, timeout=2.0, **kwargs) -> Verifier:
    resolver = KeyResolver(timeout=timeout, lifespan=300, cooldown=cooldown)
    return Verifier(
        load_trusted_issuers(json.dumps(issuers_json)),
        resolver=resolver,
        replay_cache=kwargs.pop("replay_cache", MemoryReplayCache()),
        **kwargs,
    )


@pytest.fixture
def ehr(jwks_server, keys):
    """An EHR issuer whose JWKS (all four test keys) is served over loopback."""
    url = jwks_server.publish("/ehr/jwks.json", *keys.values())
    verifier = make_verifier([{"iss": ISS, "jwks_url": url}])
    return verifier


def refusal(verifier: Verifier, token: str, audience: str = AUD) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, audience)
    return caught.value.reason


# --- what is accepted -------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES384", "RS384", "ES256", "RS256"])
def test_accepts_each_recommended_algorithm(ehr, keys, alg):
    token = make_token(keys[alg])
    claims = ehr.verify(token, AUD)
    assert claims["iss"] == ISS
    assert claims["aud"] == AUD


def test_follows_jku_on_the_issuers_list(jwks_server, keys):
    listed = jwks_server.publish("/rotating/jwks.json", keys["ES384"])
    verifier = make_verifier([{"iss": ISS, "jku": [listed]}])
    token = make_token(keys["ES384"], header={"jku": listed})
    assert verifier.verify(token, AUD)["iss"] == ISS
    assert jwks_server.hits == {"/rotating/jwks.json": 1}


def test_inline_keys_need_no_fetch(jwks_server, keys):
    verifier = make_verifier([{"iss": ISS, "jwks": {"keys": [keys["RS384"].jwk]}}])
    assert verifier.verify(make_token(keys["RS384"]), AUD)["iss"] == ISS
    assert jwks_server.hits == {}


def test_aud_as_array_containing_the_endpoint_is_accepted(ehr, keys):
    token = make_token(keys["ES384"], aud=["https://other.example", AUD])
    assert ehr.verify(token, AUD)["aud"] == ["https://other.example", AUD]


def test_rs384_key_without_alg_member_is_accepted(jwks_server, keys):
    # Epic-style JWKS entries often omit "alg"; the kid and key type decide.
    jwk = {k: v for k, v in keys["RS384"].jwk.items() if k != "alg"}
    jwks_server.sets["/noalg.json"] = {"keys": [jwk]}
    verifier = make_verifier(
        [{"iss": ISS, "jwks_url": jwks_server.url + "/noalg.json"}]
    )
    assert verifier.verify(make_token(keys["RS384"]), AUD)["iss"] == ISS


def test_clock_skew_within_leeway_is_accepted(ehr, keys):
    now = int(time.time())
    token = make_token(keys["ES384"], iat=now + 20, nbf=now + 20, exp=now - 20 + 300)
    assert ehr.verify(token, AUD)["iat"] == now + 20
    expired_a_little = make_token(keys["ES384"], iat=now - 300, exp=now - 20)
    assert ehr.verify(expired_a_little, AUD)["exp"] == now - 20


# --- what is refused --------------------------------------------------------------


def test_alg_none_is_refused(ehr):
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": "x"},
        None,
        algorithm="none",
        headers={"kid": "whatever"},
    )
    assert refusal(ehr, token) == "algorithm none refused"


def test_hmac_signed_with_the_public_key_is_refused(ehr, keys):
    # The classic key-confusion attack: HS256 keyed with the issuer's public key.
    # PyJWT will not produce such a token, so it is assembled by hand.
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": keys["RS384"].kid}
    claims = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": "x"}
    signing_input = ".".join(
        base64url_encode(json.dumps(part).encode()).decode()
        for part in (header, claims)
    )
    mac = hmac.new(keys["RS384"].public_pem(), signing_input.encode(), hashlib.sha256)
    token = signing_input + "." + base64url_encode(mac.digest()).decode()
    assert refusal(ehr, token) == "algorithm HS256 refused"


def test_algorithm_outside_the_issuers_own_list_is_refused(jwks_server, keys):
    url = jwks_server.publish("/es-only.json", keys["RS256"])
    verifier = make_verifier([{"iss": ISS, "jwks_url": url, "algorithms": ["ES384"]}])
    reason = refusal(verifier, make_token(keys["RS256"]))
    assert reason == "algorithm RS256 not accepted for this issuer"


def test_untrusted_issuer_is_refused(ehr, keys):
    token = make_token(keys["ES384"], iss="https://attacker.example")
    assert refusal(ehr, token) == "issuer not trusted"


def test_jku_not_on_the_list_is_refused_and_never_fetched(jwks_server, keys):
    listed = jwks_server.publish("/listed.json", keys["ES384"])
    foreign = jwks_server.publish("/attacker.json", keys["ES384"])
    verifier = make_verifier([{"iss": ISS, "jku": [listed]}])
    token = make_token(keys["ES384"], header={"jku": foreign})
    assert refusal(verifier, token) == "jku is not on the issuer's list"
    assert jwks_server.hits == {}


def test_missing_kid_is_refused(ehr, keys):
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": "x"},
        keys["ES384"].private,
        algorithm="ES384",
    )
    assert refusal(ehr, token) == "no kid in the token header"


def test_unknown_kid_is_refused(ehr, keys):
    stranger = Key("ES384", kid="not-published")
    assert refusal(ehr, make_token(stranger)) == (
        "no key with this kid in the issuer's JWK Set"
    )


def test_signature_by_another_key_under_a_known_kid_is_refused(ehr, keys):
    impostor = Key("ES384", kid=keys["ES384"].kid)
    assert refusal(ehr, make_token(impostor)) == "signature does not verify"


def test_alg_that_does_not_fit_the_key_is_refused(ehr, keys):
    # ES256 header naming the P-384 key: the curve does not fit the algorithm.
    mislabelled = Key("ES256", kid=keys["ES384"].kid)
    assert refusal(ehr, make_token(mislabelled)) == (
        f"key {keys['ES384'].kid} does not fit ES256"
    )
    rsa_on_ec = Key("RS384", kid=keys["ES384"].kid)
    assert refusal(ehr, make_token(rsa_on_ec)) == (
        f"key {keys['ES384'].kid} does not fit RS384"
    )


def test_audience_must_be_the_configured_endpoint_url(ehr, keys):
    token = make_token(keys["ES384"], aud=BASE + "/cds-services/other")
    assert refusal(ehr, token) == "aud is not this endpoint's public URL"


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_each_required_claim_missing_is_refused(ehr, keys, claim):
    reason = refusal(ehr, make_token(keys["ES384"], drop=[claim]))
    expected = "issuer not trusted" if claim == "iss" else f"missing claim {claim}"
    assert reason == expected


def test_expired_token_is_refused(ehr, keys):
    now = int(time.time())
    token = make_token(keys["ES384"], iat=now - 400, exp=now - 31)
    assert refusal(ehr, token) == "token expired"


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_token_from_the_future_is_refused(ehr, keys, claim):
    now = int(time.time())
    token = make_token(keys["ES384"], **{claim: now + 120}, exp=now + 400)
    assert refusal(ehr, token) == "token not yet valid (iat or nbf in the future)"


def test_token_living_longer_than_the_replay_window_is_refused(ehr, keys):
    now = int(time.time())
    token = make_token(keys["ES384"], iat=now, exp=now + 3601)
    assert refusal(ehr, token) == "token lifetime over 3600 s"


def test_replayed_jti_is_refused(ehr, keys):
    token = make_token(keys["ES384"], jti="once-only")
    ehr.verify(token, AUD)
    assert refusal(ehr, token) == "jti already used (replay)"
    fresh = make_token(keys["RS384"], jti="once-only")
    assert refusal(ehr, fresh) == "jti already used (replay)"


def test_replay_cache_keeps_jti_until_exp_plus_leeway(jwks_server, keys):
    cache = MemoryReplayCache()
    url = jwks_server.publish("/k.json", keys["ES384"])
    verifier = make_verifier([{"iss": ISS, "jwks_url": url}], replay_cache=cache)
    now = int(time.time())
    verifier.verify(make_token(keys["ES384"], jti="j1", exp=now + 300), AUD)
    assert cache.seen[(ISS, "j1")].timestamp() == now + 300 + 30


def test_refused_token_does_not_burn_its_jti(ehr, keys):
    wrong_aud = make_token(keys["ES384"], jti="j2", aud=BASE + "/elsewhere")
    refusal(ehr, wrong_aud)
    assert ehr.verify(make_token(keys["ES384"], jti="j2"), AUD)["jti"] == "j2"


def test_tenant_must_be_listed_when_the_issuer_has_tenants(jwks_server, keys):
    url = jwks_server.publish("/t.json", keys["ES384"])
    verifier = make_verifier([{"iss": ISS, "jwks_url": url, "tenants": ["north"]}])
    assert verifier.verify(make_token(keys["ES384"], tenant="north"), AUD)
    reason = refusal(verifier, make_token(keys["ES384"], tenant="south"))
    assert reason == "tenant not trusted for this issuer"


@pytest.mark.parametrize(
    "token, reason",
    [
        ("", "malformed token"),
        ("abc", "malformed token"),
        ("a.b.c", "malformed token"),
        ("e30.e30.", "algorithm (unreadable) refused"),
        ("x" * 20_000, "token too large"),
        ("Ã©.ü.∂", "malformed token"),
    ],
)
def test_malformed_tokens_are_refused(ehr, token, reason):
    assert refusal(ehr, token) == reason


@pytest.mark.parametrize(
    "header, reason",
    [
        (None, "no bearer token"),
        ("", "no bearer token"),
        ("Basic dXNlcjpwdw==", "no bearer token"),
        ("Bearer ", "no bearer token"),
    ],
)
def test_authorization_header_must_be_bearer(header, reason):
    with pytest.raises(AuthError) as caught:
        bearer_token(header)
    assert caught.value.reason == reason
    assert bearer_token("bearer  abc.def.ghi ") == "abc.def.ghi"


# --- the JWKS cache: rotation, rate limit, timeout --------------------------------


def test_rotated_key_is_fetched_on_unknown_kid(jwks_server, keys):
    old, new = keys["ES384"], Key("ES384")
    url = jwks_server.publish("/rot.json", old)
    verifier = make_verifier([{"iss": ISS, "jwks_url": url}], cooldown=0)
    verifier.verify(make_token(old), AUD)
    jwks_server.publish("/rot.json", old, new)
    assert verifier.verify(make_token(new), AUD)["iss"] == ISS
    verifier.verify(make_token(old), AUD)
    assert jwks_server.hits["/rot.json"] == 2


def test_unknown_kids_refetch_at_most_once_per_cooldown(jwks_server, keys):
    url = jwks_server.publish("/rl.json", keys["ES384"])
    verifier = make_verifier([{"iss": ISS, "jwks_url": url}], cooldown=30)
    verifier.verify(make_token(keys["ES384"]), AUD)
    for n in range(20):
        refusal(verifier, make_token(Key("ES256", kid=f"made-up-{n}")))
    assert jwks_server.hits["/rl.json"] == 1


def test_slow_jwks_endpoint_times_out(jwks_server, keys):
    url = jwks_server.publish("/slow.json", keys["ES384"])
    jwks_server.delay = 3.0
    verifier = make_verifier([{"iss": ISS, "jwks_url": url}], timeout=0.5)
    started = time.monotonic()
    reason = refusal(verifier, make_token(keys["ES384"]))
    assert reason == "issuer's JWK Set could not be fetched"
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"<html>oops</html>", "issuer's JWK Set is not usable"),
        (b'{"keys": []}', "issuer's JWK Set is not usable"),
        (b"[1, 2]", "no key with this kid in the issuer's JWK Set"),
    ],
)
def test_broken_jwks_is_refusal_not_crash(jwks_server, keys, body, reason):
    jwks_server.sets["/broken.json"] = body
    verifier = make_verifier(
        [{"iss": ISS, "jwks_url": jwks_server.url + "/broken.json"}]
    )
    assert refusal(verifier, make_token(keys["ES384"])) == reason


def test_unreachable_jwks_is_refused(keys):
    verifier = make_verifier([{"iss": ISS, "jwks_url": "http://127.0.0.1:9/jwks"}])
    assert refusal(verifier, make_token(keys["ES384"])) == (
        "issuer's JWK Set could not be fetched"
    )


# --- issuer configuration -----------------------------------------------------------


def test_issuers_from_json_yaml_and_keyed_object(tmp_path, keys):
    entry = {"jwks_url": "https://ehr.example.org/jwks", "algorithms": ["RS384"]}
    yaml_file = tmp_path / "issuers.yaml"
    yaml_file.write_text(
        f"issuers:\n  - iss: {ISS}\n    jwks_url: {entry['jwks_url']}\n"
    )
    json_file = tmp_path / "issuers.json"
    json_file.write_text(json.dumps({ISS: entry}))

    from_yaml = load_trusted_issuers(str(yaml_file))
    from_json = load_trusted_issuers(str(json_file))
    inline = load_trusted_issuers(json.dumps([{"iss": ISS, **entry}]))

    assert [i.iss for i in from_yaml] == [ISS]
    assert from_yaml[0].algorithms == ("ES384", "RS384", "ES256", "RS256")
    assert from_json[0].algorithms == ("RS384",)
    assert inline[0].jwks_url == "https://ehr.example.org/jwks"
    assert load_trusted_issuers("  ") == []


@pytest.mark.parametrize(
    "config, message",
    [
        (
            [{"iss": ISS}],
            f"trusted issuer {ISS}: give `jwks_url`, `jku` or inline `jwks`",
        ),
        (
            [{"iss": ISS, "jwks_url": "http://ehr.example.org/jwks"}],
            f"trusted issuer {ISS}: `jwks_url` must use https (http only on loopback)",
        ),
        (
            [{"iss": ISS, "jku": ["https://a/j"], "algorithms": ["HS256"]}],
            f"trusted issuer {ISS}: `algorithms` may only list "
            "ES384, RS384, ES256, RS256",
        ),
        (
            [{"jku": "https://a/j"}],
            "trusted issuer #1: `iss` must be a non-empty string",
        ),
        (
            [{"iss": ISS, "jku": "https://a/j", "jwks_uri": "x"}],
            f"trusted issuer {ISS}: unknown field(s) jwks_uri",
        ),
        (
            [{"iss": ISS, "jku": "https://a/j"}, {"iss": ISS, "jku": "https://b/j"}],
            f"trusted issuers: {ISS} listed twice",
        ),
        ({"issuers": "nope"}, "trusted issuers: expected a list of issuers"),
    ],
)
def test_bad_issuer_configuration_names_what_is_wrong(config, message):
    with pytest.raises(IssuerConfigError) as caught:
        load_trusted_issuers(json.dumps(config))
    assert str(caught.value) == message


def test_missing_issuer_file_is_a_clear_error(tmp_path):
    with pytest.raises(IssuerConfigError) as caught:
        load_trusted_issuers(str(tmp_path / "nope.yaml"))
    assert str(caught.value) == (
        f"trusted issuers file {tmp_path / 'nope.yaml'}: No such file or directory"
    )


def test_sandbox_issuer_is_trusted_only_when_asked(keys):
    off = auth.verifier_from_settings(Settings(), MemoryReplayCache())
    on = auth.verifier_from_settings(
        Settings(dev_trust_sandbox=True), MemoryReplayCache()
    )
    assert DEV_SANDBOX_ISSUER.iss not in off.issuers
    assert on.issuers[DEV_SANDBOX_ISSUER.iss].allowed_jku == (
        "https://sandbox.cds-hooks.org/.well-known/jwks.json",
        "https://sandbox.cds-hooks.org/.well-known/jwks.json",
    )
    token = make_token(
        keys["ES384"],
        iss=DEV_SANDBOX_ISSUER.iss,
        header={"jku": "http://127.0.0.1:9/not-the-sandbox.json"},
    )
    assert refusal(off, token) == "issuer not trusted"
    assert refusal(on, token) == "jku is not on the issuer's list"
    assert refusal(on, make_token(keys["RS384"], iss=DEV_SANDBOX_ISSUER.iss)) == (
        "algorithm RS384 not accepted for this issuer"
    )


# --- wired into Flask ---------------------------------------------------------------


def small_app(settings: Settings, cache=None) -> Flask:
    app = Flask("auth-test")

    @app.route("/cds-services", methods=["GET"])
    def discovery():
        return {"services": []}

    @app.route("/cds-services/<service>", methods=["POST"])
    def hook(service):
        return {"cards": []}

    @app.route("/healthz")
    def healthz():
        return "ok"

    auth.init_app(app, settings, cache)
    return app


@pytest.fixture
def guarded(jwks_server, keys):
    url = jwks_server.publish("/app.json", *keys.values())
    settings = Settings(
        public_url=BASE, trusted_issuers=json.dumps([{"iss": ISS, "jwks_url": url}])
    )
    return small_app(settings, MemoryReplayCache()).test_client()


def test_valid_token_reaches_the_handler(guarded, keys):
    token = make_token(keys["RS384"])
    response = guarded.post(
        "/cds-services/pain-order-sign",
        json={},
        headers={"Authorization": "Bearer " + token},
    )
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_refusal_is_a_bare_401_and_the_log_names_the_reason(guarded, keys, caplog):
    token = make_token(keys["ES384"], aud=BASE + "/cds-services")
    with caplog.at_level(logging.DEBUG):
        response = guarded.post(
            "/cds-services/pain-order-sign",
            json={},
            headers={"Authorization": "Bearer " + token},
        )
    assert response.status_code == 401
    assert response.data == b""
    assert response.headers["WWW-Authenticate"] == "Bearer"
    refused = [r for r in caplog.records if r.name == "cds_service.auth"]
    assert [r.getMessage() for r in refused] == [
        "call refused: aud is not this endpoint's public URL"
    ]
    assert refused[0].iss == ISS
    assert token not in caplog.text
    assert token.split(".")[1] not in caplog.text


def test_audience_comes_from_settings_not_the_host_header(guarded, keys):
    spoofed = make_token(keys["ES384"], aud="http://evil.example/cds-services")
    response = guarded.get(
        "/cds-services",
        headers={"Authorization": "Bearer " + spoofed, "Host": "evil.example"},
    )
    assert response.status_code == 401
    honest = make_token(keys["ES384"], aud=BASE + "/cds-services")
    response = guarded.get(
        "/cds-services",
        headers={"Authorization": "Bearer " + honest, "Host": "evil.example"},
    )
    assert response.status_code == 200


def test_no_token_is_refused_and_preflight_and_health_pass(guarded):
    assert guarded.get("/cds-services").status_code == 401
    assert guarded.post("/cds-services/pain-order-sign", json={}).status_code == 401
    assert guarded.get("/nowhere").status_code == 401
    assert guarded.options("/cds-services/pain-order-sign").status_code == 200
    assert guarded.get("/healthz").status_code == 200


def test_auth_is_on_by_default_and_refuses_everything_without_issuers(caplog):
    with caplog.at_level(logging.WARNING, logger="cds_service.auth"):
        client = small_app(Settings.from_env({}), MemoryReplayCache()).test_client()
    assert client.get("/cds-services").status_code == 401
    assert "no trusted JWT issuers configured" in caplog.text


def test_auth_off_warns_at_start_and_on_every_call(caplog):
    with caplog.at_level(logging.WARNING, logger="cds_service.auth"):
        client = small_app(Settings.from_env({"PAIN_CDS_AUTH": "off"})).test_client()
        assert client.get("/cds-services").status_code == 200
        assert client.post("/cds-services/x", json={}).status_code == 200
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("AUTHENTICATION IS OFF")
    assert messages[1:] == ["unauthenticated call served (authentication is off)"] * 2


def test_without_a_replay_store_calls_are_refused(jwks_server, keys):
    url = jwks_server.publish("/nostore.json", keys["ES384"])
    settings = Settings(
        public_url=BASE, trusted_issuers=json.dumps([{"iss": ISS, "jwks_url": url}])
    )
    client = small_app(settings).test_client()
    token = make_token(keys["ES384"], aud=BASE + "/cds-services")
    response = client.get("/cds-services", headers={"Authorization": "Bearer " + token})
    assert response.status_code == 401


# --- in the real application ------------------------------------------------------


@pytest.fixture
def service(jwks_server, keys, guideline, tmp_path):
    """create_app with authentication on, its issuer's JWKS served over loopback."""
    from cds_service import create_app

    def build(database="audit.sqlite"):
        url = jwks_server.publish("/service.json", *keys.values())
        settings = Settings(
            public_url=BASE,
            trusted_issuers=json.dumps([{"iss": ISS, "jwks_url": url}]),
            database_url=f"sqlite:///{tmp_path / database}",
        )
        return create_app(settings, guideline=guideline).test_client()

    return build


ENDPOINTS = [
    ("GET", "/cds-services"),
    ("POST", "/cds-services/pain-management-order-select"),
    ("POST", "/cds-services/pain-management-order-sign"),
    ("POST", "/cds-services/pain-management-order-sign/feedback"),
]


@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_preflight_needs_no_token_and_refusals_carry_cors(service, method, path):
    client = service()
    origin = {"Origin": "https://sandbox.cds-hooks.org"}
    preflight = client.options(
        path,
        headers={
            **origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin["Origin"]
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert {"authorization", "content-type"} <= set(allowed.split(", "))

    refused = client.open(path, method=method, json={}, headers=origin)
    assert refused.status_code == 401
    assert refused.data == b""
    assert refused.headers["Access-Control-Allow-Origin"] == origin["Origin"]


@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_each_endpoint_accepts_a_token_for_its_own_url(service, keys, method, path):
    client = service()
    token = make_token(keys["ES384"], aud=BASE + path)
    body = {"feedback": []} if path.endswith("feedback") else {}
    response = client.open(
        path, method=method, json=body, headers={"Authorization": "Bearer " + token}
    )
    # Past authentication: discovery answers, the others judge the (empty) body.
    assert response.status_code == (200 if method == "GET" else 400)


def test_health_and_metrics_need_no_token(service):
    client = service()
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_replicas_sharing_a_database_refuse_each_others_replays(service, keys):
    first, second = service("shared.sqlite"), service("shared.sqlite")
    token = make_token(keys["RS384"], aud=BASE + "/cds-services")
    headers = {"Authorization": "Bearer " + token}
    assert first.get("/cds-services", headers=headers).status_code == 200
    assert second.get("/cds-services", headers=headers).status_code == 401


def test_no_auth_switch_of_the_command_line():
    from cds_service.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--no-auth"])
    assert settings_from_args(args).auth is False
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).auth is True
