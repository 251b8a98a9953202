"""CRD coverage-information systemActions, with the CRD invariants enforced."""

from __future__ import annotations

import logging
from datetime import date

from cards import content
from cards.identity import COVERAGE_INFORMATION_URL, assertion_id, determination_key
from cards.render import name_criterion
from cds_service.model import (
    CoverageFact,
    DataCategory,
    Determination,
    Outcome,
    State,
)

logger = logging.getLogger(__name__)

CRD_TEMP_SYSTEM = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
ORDER_SIGN = "order-sign"

# Every code of the guideline is a prior-authorization code ("The treating physician
# ... must submit to EmblemHealth the clinical evidence that the patient meets the
# criteria"), so whenever coverage is possible, prior authorization is needed.
PA_NEEDED = "auth-needed"


class CoverageInformationError(ValueError):
    """Built coverage information breaks a CRD rule: a bug, never sent."""


def coverage_actions(
    determinations: list[Determination],
    fingerprints: list[str],
    *,
    hook: str,
    unavailable: set[DataCategory],
    keys: list[str | None] | None = None,
) -> list[dict]:
    """One `update` systemAction per judged order (CRD resp-29, resp-37).

    An order whose record has no Coverage gets none: the extension's `coverage`
    element is 1..1, and plain CDS Hooks clients (the sandbox) never send a
    Coverage, so asserting "not covered" for them would be false. CRD clients
    always send the primary Coverage (dev-28), and an inactive one is answered
    `not-covered` with reason `no-active-coverage` (CRD resp-44). `keys` are the
    determinations' `determination_key`s where the caller already has them.
    """
    actions, extensions, seen = [], [], set()
    keys = keys or [None] * len(determinations)
    for determination, fingerprint, key in zip(
        determinations, fingerprints, keys, strict=True
    ):
        # A draftOrders Bundle may list one order twice; it gets one assertion.
        if determination.order.reference in seen:
            continue
        seen.add(determination.order.reference)
        try:
            extension = coverage_information(
                determination, fingerprint, hook=hook, unavailable=unavailable, key=key
            )
        except CoverageInformationError:
            # A bug, never sent: the cards still go out, the order gets no action.
            logger.exception(
                "coverage information withheld for %s", determination.order.reference
            )
            continue
        if extension is None:
            logger.info(
                "no coverage information for %s: no Coverage in the record",
                determination.order.reference,
            )
            continue
        extensions.append(extension)
        label = content.order_label(determination.order, determination.billing_code)
        actions.append(
            {
                "type": "update",
                "description": f"Record {determination.rule_set_title} coverage "
                f"information on the order {label}",
                "resource": _with_extension(determination.order.resource, extension),
            }
        )
    check_unique_ids(extensions)
    return actions


def coverage_information(
    determination: Determination,
    fingerprint: str,
    *,
    hook: str,
    unavailable: set[DataCategory] = frozenset(),
    key: str | None = None,
) -> dict | None:
    """The coverage-information extension for one determination, checked.

    `key` is the determination's `determination_key`, when the caller has it.
    """
    coverage = determination.coverage
    if coverage is None:
        return None

    on = determination.evaluated_on.isoformat()
    failing = [r for r in determination.failing if not r.data_unavailable]
    covered, reasons = _covered_and_reasons(
        determination, coverage, failing, unavailable
    )
    sub = [
        {"url": "coverage", "valueReference": {"reference": coverage.reference}},
        {"url": "covered", "valueCode": covered.value},
    ]
    if covered is not Outcome.NOT_COVERED:
        sub.append({"url": "pa-needed", "valueCode": PA_NEEDED})
    if covered is Outcome.CONDITIONAL and hook == ORDER_SIGN:
        # Only order-sign may ask for documentation (CRD hook-19 forbids it on
        # order-select): clinical notes, to go with the prior authorization.
        sub.append({"url": "doc-needed", "valueCode": "clinical"})
        sub.append({"url": "doc-purpose", "valueCode": "withpa"})
    if covered is Outcome.CONDITIONAL:
        sub.append({"url": "info-needed", "valueCode": "OTH"})
    coding = determination.billing_code
    sub.append(
        {
            "url": "billingCode",
            "valueCoding": {"system": content.system_uri(coding), "code": coding.code},
        }
    )
    sub += [{"url": "reason", "valueCodeableConcept": r} for r in reasons]
    instructions = _instructions(failing) if covered is Outcome.CONDITIONAL else None
    if instructions:
        sub.append(_detail("instructions", instructions))
    sub.append({"url": "date", "valueDate": on})
    key = key or determination_key(determination)
    sub.append(
        {
            "url": "coverage-assertion-id",
            "valueString": assertion_id(fingerprint, key, hook, on),
        }
    )
    extension = {"url": COVERAGE_INFORMATION_URL, "extension": sub}
    problems = check_coverage_information(extension)
    if problems:
        raise CoverageInformationError("; ".join(problems))
    return extension


def _covered_and_reasons(
    determination: Determination, coverage: CoverageFact, failing, unavailable
) -> tuple[Outcome, list[dict]]:
    """The `covered` value and its reasons.

    `failing`: the criteria not met or not documented, less those left undocumented
    only because data could not be retrieved.
    """
    if not coverage_active(coverage, determination.evaluated_on):
        return Outcome.NOT_COVERED, [
            _reason("no-active-coverage", "Coverage not active", None)
        ]
    outcome = determination.outcome
    if outcome is Outcome.INDETERMINATE:
        missing = [c.value for c in DataCategory if c in unavailable]
        text = "Patient data could not be retrieved"
        if missing:
            text += ": " + ", ".join(missing)
        return outcome, [_reason("technical", "Technical issues", text)]
    if outcome is Outcome.NOT_COVERED:
        texts = [name_criterion(r) for r in failing if r.state is State.NOT_MET]
        text = "Not covered under the Pain Management guideline: " + "; ".join(
            texts or [name_criterion(r) for r in failing]
        )
        return outcome, [{"text": text}]
    if outcome is Outcome.CONDITIONAL:
        return outcome, [{"text": _conditional_reason(determination, failing)}]
    return outcome, []


def _conditional_reason(determination: Determination, failing) -> str:
    not_met = [name_criterion(r) for r in failing if r.state is State.NOT_MET]
    missing = [name_criterion(r) for r in failing if r.state is State.NOT_DOCUMENTED]
    parts = []
    if not_met:
        parts.append("Guideline criteria not met: " + "; ".join(not_met))
    if missing:
        parts.append("Not documented: " + "; ".join(missing))
    if determination.manual_review:
        parts.append("Manual review: " + determination.manual_review)
    return ". ".join(parts) or "Coverage depends on the guideline criteria"


def _instructions(failing) -> str | None:
    missing = [name_criterion(r) for r in failing if r.state is State.NOT_DOCUMENTED]
    if not missing:
        return None
    return (
        "Document in the record and send with the prior authorization request: "
        + "; ".join(missing)
    )


def coverage_active(coverage: CoverageFact, on: date) -> bool:
    """Is the Coverage in force on the service date (status and period)?"""
    if coverage.status is not None and coverage.status != "active":
        return False
    if coverage.period_start and coverage.period_start > on:
        return False
    if coverage.period_end and coverage.period_end < on:
        return False
    return True


def _reason(code: str, display: str, text: str | None) -> dict:
    concept = {
        "coding": [{"system": CRD_TEMP_SYSTEM, "code": code, "display": display}]
    }
    if text:
        concept["text"] = text
    return concept


def _detail(code: str, value: str) -> dict:
    return {
        "url": "detail",
        "extension": [
            {"url": "category", "valueCode": "cat-limitation"},
            {
                "url": "code",
                "valueCodeableConcept": {
                    "coding": [{"system": CRD_TEMP_SYSTEM, "code": code}]
                },
            },
            {"url": "value", "valueString": value},
        ],
    }


def _with_extension(resource: dict, extension: dict) -> dict:
    """The order echoed with the same id, changing only our extension (resp-37)."""
    # Only the top-level `extension` list is replaced, so the rest of the order is
    # shared with the request, never changed, not copied.
    updated = dict(resource)
    coverage = _value(extension, "coverage")
    kept = [
        ext
        for ext in updated.get("extension") or []
        if not (
            isinstance(ext, dict)
            and ext.get("url") == COVERAGE_INFORMATION_URL
            and _value(ext, "coverage") == coverage
        )
    ]
    updated["extension"] = kept + [extension]
    return updated


def _value(extension: dict, url: str):
    for sub in extension.get("extension") or []:
        if sub.get("url") == url:
            return _value_of(sub, None)
    return None


def _value_of(sub: dict, default):
    """The sub-extension's value[x], whatever its type."""
    # A loop, not next() over a generator: this runs for every sub-extension of
    # every assertion checked, and the generator costs more than the search.
    for key, value in sub.items():
        if key.startswith("value"):
            return value
    return default


# --- CRD rules ---------------------------------------------------------------------

_CODES = {
    "covered": {"covered", "not-covered", "conditional", "indeterminate"},
    "pa-needed": {
        "no-auth",
        "auth-needed",
        "satisfied",
        "performpa",
        "conditional",
        "indeterminate",
    },
    "doc-needed": {"clinical", "admin", "patient", "conditional", "indeterminate"},
    "doc-purpose": {"withpa", "withclaim", "withorder", "retain-doc", "OTH"},
    "info-needed": {
        "performer",
        "location",
        "timeframe",
        "contract-window",
        "detail-code",
        "OTH",
    },
}
_ONE = ("coverage", "covered", "date", "coverage-assertion-id")
_AT_MOST_ONE = ("pa-needed", "satisfied-pa-id", "expiry-date")


def check_coverage_information(extension: dict) -> list[str]:
    """Every way `extension` breaks CRD 2.2's coverage-information rules.

    Cardinalities, required code bindings and the invariants crd-ci-q1..q9 as CRD
    2.2.1 states them (not-covered has no pa-needed; conditional iff info-needed;
    indeterminate and info-needed OTH and doc-purpose need a reason; ...).
    """
    problems = []
    if extension.get("url") != COVERAGE_INFORMATION_URL:
        problems.append("url is not the coverage-information extension")
    subs = extension.get("extension") or []
    values: dict[str, list] = {}
    for sub in subs:
        values.setdefault(sub.get("url"), []).append(_value_of(sub, sub))
    for url in _ONE:
        if len(values.get(url, [])) != 1:
            problems.append(f"{url} must appear exactly once")
    for url in _AT_MOST_ONE:
        if len(values.get(url, [])) > 1:
            problems.append(f"{url} must appear at most once")
    for url, allowed in _CODES.items():
        for value in values.get(url, []):
            if value not in allowed:
                problems.append(f"{url} {value!r} is not in its value set")
    for value in values.get("coverage", []):
        reference = value.get("reference", "") if isinstance(value, dict) else ""
        if "Coverage/" not in reference:
            problems.append("coverage must reference a Coverage")
    for value in values.get("date", []):
        if not _is_date(value):
            problems.append(f"date {value!r} is not a FHIR date")
    if not all(values.get("coverage-assertion-id", ["x"])):
        problems.append("coverage-assertion-id is empty")

    covered = values.get("covered", [None])[0]
    pa = values.get("pa-needed", [None])[0]
    docs = values.get("doc-needed", [])
    purposes = values.get("doc-purpose", [])
    info = values.get("info-needed", [])
    has_reason = bool(values.get("reason"))
    conditional = "conditional" in (covered, pa) or "conditional" in docs
    indeterminate = "indeterminate" in (covered, pa) or "indeterminate" in docs
    if covered == "not-covered" and pa is not None:
        problems.append("not-covered must not carry pa-needed (crd-ci-q2)")
    if conditional and not info:
        problems.append("a conditional assertion needs info-needed (crd-ci-q3)")
    if info and not conditional:
        problems.append("info-needed needs a conditional value (crd-ci-q3)")
    if values.get("questionnaire") and not docs:
        problems.append("questionnaire needs doc-needed (crd-ci-q1)")
    if "withpa" in purposes and (pa in {"satisfied", "no-auth"} or pa is None):
        problems.append("doc-purpose withpa needs prior authorization (crd-ci-q4)")
    if (pa == "satisfied") != bool(values.get("satisfied-pa-id")):
        problems.append("satisfied-pa-id iff pa-needed is satisfied (crd-ci-q5)")
    if "OTH" in info and not has_reason:
        problems.append("info-needed OTH needs a reason (crd-ci-q6)")
    for reason in values.get("reason", []):
        if not reason.get("text") and not _temp_coded(reason):
            problems.append("a reason outside the CRD codes needs text (crd-ci-q7)")
    if any(p != "conditional" for p in purposes) and not has_reason:
        problems.append("doc-purpose needs a reason (crd-ci-q8)")
    if indeterminate and not has_reason:
        problems.append("an indeterminate assertion needs a reason (crd-ci-q9)")
    return problems


def check_unique_ids(extensions: list[dict]) -> None:
    """Coverage-assertion ids identify one assertion each: no two may be equal."""
    seen: set[str] = set()
    for extension in extensions:
        identifier = _value(extension, "coverage-assertion-id")
        if identifier in seen:
            raise CoverageInformationError(
                f"coverage-assertion-id {identifier} is not unique"
            )
        seen.add(identifier)


def _temp_coded(concept: dict) -> bool:
    return any(c.get("system") == CRD_TEMP_SYSTEM for c in concept.get("coding", []))


def _is_date(value: object) -> bool:
    try:
        date.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return len(value) == 10  # type: ignore[arg-type]
