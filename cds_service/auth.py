"""Verify the CDS Hooks JWT on every call (CDS Hooks 2.0, "Trusting CDS Clients")."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from flask import Flask, Response, current_app, g, request

from .config import Settings
from .jwks import (
    ACCEPTED_ALGORITHMS,
    DEV_SANDBOX_ISSUER,
    KeyLookupError,
    KeyResolver,
    TrustedIssuer,
    load_trusted_issuers,
)

logger = logging.getLogger(__name__)

# Operational endpoints a load balancer or Prometheus reads without a token. They
# carry no patient data. Everything else, unknown paths included, needs a token.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# A CDS Hooks JWT is a few hundred bytes; refusing huge ones early keeps a hostile
# caller from making us base64-decode megabytes.
MAX_TOKEN_CHARS = 16_384

# Which key type (and curve) each accepted algorithm needs; a token whose `alg`
# does not fit the key it names is refused rather than verified some other way.
_KEY_FOR_ALGORITHM = {
    "ES256": (EllipticCurvePublicKey, "secp256r1"),
    "ES384": (EllipticCurvePublicKey, "secp384r1"),
    "RS256": (RSAPublicKey, None),
    "RS384": (RSAPublicKey, None),
}

_CLAIM_ERRORS = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid (iat or nbf in the future)"),
    (jwt.InvalidAudienceError, "aud is not this endpoint's public URL"),
    (jwt.InvalidIssuerError, "iss does not match"),
    (jwt.InvalidSignatureError, "signature does not verify"),
    (jwt.InvalidIssuedAtError, "iat is not a number"),
)


class ReplayCache(Protocol):
    """What the verifier needs from the store (`cds_service.storage.Store`)."""

    def remember_jti(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        """Record a jti until `expires_at`; False when it was already recorded."""


class AuthError(Exception):
    """A refused token; `reason` names the failed check and never holds the token."""

    def __init__(self, reason: str, issuer: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.issuer = issuer


class Verifier:
    """Checks a CDS Hooks JWT against the trusted issuers and the replay cache."""

    def __init__(
        self,
        issuers: list[TrustedIssuer],
        *,
        resolver: KeyResolver,
        replay_cache: ReplayCache | None = None,
        leeway: int = 30,
        max_lifetime: int = 3600,
    ):
        self.issuers = {issuer.iss: issuer for issuer in issuers}
        self.resolver = resolver
        self.replay_cache = replay_cache
        self.leeway = leeway
        self.max_lifetime = max_lifetime

    def verify(self, token: str, audience: str) -> dict:
        """Return the token's claims, or raise AuthError naming the failed check."""
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token too large")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None

        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            # `alg` comes from the caller: only name it when it is a short word.
            shown = (
                alg if isinstance(alg, str) and alg.isalnum() and len(alg) < 10 else ""
            )
            raise AuthError(f"algorithm {shown or '(unreadable)'} refused")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError("typ is not JWT")

        issuer = self.issuers.get(unverified.get("iss"))
        if issuer is None:
            raise AuthError("issuer not trusted")
        if alg not in issuer.algorithms:
            raise AuthError(f"algorithm {alg} not accepted for this issuer", issuer.iss)

        try:
            key = self.resolver.key_for(issuer, header)
        except KeyLookupError as error:
            raise AuthError(error.reason, issuer.iss) from None
        key_type, curve = _KEY_FOR_ALGORITHM[alg]
        if not isinstance(key.key, key_type) or (curve and key.key.curve.name != curve):
            raise AuthError(f"key {header['kid']} does not fit {alg}", issuer.iss)

        claims = self._decode(token, key.key, alg, audience, issuer)
        self._check_lifetime_and_tenant(claims, issuer)
        self._check_replay(claims, issuer)
        return claims

    def _decode(self, token, key, alg, audience, issuer) -> dict:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer.iss,
                leeway=self.leeway,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(f"missing claim {error.claim}", issuer.iss) from None
        except jwt.PyJWTError as error:
            for kind, reason in _CLAIM_ERRORS:
                if isinstance(error, kind):
                    raise AuthError(reason, issuer.iss) from None
            raise AuthError("token does not verify", issuer.iss) from None

    def _check_lifetime_and_tenant(self, claims: dict, issuer: TrustedIssuer) -> None:
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > self.max_lifetime:
            # The replay cache keeps a jti only this long; a longer-lived token
            # could be replayed after its jti is forgotten.
            raise AuthError(f"token lifetime over {self.max_lifetime} s", issuer.iss)
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise AuthError("jti is not a non-empty string", issuer.iss)
        if issuer.tenants and claims.get("tenant") not in issuer.tenants:
            raise AuthError("tenant not trusted for this issuer", issuer.iss)

    def _check_replay(self, claims: dict, issuer: TrustedIssuer) -> None:
        if self.replay_cache is None:
            raise AuthError("no replay cache configured", issuer.iss)
        # Kept past exp by the leeway, since the token stays acceptable that long.
        expires_at = datetime.fromtimestamp(claims["exp"] + self.leeway, UTC)
        if not self.replay_cache.remember_jti(issuer.iss, claims["jti"], expires_at):
            raise AuthError("jti already used (replay)", issuer.iss)


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or AuthError."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("no bearer token")
    return token.strip()


def verifier_from_settings(
    settings: Settings, replay_cache: ReplayCache | None = None
) -> Verifier:
    """Build the verifier the settings describe (issuers, leeway, JWKS caching)."""
    issuers = load_trusted_issuers(settings.trusted_issuers)
    if settings.dev_trust_sandbox:
        logger.warning(
            "DEVELOPMENT ONLY: trusting the public CDS Hooks sandbox issuer %s, whose "
            "private key is published; never enable PAIN_CDS_DEV_TRUST_SANDBOX in "
            "production",
            DEV_SANDBOX_ISSUER.iss,
        )
        issuers = [i for i in issuers if i.iss != DEV_SANDBOX_ISSUER.iss]
        issuers.append(DEV_SANDBOX_ISSUER)
    if not issuers:
        logger.warning(
            "no trusted JWT issuers configured (PAIN_CDS_TRUSTED_ISSUERS): every call "
            "will be refused with 401"
        )
    resolver = KeyResolver(
        timeout=settings.jwks_timeout, lifespan=settings.jwks_cache_seconds
    )
    return Verifier(
        issuers,
        resolver=resolver,
        replay_cache=replay_cache,
        leeway=settings.jwt_leeway,
        max_lifetime=settings.jwt_max_lifetime,
    )


def init_app(
    app: Flask, settings: Settings, replay_cache: ReplayCache | None = None
) -> None:
    """Check every call's JWT before any handler runs (or warn that nobody checks).

    The replay cache defaults to the app's store (`app.extensions["store"]`, looked
    up per call) so that replicas sharing one database refuse each other's replays.
    """
    if not settings.auth:
        logger.warning(
            "AUTHENTICATION IS OFF (PAIN_CDS_AUTH=off or --no-auth): any caller is "
            "served; use only for development"
        )
        app.before_request(_mark_unverified)
        app.teardown_request(_warn_unverified)
        return

    verifier = verifier_from_settings(settings, replay_cache)
    app.extensions["auth"] = verifier
    base_url = settings.base_url

    def check_caller() -> Response | None:
        if request.method == "OPTIONS" or request.path in PUBLIC_PATHS:
            return None
        if verifier.replay_cache is None:
            verifier.replay_cache = _store_of(current_app)
        try:
            token = bearer_token(request.headers.get("Authorization"))
            # The audience is our configured public URL, never the Host header:
            # behind a proxy, Host is whatever the caller chose to send.
            claims = verifier.verify(token, base_url + request.path)
        except AuthError as error:
            logger.warning(
                "call refused: %s",
                error.reason,
                extra={
                    "reason": error.reason,
                    "iss": error.issuer,
                    "path": request.path,
                },
            )
            return Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        logger.debug(
            "caller verified", extra={"iss": claims["iss"], "jti": claims["jti"]}
        )
        return None

    app.before_request(check_caller)


def _store_of(app: Flask) -> ReplayCache | None:
    store = app.extensions.get("store")
    return store if hasattr(store, "remember_jti") else None


def _mark_unverified() -> None:
    if request.method != "OPTIONS" and request.path not in PUBLIC_PATHS:
        g.unverified = True


def _warn_unverified(_error: BaseException | None) -> None:
    # A hook call's own log line carries the warning (api.call_service), so that
    # a call is one line; every other unverified call gets this one.
    if g.get("unverified") and not g.get("unverified_reported"):
        logger.warning(
            "unauthenticated call served (authentication is off)",
            extra={"path": request.path, "auth": "off"},
        )
