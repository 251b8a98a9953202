"""Draft orders from `context.draftOrders`, as `Order`s carrying their codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import replace

from cds_service.fhir_dates import parse_date
from cds_service.guideline.valuesets import normalize_system
from cds_service.model import Coding, Order

logger = logging.getLogger(__name__)

# Where each order type keeps the code of what is ordered. ProcedureRequest is the
# STU3 name of ServiceRequest. Other types (NutritionOrder, VisionPrescription...)
# carry nothing the guideline reads and are passed over.
ORDER_CODE_ELEMENTS = {
    "ServiceRequest": "code",
    "ProcedureRequest": "code",
    "DeviceRequest": "codeCodeableConcept",
    "MedicationRequest": "medicationCodeableConcept",
}


def orders_from_bundle(
    bundle: dict, selections: Iterable[str] | None = None
) -> list[Order]:
    """Every coded order in `bundle`; with `selections`, only those are `selected`.

    `selections` is None for order-sign (every draft is judged) and the list of
    `Type/id` references for order-select (the other drafts are context).
    """
    selected = set(selections) if selections is not None else None
    orders = []
    for position, resource in enumerate(_entry_resources(bundle)):
        order = _order(resource, position)
        if order is None:
            continue
        if selected is not None and order.reference not in selected:
            order = replace(order, selected=False)
        orders.append(order)
    return orders


def codings_of(concept: object) -> tuple[Coding, ...]:
    """The usable codings of a CodeableConcept (codes trimmed, systems normalised).

    A coding with no code (the sandbox sends `[{}]` before a study is picked) is
    dropped; one whose system is unknown keeps its URI so it can be shown.
    """
    if not isinstance(concept, dict):
        return ()
    raw = concept.get("coding")
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        return ()
    codings = []
    for item in raw:
        if isinstance(item, dict):
            code = item.get("code")
            if isinstance(code, str) and code.strip():
                codings.append(coding_of(item))
    return tuple(codings)


def coding_of(item: dict) -> Coding:
    """One raw coding whose `code` is a non-blank string, as a `Coding`."""
    uri, display = item.get("system"), item.get("display")
    uri = uri if isinstance(uri, str) else ""
    display = display if isinstance(display, str) else None
    code = item["code"]
    if len(uri) + len(code) + len(display or "") > KEPT_CODING_TEXT:
        return _coding(uri, code, display)
    return _kept_coding(uri, code, display)


# Codings are vocabulary, and a record repeats a few of them: each distinct one is
# built once. Text longer than any vocabulary's is built every time, never kept, so
# that what is kept stays small whatever callers send.
KEPT_CODING_TEXT = 512


def _coding(uri: str, code: str, display: str | None) -> Coding:
    return Coding(
        system=normalize_system(uri) or uri, code=code.strip(), display=display
    )


_kept_coding = functools.lru_cache(maxsize=4096)(_coding)


def concept_text(concept: object, codings: tuple[Coding, ...] = ()) -> str | None:
    """`CodeableConcept.text`, else the first coding's display."""
    if isinstance(concept, dict) and isinstance(concept.get("text"), str):
        return concept["text"]
    return next((c.display for c in codings if c.display), None)


def _entry_resources(bundle: dict) -> list[dict]:
    entries = bundle.get("entry") or []
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        return []
    resources = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.append(resource)
    return resources


def _order(resource: dict, position: int) -> Order | None:
    resource_type = resource.get("resourceType")
    element = (
        ORDER_CODE_ELEMENTS.get(resource_type)
        if isinstance(resource_type, str)
        else None
    )
    if element is None:
        logger.debug("draft order of type %s passed over", resource_type)
        return None

    concept = resource.get(element)
    codings = codings_of(concept)
    # An order without an id cannot be named in selections; its position stands in.
    identity = resource.get("id") if isinstance(resource.get("id"), str) else None
    return Order(
        reference=f"{resource_type}/{identity or f'#{position}'}",
        resource_type=resource_type,
        codings=codings,
        resource=resource,
        authored=parse_date(resource.get("authoredOn")),
        text=concept_text(concept, codings),
    )
