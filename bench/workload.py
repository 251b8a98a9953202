"""Benchmark request bodies: a real spine patient padded with generated vital signs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPINE = ROOT / "fixtures" / "spine" / "esi-repeat-blind-met.json"
SERVICE = "pain-management-order-sign"
EVALUATION_DATE = "2026-12-03"

# (LOINC code, display, unit, value) of the vital signs an EHR records at every
# visit; none of them is read by a criterion, so the service must pass them over.
_VITALS = (
    ("8867-4", "Heart rate", "/min", 72),
    ("9279-1", "Respiratory rate", "/min", 16),
    ("8310-5", "Body temperature", "Cel", 36.8),
    ("29463-7", "Body weight", "kg", 81.4),
    ("8302-2", "Body height", "cm", 176.0),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 26.3),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 97),
)
_BLOOD_PRESSURE = ("85354-9", "Blood pressure panel with all children optional")


def spine_patient() -> dict:
    """The order-sign call of a patient with back pain whose repeat epidural is met."""
    return json.loads(SPINE.read_text())


def resource_count(body: dict) -> int:
    count = 0
    for value in body["prefetch"].values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            count += len(value.get("entry") or [])
        elif value:
            count += 1
    return count


def body_with(total: int) -> dict:
    """The spine call with vital signs added until the prefetch holds `total`."""
    body = copy.deepcopy(spine_patient())
    patient_id = body["context"]["patientId"]
    observations = body["prefetch"]["observations"]
    missing = total - resource_count(body)
    if missing < 0:
        raise ValueError(f"the spine patient alone holds more than {total} resources")
    for n in range(missing):
        observations["entry"].append(
            {
                "fullUrl": f"urn:uuid:{patient_id}-vital-{n}",
                "resource": _vital_sign(n, patient_id),
            }
        )
    observations["total"] = len(observations["entry"])
    return body


def encoded(total: int) -> bytes:
    return json.dumps(body_with(total)).encode()


def without_prefetch(body: dict, fhir_server: str) -> dict:
    """The same call with every prefetch key left out, for the FHIR fallback."""
    body = copy.deepcopy(body)
    body.pop("prefetch", None)
    body["fhirServer"] = fhir_server
    body["fhirAuthorization"] = {
        "access_token": "bench-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "pain-cds-bench",
    }
    return body


def _vital_sign(n: int, patient_id: str) -> dict:
    day = f"2026-{1 + n % 11:02d}-{1 + n % 28:02d}T09:{n % 60:02d}:00Z"
    resource = {
        "resourceType": "Observation",
        "id": f"{patient_id}-vital-{n}",
        "meta": {"lastUpdated": day},
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/"
                        "observation-category",
                        "code": "vital-signs",
                        "display": "Vital signs",
                    }
                ]
            }
        ],
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": day,
        "issued": day,
    }
    kind = n % (len(_VITALS) + 1)
    if kind == len(_VITALS):
        code, display = _BLOOD_PRESSURE
        resource["code"] = _concept(code, display)
        resource["component"] = [
            {
                "code": _concept("8480-6", "Systolic blood pressure"),
                "valueQuantity": _quantity(110 + n % 30, "mm[Hg]"),
            },
            {
                "code": _concept("8462-4", "Diastolic blood pressure"),
                "valueQuantity": _quantity(70 + n % 15, "mm[Hg]"),
            },
        ]
    else:
        code, display, unit, value = _VITALS[kind]
        resource["code"] = _concept(code, display)
        resource["valueQuantity"] = _quantity(value, unit)
    return resource


def _concept(code: str, display: str) -> dict:
    return {
        "coding": [{"system": "http://loinc.org", "code": code, "display": display}],
        "text": display,
    }


def _quantity(value: float, unit: str) -> dict:
    return {
        "value": value,
        "unit": unit,
        "system": "http://unitsofmeasure.org",
        "code": unit,
    }
