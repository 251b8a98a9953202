"""Stable identities: order fingerprints and deterministic card and suggestion uuids."""

from __future__ import annotations

import hashlib
import uuid

from cds_service.memo import canonical_json
from cds_service.model import Determination

COVERAGE_INFORMATION_URL = (
    "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
)

# Fixed namespace so that uuids survive restarts and are equal across replicas.
NAMESPACE = uuid.UUID("6f1d2c1e-4b8a-5e0f-9a57-2d6c3f0b8e41")


def order_fingerprint(resource: dict, patient_id: str | None = None) -> str:
    """A hash of the order as the clinician wrote it, for the patient it is judged for.

    `meta` changes on every save without the order changing, and the
    coverage-information extension is what this service adds; an EHR that stores
    our systemAction and sends the order back must still count as "unchanged". The
    patient is part of it: an order without a subject, sent again word for word for
    another patient, is another order (a card accepted for one patient must not
    silence the other's).
    """
    content = {key: value for key, value in resource.items() if key != "meta"}
    extensions = [
        ext
        for ext in content.get("extension") or []
        if not (isinstance(ext, dict) and ext.get("url") == COVERAGE_INFORMATION_URL)
    ]
    if extensions:
        content["extension"] = extensions
    else:
        content.pop("extension", None)
    return _digest({"patient": patient_id, "order": content})


def determination_key(determination: Determination) -> str:
    """A hash of what was decided and on which evidence, not of how it is worded.

    The evaluation date is left out on purpose: the same unchanged order judged the
    same way tomorrow is the same card.
    """
    coverage = determination.coverage.reference if determination.coverage else None
    # Outcome, Role and State are str enums, which JSON writes as their values;
    # reading `.value`, an enum property, twice per criterion cost as much as the hash.
    content = {
        "rule_set": determination.rule_set,
        "code": [determination.billing_code.system, determination.billing_code.code],
        "outcome": determination.outcome,
        "manual_review": determination.manual_review,
        "coverage": coverage,
        "results": [
            [
                result.criterion_id,
                result.role,
                result.state,
                result.data_unavailable,
                [
                    [e.reference, e.date.isoformat() if e.date else None, e.value]
                    for e in result.evidence
                ],
            ]
            for result in determination.results
        ],
    }
    return _digest(content)


def card_uuid(kind: str, *parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join(("card", kind, *parts))))


def suggestion_uuid(card: str, name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join(("suggestion", card, name))))


def assertion_id(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join(("coverage-assertion", *parts))))


def _digest(content: object) -> str:
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()
