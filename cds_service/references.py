"""Whose data a resource is: the patient named by its subject or patient reference."""

from __future__ import annotations

import re

# Elements that name the patient a resource is about: `subject` (Condition,
# Observation, orders...), `patient` (NutritionOrder, VisionPrescription,
# AllergyIntolerance) and `beneficiary` (Coverage).
PATIENT_ELEMENTS = ("subject", "patient", "beneficiary")

# `Patient/<id>`, relative or at the end of an absolute URL, with an optional
# version; the id pattern is FHIR's. urn:uuid and contained (`#x`) references
# name no id that context.patientId could be compared with.
_PATIENT_REFERENCE = re.compile(
    r"^(?:https?://[^?#]*/)?Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/?#]+)?$"
)


def referenced_patient(resource: dict) -> tuple[str, str] | None:
    """(element, patient id) of the resource's comparable patient reference."""
    for element in PATIENT_ELEMENTS:
        value = resource.get(element)
        reference = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(reference, str):
            continue
        match = _PATIENT_REFERENCE.match(reference.strip())
        if match:
            return element, match.group(1)
    return None


def other_patient_element(resource: dict, patient_id: str | None) -> str | None:
    """The element naming a patient other than `patient_id`, if one does.

    A resource whose reference cannot be compared (absent, urn:uuid, contained)
    is taken to be the patient's: the request it came in is about that patient.
    """
    if not patient_id:
        return None
    # The usual case, checked for every resource of a long history without the
    # pattern: the subject is the patient's own relative reference.
    subject = resource.get("subject")
    own = "Patient/" + patient_id
    if isinstance(subject, dict) and subject.get("reference") == own:
        return None
    named = referenced_patient(resource)
    if named is None or named[1] == patient_id:
        return None
    return named[0]
