"""The cards' reviewable data: short order names, linked documents, override reasons."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from cds_service.model import CodeSystem, Coding, Order

_HERE = Path(__file__).parent

# Canonical URIs for billing codes (CRD billingCode, suggested replacement orders).
SYSTEM_URIS = {
    CodeSystem.CPT: "http://www.ama-assn.org/go/cpt",
    CodeSystem.HCPCS: "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
}


@dataclass(frozen=True)
class Document:
    id: str
    label: str
    url: str
    codes: frozenset[str] | None  # None: every code not claimed by another document


@functools.cache
def _load(name: str) -> dict:
    with open(_HERE / name, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def short_name(code: str) -> str | None:
    return _load("orders.yaml")["short_names"].get(code)


def order_label(order: Order, billing_code: Coding | None = None) -> str:
    """How a card names an order: code and short name, e.g. "64493 lumbar facet"."""
    coding = billing_code or (order.codings[0] if order.codings else None)
    if coding is None:
        return order.text or order.reference
    name = short_name(coding.code) or order.text or coding.display
    return f"{coding.code} {name}" if name else coding.code


def criterion_phrase(criterion_id: str) -> str | None:
    """A short noun phrase for a criterion, or None when the file has none."""
    return _load("criteria.yaml")["phrases"].get(criterion_id)


def criterion_to_document(criterion_id: str) -> str | None:
    """What to document when the criterion is not documented, or None."""
    return _load("criteria.yaml")["to_document"].get(criterion_id)


def denied_unless_documented(criterion_id: str) -> bool:
    """Is the service denied until this criterion is documented (a warning)?"""
    return criterion_id in _load("criteria.yaml")["denied_unless_documented"]


def image_guided_alternative(code: str) -> str | None:
    return _load("orders.yaml")["image_guided_alternative"]["codes"].get(code)


def image_guided_triggers() -> tuple[str, ...]:
    return tuple(_load("orders.yaml")["image_guided_alternative"]["triggered_by"])


@functools.cache
def documents() -> tuple[Document, ...]:
    return tuple(
        Document(
            id=entry["id"],
            label=entry["label"],
            url=entry["url"],
            codes=None if entry["codes"] == "default" else frozenset(entry["codes"]),
        )
        for entry in _load("links.yaml")["documents"]
    )


def documents_for(code: str) -> list[Document]:
    specific = [d for d in documents() if d.codes is not None and code in d.codes]
    if specific:
        return specific
    return [d for d in documents() if d.codes is None]


def override_reasons() -> list[dict]:
    data = _load("links.yaml")
    system = data["override_reason_system"]
    return [
        {"code": reason["code"], "system": system, "display": reason["display"]}
        for reason in data["override_reasons"]
    ]


def system_uri(coding: Coding) -> str:
    return SYSTEM_URIS.get(coding.system, coding.system)
