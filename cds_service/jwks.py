"""Trusted JWT issuers and their signing keys (inline JWKS or fetched and cached)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from jwt import PyJWK, PyJWKClient, PyJWKSet
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError, PyJWTError

logger = logging.getLogger(__name__)

# CDS Hooks 2.0 recommends ES384 and RS384; some clients still sign with the 256-bit
# variants. `none` and every symmetric (HS*) algorithm are refused by the spec.
ACCEPTED_ALGORITHMS = ("ES384", "RS384", "ES256", "RS256")

# URLs of a trusted key set must be https; plain http only on loopback (tests, a
# local EHR simulator), so that nobody on the path can swap the keys.
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class IssuerConfigError(ValueError):
    """The trusted-issuer configuration cannot be used; the message says where."""


class KeyLookupError(Exception):
    """No usable key for a token; `reason` is safe to log (it holds no token)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrustedIssuer:
    """One EHR allowed to call the service, with where its signing keys are."""

    iss: str
    jwks_url: str | None = None
    # Key-set URLs a token may name in its `jku` header; anything else is refused.
    jku: tuple[str, ...] = ()
    jwks: PyJWKSet | None = None
    algorithms: tuple[str, ...] = ACCEPTED_ALGORITHMS
    # When set, the token's `tenant` claim must be one of these.
    tenants: tuple[str, ...] = ()

    @property
    def allowed_jku(self) -> tuple[str, ...]:
        return self.jku + ((self.jwks_url,) if self.jwks_url else ())


# The public CDS Hooks sandbox (sandbox.cds-hooks.org). Its private key is published
# in its repository, so a token it signs proves nothing: development use only.
SANDBOX_JWKS_URL = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
DEV_SANDBOX_ISSUER = TrustedIssuer(
    iss="https://sandbox.cds-hooks.org",
    jwks_url=SANDBOX_JWKS_URL,
    jku=(SANDBOX_JWKS_URL,),
    algorithms=("ES384",),
)


def load_trusted_issuers(value: str) -> list[TrustedIssuer]:
    """Read the issuer list from JSON text or from a JSON/YAML file path.

    Accepted shapes: a list of issuer objects, `{"issuers": [...]}`, or an object
    keyed by `iss`. Each issuer object has `iss`, and `jwks_url` and/or `jwks`
    (an inline JWK Set), optionally `jku` (list of URLs), `algorithms`, `tenants`.
    """
    text = value.strip()
    if not text:
        return []
    if text[0] in "[{":
        data = _parse(text, "PAIN_CDS_TRUSTED_ISSUERS", as_yaml=False)
    else:
        path = Path(text)
        try:
            content = path.read_text(encoding="utf-8")
        except OSError as error:
            raise IssuerConfigError(
                f"trusted issuers file {text}: {error.strerror}"
            ) from None
        data = _parse(content, text, as_yaml=path.suffix.lower() in {".yaml", ".yml"})

    if isinstance(data, dict) and "issuers" in data:
        data = data["issuers"]
    if isinstance(data, dict):
        data = [
            {"iss": iss, **entry} if isinstance(entry, dict) else entry
            for iss, entry in data.items()
        ]
    if not isinstance(data, list):
        raise IssuerConfigError("trusted issuers: expected a list of issuers")

    issuers = [_issuer(entry, index) for index, entry in enumerate(data)]
    seen = set()
    for issuer in issuers:
        if issuer.iss in seen:
            raise IssuerConfigError(f"trusted issuers: {issuer.iss} listed twice")
        seen.add(issuer.iss)
    return issuers


def _parse(text: str, source: str, *, as_yaml: bool) -> Any:
    try:
        return yaml.safe_load(text) if as_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as error:
        raise IssuerConfigError(f"trusted issuers {source}: {error}") from None


def _issuer(entry: Any, index: int) -> TrustedIssuer:
    where = f"trusted issuer #{index + 1}"
    if not isinstance(entry, dict):
        raise IssuerConfigError(f"{where}: expected an object")
    iss = entry.get("iss")
    if not isinstance(iss, str) or not iss:
        raise IssuerConfigError(f"{where}: `iss` must be a non-empty string")
    where = f"trusted issuer {iss}"

    unknown = set(entry) - {"iss", "jwks_url", "jku", "jwks", "algorithms", "tenants"}
    if unknown:
        raise IssuerConfigError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}"
        )

    jwks_url = entry.get("jwks_url")
    if jwks_url is not None:
        _check_url(jwks_url, f"{where}: `jwks_url`")
    jku = _strings(entry.get("jku", []), f"{where}: `jku`")
    for url in jku:
        _check_url(url, f"{where}: `jku`")

    jwks = None
    if entry.get("jwks") is not None:
        try:
            jwks = PyJWKSet.from_dict(entry["jwks"])
        except (PyJWTError, TypeError, AttributeError) as error:
            raise IssuerConfigError(
                f"{where}: `jwks` is not a usable JWK Set: {error}"
            ) from None
    if jwks is None and not jwks_url and not jku:
        raise IssuerConfigError(f"{where}: give `jwks_url`, `jku` or inline `jwks`")

    algorithms = _strings(
        entry.get("algorithms", list(ACCEPTED_ALGORITHMS)), f"{where}: `algorithms`"
    )
    refused = [alg for alg in algorithms if alg not in ACCEPTED_ALGORITHMS]
    if refused or not algorithms:
        raise IssuerConfigError(
            f"{where}: `algorithms` may only list {', '.join(ACCEPTED_ALGORITHMS)}"
        )
    tenants = _strings(entry.get("tenants", []), f"{where}: `tenants`")
    return TrustedIssuer(iss, jwks_url, jku, jwks, algorithms, tenants)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IssuerConfigError(f"{where} must be a string or a list of strings")
    return tuple(value)


def _check_url(url: Any, where: str) -> None:
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or not parsed.hostname:
        raise IssuerConfigError(f"{where} must be an absolute URL")
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http" and parsed.hostname in _LOOPBACK_HOSTS:
        return
    raise IssuerConfigError(f"{where} must use https (http only on loopback)")


class KeyResolver:
    """Finds the key a token names, fetching JWK Sets with a timeout and caching them.

    One `PyJWKClient` per key-set URL: it caches the set for `lifespan` seconds and
    refetches on an unknown `kid` (key rotation) at most once per `cooldown` seconds,
    so tokens with made-up kids cannot make us hammer the EHR's key endpoint. Only
    URLs from the configuration are ever fetched, which bounds the number of clients.
    """

    def __init__(self, *, timeout: float, lifespan: float, cooldown: float = 30):
        self.timeout = timeout
        self.lifespan = lifespan
        self.cooldown = cooldown
        self._clients: dict[str, PyJWKClient] = {}
        self._lock = threading.Lock()

    def key_for(self, issuer: TrustedIssuer, header: dict) -> PyJWK:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise KeyLookupError("no kid in the token header")

        jku = header.get("jku")
        if jku is not None:
            if jku not in issuer.allowed_jku:
                raise KeyLookupError("jku is not on the issuer's list")
            return self._fetched_key(jku, kid)
        if issuer.jwks is not None:
            for key in issuer.jwks.keys:
                if key.key_id == kid and key.public_key_use in ("sig", None):
                    return key
            if not issuer.jwks_url:
                raise KeyLookupError("no key with this kid in the issuer's JWK Set")
        url = issuer.jwks_url or issuer.jku[0]
        return self._fetched_key(url, kid)

    def _fetched_key(self, url: str, kid: str) -> PyJWK:
        try:
            return self._client(url).get_signing_key(kid)
        except PyJWKClientConnectionError:
            logger.error("JWK Set could not be fetched", extra={"jwks_url": url})
            raise KeyLookupError("issuer's JWK Set could not be fetched") from None
        except PyJWKClientError:
            raise KeyLookupError(
                "no key with this kid in the issuer's JWK Set"
            ) from None
        except (PyJWTError, ValueError):
            # ValueError: the endpoint answered something that is not JSON.
            raise KeyLookupError("issuer's JWK Set is not usable") from None

    def _client(self, url: str) -> PyJWKClient:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = PyJWKClient(
                    url,
                    cache_jwk_set=True,
                    lifespan=self.lifespan,
                    timeout=self.timeout,
                    cooldown_duration=self.cooldown,
                )
                self._clients[url] = client
            return client
