"""CDS Hooks endpoints: discovery, and the order-select / order-sign services."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Callable

from flask import Blueprint, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from cards import CardOptions, build_response
from cds_service.config import Settings
from cds_service.errors import (
    Issue,
    ServiceError,
    require_json_content,
    unknown_service,
)
from cds_service.hook_request import (
    ORDER_SELECT,
    ORDER_SIGN,
    HookRequest,
    draft_resources,
    load_hook_request,
)
from cds_service.model import Determination, Order, PatientRecord
from cds_service.orders import orders_from_bundle
from cds_service.prefetch import FhirFetcher
from cds_service.record import build_record
from cds_service.references import other_patient_element
from cds_service.storage import safe_hook_instance

logger = logging.getLogger(__name__)

blueprint = Blueprint("cds_hooks", __name__)

EXTENSION_KEY = "pain_cds"


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str


SERVICES = {
    service.id: service
    for service in (
        Service(
            id="pain-management-order-select",
            hook=ORDER_SELECT,
            title="Pain management prior authorization: order selection",
            description=(
                "Checks a selected pain-management procedure (trigger point, "
                "tendon sheath, epidural, transforaminal, facet, sacroiliac and "
                "post-operative injections) against the plan's Pain Management "
                "guideline and says which criteria are unmet or excluded."
            ),
        ),
        Service(
            id="pain-management-order-sign",
            hook=ORDER_SIGN,
            title="Pain management prior authorization: order signing",
            description=(
                "Checks every pain-management procedure being signed against the "
                "plan's Pain Management guideline and returns CRD coverage "
                "information for each."
            ),
        ),
    )
}


@dataclass
class ServiceState:
    """What the endpoints share for the life of the app (never rebuilt per call)."""

    settings: Settings
    guideline: Any
    fetcher: FhirFetcher
    prefetch: dict[str, str]
    evaluation_date: date | None = None
    # Extra discovery fields per service (CRD version and configuration options),
    # supplied by the cards package: called with the Service, returns a dict to put
    # under the service's `extension`, or None.
    discovery_extension: Callable[[Service], dict | None] | None = None
    # Where the cards remember issued cards and read feedback (the audit store).
    card_memory: Any = None


def state() -> ServiceState:
    return current_app.extensions[EXTENSION_KEY]


@blueprint.get("/cds-services")
def discovery():
    current = state()
    services = []
    for service in SERVICES.values():
        entry = {
            "hook": service.hook,
            "title": service.title,
            "description": service.description,
            "id": service.id,
            "prefetch": current.prefetch,
        }
        extension = current.discovery_extension and current.discovery_extension(service)
        if extension:
            entry["extension"] = extension
        services.append(entry)
    return jsonify({"services": services})


@blueprint.post("/cds-services/<service_id>")
def call_service(service_id: str):
    service = SERVICES.get(service_id)
    if service is None:
        raise unknown_service(service_id)

    started = time.perf_counter()
    hook_instance, status, outcome = None, 500, "error"
    try:
        body = _json_body()
        if isinstance(body, dict):
            # Only a uuid (as CDS Hooks says it is) reaches the log: a client may
            # put anything in the field, a patient's name included.
            hook_instance = safe_hook_instance(body.get("hookInstance"))
        hook_request = load_hook_request(body, service.hook, state().prefetch)
        response, determinations = _answer(hook_request, service)
        status = 200
        outcome = (
            ",".join(d.outcome.value for d in determinations) or "no-guideline-order"
        )
        try:
            answer = jsonify(response)
        except ValueError:
            # A number such as 1e400 parses as infinity, which JSON cannot carry,
            # and the order that holds it is echoed in the answer.
            raise ServiceError(
                400,
                Issue("Request body holds a number too large for JSON", code="value"),
            ) from None
        return answer
    except (ServiceError, HTTPException) as error:
        status = error.status if isinstance(error, ServiceError) else error.code
        outcome = f"refused-{status}"
        raise
    finally:
        fields = {
            "hookInstance": hook_instance,
            "service": service.id,
            "hook": service.hook,
            "status": status,
            "outcome": outcome,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        level = logging.INFO
        if g.get("unverified"):
            # Authentication is off: the call's one line is the warning auth owes.
            fields["auth"] = "off"
            level = logging.WARNING
            g.unverified_reported = True
        logger.log(level, "hook call", extra=fields)


def _json_body() -> object:
    require_json_content()
    body = request.get_json(silent=True)
    if body is None and request.get_data().strip() == b"null":
        raise ServiceError(400, "Request body must be a JSON object")
    if body is None:
        raise ServiceError(
            400, Issue("Request body is not valid JSON", code="structure")
        )
    return body


def _answer(
    hook_request: HookRequest, service: Service
) -> tuple[dict, list[Determination]]:
    current = state()
    guideline = current.guideline
    orders = orders_from_bundle(hook_request.draft_orders, hook_request.selections)

    # Patient data is gathered only when an order to judge is in the guideline:
    # the medication and nutrition orders most EHR calls carry cost nothing.
    record = PatientRecord(patient_id=hook_request.patient_id)
    determinations: list[Determination] = []
    judged = [o for o in orders if o.selected and _covered(guideline, o)]
    if judged:
        _check_orders_are_for_the_patient(hook_request, judged)
        values = current.fetcher.gather(hook_request, current.prefetch)
        record = build_record(
            values,
            guideline.is_relevant,
            patient_id=hook_request.patient_id,
            answers=guideline.relevance_answers,
        )
        determinations = guideline.evaluate(
            record, orders, on=current.evaluation_date or _today()
        )

    response = build_response(
        determinations,
        hook=service.hook,
        options=CardOptions.from_request(
            hook_request.extension, current.settings, memory=current.card_memory
        ),
        unavailable=record.unavailable,
        all_orders=orders,
        patient_id=hook_request.patient_id,
    )
    g.audit_entry = _audit_entry(
        hook_request, service, orders, determinations, response
    )
    return response, determinations


def _check_orders_are_for_the_patient(
    hook_request: HookRequest, judged: list[Order]
) -> None:
    """Refuse a guideline order written for another patient than `patientId`.

    It would be judged on this patient's record. Orders outside the guideline are
    passed over as always (the CRD test kit's example request names another
    patient on its diet and medication orders, and still deserves an answer).
    """
    references = {order.reference for order in judged}
    issues = []
    context = {"draftOrders": hook_request.draft_orders}
    for index, resource in draft_resources(context):
        # Same naming as orders.py: an order without an id goes by its position.
        identity = resource.get("id")
        identity = identity if isinstance(identity, str) else f"#{index}"
        if f"{resource['resourceType']}/{identity}" not in references:
            continue
        element = other_patient_element(resource, hook_request.patient_id)
        if element is not None:
            path = f"context.draftOrders.entry[{index}].resource.{element}"
            issues.append(
                Issue(
                    f"{path}: names {resource[element]['reference']}, not the "
                    f"context's patient Patient/{hook_request.patient_id}",
                    expression=path,
                    code="invalid",
                )
            )
    if issues:
        raise ServiceError(400, issues)


def _covered(guideline, order: Order) -> bool:
    return any(guideline.covers(coding) for coding in order.codings)


def _today() -> date:
    # The clock lives here, not in the engine: criteria are judged as of the UTC date.
    return datetime.now(timezone.utc).date()


def _audit_entry(
    hook_request: HookRequest,
    service: Service,
    orders: list[Order],
    determinations: list[Determination],
    response: dict,
) -> dict:
    return {
        "hook_instance": hook_request.hook_instance,
        "service": service.id,
        "hook": service.hook,
        "order_codes": [coding.code for order in orders for coding in order.codings],
        "determinations": [
            {"code": d.billing_code.code, "outcome": d.outcome.value}
            for d in determinations
        ],
        "card_summaries": [card.get("summary") for card in response.get("cards", [])],
    }
