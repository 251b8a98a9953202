"""OperationOutcome errors: every non-2xx answer of the service is one of these."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)

# OperationOutcome.issue.code for each HTTP status the service answers with.
_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    412: "incomplete",
    413: "too-costly",
    415: "not-supported",
    500: "exception",
}


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue: what is wrong and, if known, where."""

    diagnostics: str
    expression: str | None = None
    code: str | None = None
    severity: str = "error"


class ServiceError(Exception):
    """An error answered as `status` with an OperationOutcome listing `issues`."""

    def __init__(self, status: int, issues: list[Issue] | Issue | str):
        if isinstance(issues, str):
            issues = [Issue(issues)]
        elif isinstance(issues, Issue):
            issues = [issues]
        super().__init__("; ".join(issue.diagnostics for issue in issues))
        self.status = status
        self.issues = list(issues)


def unknown_service(service_id: str) -> ServiceError:
    """The 404 for a service id that discovery does not list."""
    return ServiceError(
        404,
        Issue(f"No CDS service {service_id!r}; discovery is at GET /cds-services"),
    )


def require_json_content() -> None:
    """Refuses (415) a request body whose Content-Type is not JSON."""
    if not request.is_json:
        raise ServiceError(
            415,
            Issue(
                "Content-Type must be application/json, not "
                + (request.mimetype or "(none)"),
                code="not-supported",
            ),
        )


def operation_outcome(status: int, issues: list[Issue]) -> dict:
    """The FHIR OperationOutcome body for `issues` answered with `status`."""
    default_code = _ISSUE_CODES.get(status, "processing")
    body_issues = []
    for issue in issues:
        entry = {
            "severity": issue.severity,
            "code": issue.code or default_code,
            "diagnostics": issue.diagnostics,
        }
        if issue.expression:
            entry["expression"] = [issue.expression]
        body_issues.append(entry)
    return {"resourceType": "OperationOutcome", "issue": body_issues}


def error_response(status: int, issues: list[Issue], headers=None):
    response = jsonify(operation_outcome(status, issues))
    response.status_code = status
    response.headers["Content-Type"] = "application/fhir+json"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer every error, expected or not, with an OperationOutcome."""

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError):
        return error_response(error.status, error.issues)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        # 405 must keep its Allow header; other werkzeug headers are HTML-specific.
        headers = {}
        valid_methods = getattr(error, "valid_methods", None)
        if status == 405 and valid_methods:
            headers["Allow"] = ", ".join(sorted(valid_methods))
        return error_response(status, [Issue(_describe(error))], headers)

    @app.errorhandler(RecursionError)
    def _too_deep(error: RecursionError):
        # JSON nested deeper than the interpreter's recursion limit (the JSON
        # decoder, schema validation and copying all recurse): the input's fault.
        logger.warning("request refused: JSON nested too deeply")
        issue = Issue("Request body is nested too deeply", code="too-costly")
        return error_response(400, [issue])

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        logger.exception("unhandled error: %s", type(error).__name__)
        issue = Issue("Internal error; the service log has details")
        return error_response(500, [issue])


def _describe(error: HTTPException) -> str:
    messages = {
        404: "No such endpoint; discovery is at GET /cds-services",
        405: "Method not allowed on this endpoint",
        413: "Request body is larger than the service accepts",
        415: "Content-Type must be application/json",
    }
    return messages.get(error.code or 0, error.description or error.name)
