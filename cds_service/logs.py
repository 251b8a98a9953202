"""Logging set-up: one JSON object per line on stderr, with secrets scrubbed."""

from __future__ import annotations

import logging
import re
from typing import Any

from cds_service.config import Settings

# A JWT (header.payload.signature, each base64url, header starting `{"` = `eyJ`) and a
# bearer credential. Neither may reach a log line, whoever wrote the message.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
# A FHIR search's query string (`Condition?patient=123&...`) and a patient read
# (`Patient/123`) name the patient; what reaches a log keeps only the path.
_QUERY = re.compile(r"(/?\b[A-Z][A-Za-z]+)\?[^\s'\"]+")
_PATIENT_PATH = re.compile(r"\bPatient/[A-Za-z0-9\-.]{1,64}")
REDACTED = "[redacted]"
# Extra fields whose values are credentials whatever they look like.
_SECRET_FIELDS = frozenset(
    {"access_token", "authorization", "fhirAuthorization", "password", "token"}
)

# `LogRecord` attributes that are not extras (python-json-logger adds the rest).
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def scrub(text: str) -> str:
    """`text` with JWTs, bearer credentials and patient ids in FHIR URLs replaced
    by `[redacted]`."""
    # Every field of every line passes here; a pattern runs only where the text
    # holds what it needs (a JWT starts `eyJ`, a query has `?`), which most
    # fields do not.
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "?" in text:
        text = _QUERY.sub(lambda match: f"{match.group(1)}?{REDACTED}", text)
    if "Patient/" in text:
        text = _PATIENT_PATH.sub(f"Patient/{REDACTED}", text)
    if "bearer" in text.lower():
        text = _BEARER.sub(lambda match: f"{match.group(1)} {REDACTED}", text)
    return text


class RedactSecrets(logging.Filter):
    """Scrubs tokens from the message, its arguments and the extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if isinstance(record.msg, str):
            record.msg = scrub(record.msg)
        for name, value in list(vars(record).items()):
            if name in _RECORD_FIELDS:
                continue
            if name in _SECRET_FIELDS:
                setattr(record, name, REDACTED)
            else:
                setattr(record, name, _scrub_value(value))
        return True


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {
            key: REDACTED if key in _SECRET_FIELDS else _scrub_value(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub_value(item) for item in value]
    return value


def configure_logging(
    settings: Settings, *, only_if_unconfigured: bool = False
) -> None:
    """Send every logger's records to stderr, one line each, JSON unless `log_format`
    is `text`.

    `create_app` passes `only_if_unconfigured=True`, so that an app embedded in a host
    that set up logging (a test runner, another WSGI server) keeps the host's set-up.
    """
    # urllib3 logs each retry of the FHIR fallback with the request's URL, whose
    # query names the patient (`Condition?patient=...`); its warnings add nothing
    # the fetcher does not log itself. Set even when the host configured logging.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    root = logging.getLogger()
    if only_if_unconfigured and root.handlers:
        return
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",  # ISO 8601, UTC
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(RedactSecrets())
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def gunicorn_logger_class():
    """Gunicorn's logger, sending its records through ours (JSON, scrubbed)."""
    from gunicorn.glogging import Logger

    class GunicornLogger(Logger):
        def setup(self, cfg):
            super().setup(cfg)
            for log in (self.error_log, self.access_log):
                log.handlers[:] = []
                log.propagate = True

    return GunicornLogger
