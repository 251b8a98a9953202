"""Service settings, read from `PAIN_CDS_*` environment variables and CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

PREFIX = "PAIN_CDS_"


def _as_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _as_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass
class Settings:
    """Every setting of the service; each field maps to `PAIN_CDS_<NAME>`.

    Add a field here (with a default and a `help` in its metadata) rather than reading
    the environment anywhere else, so that `pain-cds serve --help` and the README's
    configuration table stay complete.
    """

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "port to listen on"})
    workers: int = field(default=2, metadata={"help": "WSGI worker processes"})
    threads: int = field(
        default=4,
        metadata={"help": "threads per worker: calls one worker answers at once"},
    )
    public_url: str = field(
        default="",
        metadata={
            "help": "public base URL of the service (JWT audience); "
            "defaults to http://HOST:PORT"
        },
    )
    database_url: str = field(
        default="sqlite:///pain-cds.sqlite",
        metadata={"help": "SQLAlchemy URL for the audit and feedback record"},
    )
    cors_origins: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={"help": "comma-separated origins allowed by CORS"},
    )
    plan_name: str = field(
        default="EmblemHealth",
        metadata={"help": "insurer name shown as card source.label"},
    )
    guideline_url: str = field(
        default="",
        metadata={
            "help": "public URL of the plan's Pain Management guideline, linked "
            "from every card (no link when empty)"
        },
    )
    fhir_timeout: float = field(
        default=3.0, metadata={"help": "seconds per FHIR request to the EHR"}
    )
    fhir_deadline: float = field(
        default=4.0, metadata={"help": "seconds for the whole FHIR fallback fetch"}
    )
    fhir_page_cap: int = field(
        default=10, metadata={"help": "most `next` pages followed per query"}
    )
    fhir_servers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "comma-separated base URLs of the EHR FHIR servers the service "
            "may query; empty = any (set it in production)"
        },
    )
    max_body_bytes: int = field(
        default=5_000_000, metadata={"help": "largest request body accepted"}
    )
    max_feedback_items: int = field(
        default=100, metadata={"help": "most feedback items accepted in one call"}
    )
    log_level: str = field(default="INFO", metadata={"help": "logging level"})
    log_format: str = field(
        default="json", metadata={"help": "log line format: json or text"}
    )
    evaluation_date: str = field(
        default="",
        metadata={
            "help": "judge orders as of this date (YYYY-MM-DD) instead of today's "
            "UTC date; for tests and what-if runs only"
        },
    )
    graceful_timeout: int = field(
        default=30,
        metadata={
            "help": "seconds a stopping worker gets to finish the calls in flight "
            "(SIGTERM)"
        },
    )
    auth: bool = field(
        default=True,
        metadata={
            "help": "verify the CDS Hooks JWT on every call; `off` is for "
            "development only"
        },
    )
    trusted_issuers: str = field(
        default="",
        metadata={
            "help": "trusted JWT issuers with their JWKS: JSON, or a path to a "
            "JSON or YAML file"
        },
    )
    dev_trust_sandbox: bool = field(
        default=False,
        metadata={
            "help": "DEVELOPMENT ONLY: trust the public CDS Hooks sandbox "
            "issuer, whose signing key is published"
        },
    )
    jwt_leeway: int = field(
        default=30, metadata={"help": "seconds of clock skew allowed on exp/iat/nbf"}
    )
    jwt_max_lifetime: int = field(
        default=3600, metadata={"help": "longest JWT lifetime (exp - iat) accepted"}
    )
    jwks_timeout: float = field(
        default=3.0, metadata={"help": "seconds to fetch an issuer's JWKS"}
    )
    jwks_cache_seconds: int = field(
        default=300, metadata={"help": "seconds a fetched JWKS is kept"}
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any):
        """Build settings from the environment, then apply explicit overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            raw = environ.get(PREFIX + item.name.upper())
            if raw is None:
                continue
            values[item.name] = _convert(item, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


def _convert(item, raw: str) -> Any:
    default = item.default_factory() if callable(item.default_factory) else item.default
    if isinstance(default, bool):
        return _as_bool(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, list):
        return _as_list(raw)
    return raw
