"""Raw FHIR resources from prefetch or the EHR's server -> `PatientRecord` facts."""

from __future__ import annotations

import copy
import functools
import logging
import marshal
import re
from collections.abc import Callable
from dataclasses import dataclass

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from cds_service.fhir_dates import first_date, is_naive_datetime, parse_date
from cds_service.guideline.schema import answer_values
from cds_service.memo import DigestMemo, digest
from cds_service.model import (
    CodeSystem,
    Coding,
    ConditionFact,
    CoverageFact,
    DataCategory,
    MedicationFact,
    ObservationFact,
    PatientRecord,
    ProcedureFact,
)
from cds_service.orders import coding_of, codings_of, concept_text
from cds_service.references import other_patient_element

logger = logging.getLogger(__name__)


class Unavailable:
    """Marks a category that could not be retrieved (server error, timeout...)."""

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = Unavailable()


@dataclass(frozen=True)
class Incomplete:
    """A value known to hold only part of its category: paging stopped at the cap,
    or a `next` link could not be followed. What it holds is read, and the
    category is still marked unavailable, since the rest might change a criterion.
    `reason` is logged, so it must never carry patient data.
    """

    value: object
    reason: str


# The value set of the LOINC answer codes of the 0-10 numeric pain scale
# (LL2335-9): an Observation may carry one of these in valueCodeableConcept instead
# of a number.
PAIN_SCALE_ANSWERS = "pain-answers"

# Panels whose score is the mean of their item components when the panel itself
# carries no value: the PEG scale (LOINC 91147-9) is the mean of its three 0-10 items.
MEAN_OF_COMPONENTS = {Coding(CodeSystem.LOINC, "91147-9")}

# "7", "7/10", "7 / 10", "7 out of 10": the numerator is the score.
_SCORE_TEXT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:(?:/|out of)\s*10)?\s*$", re.I)

_CATEGORY_OF_TYPE = {
    "Condition": DataCategory.CONDITIONS,
    "Procedure": DataCategory.PROCEDURES,
    "Observation": DataCategory.OBSERVATIONS,
    "MedicationRequest": DataCategory.MEDICATIONS,
    "MedicationStatement": DataCategory.MEDICATIONS,
    "Coverage": DataCategory.COVERAGE,
    "Patient": DataCategory.PATIENT,
}

_MAX_REPAIRS = 5


def build_record(
    values: dict[DataCategory, object],
    is_relevant: Callable[[Coding], bool],
    patient_id: str | None = None,
    answers: dict | None = None,
) -> PatientRecord:
    """The facts in `values`, keeping only resources some criterion reads.

    Each value is a resource, a searchset Bundle, an OperationOutcome, None (the
    client has no data), `UNAVAILABLE`, an `Incomplete` one of these, or a tuple
    of these when several prefetch keys feed one category (MedicationRequest and
    MedicationStatement).

    A category whose data is known to be partial is marked unavailable, not read
    as complete: a failed or `Incomplete` value, or a resource some criterion
    would read that fails validation. Resources about another patient than
    `patient_id` are left out.

    `answers`, kept by the caller from call to call for the same `is_relevant`
    (the guideline keeps one), remembers the answer for each raw coding.
    """
    record = PatientRecord(patient_id=patient_id)
    seen: set[tuple[str, str]] = set()
    screen = _Screen(is_relevant, answers)
    partial: dict[DataCategory, list[str]] = {}
    others = 0
    # The own subject is recognised by one comparison; only other references go
    # through the reference pattern.
    own = f"Patient/{patient_id}" if patient_id else None
    for category, value in values.items():
        parts = value if isinstance(value, tuple) else (value,)
        complete = True
        coded = 0
        for part in parts:
            if isinstance(part, Incomplete):
                partial.setdefault(category, []).append(part.reason)
                part = part.value
            resources, ok = _unpack(part)
            complete = complete and ok
            # Run for every resource of a long history, most of which no criterion
            # reads: the loop stays inline and asks nothing twice.
            for resource in resources:
                subject = resource.get("subject")
                if (
                    own is None
                    or not isinstance(subject, dict)
                    or subject.get("reference") != own
                ) and other_patient_element(resource, patient_id):
                    others += 1
                    continue
                resource_type = resource["resourceType"]
                identity = resource.get("id")
                if isinstance(identity, str):
                    key = (resource_type, identity)
                    if key in seen:
                        continue
                    seen.add(key)
                has_codes, read = screen(resource, resource_type)
                if has_codes:
                    coded += 1
                if resource_type == "Patient":
                    if record.patient_id is None and isinstance(identity, str):
                        record.patient_id = identity
                elif resource_type not in _CATEGORY_OF_TYPE:
                    continue
                # Judged on the raw codings, before any model is built: validating
                # a resource costs some 20 times parsing it, and most of a long
                # history is never read.
                elif (read or resource_type == "Coverage") and not _add(
                    record, resource
                ):
                    skipped = _CATEGORY_OF_TYPE[resource_type]
                    partial.setdefault(skipped, []).append(
                        f"an invalid {resource_type} was skipped"
                    )
        if coded:
            record.received_coded[category] = coded
        if complete:
            record.retrieved.add(category)
        else:
            record.unavailable.add(category)
    for category, reasons in partial.items():
        logger.warning(
            "%s treated as unavailable: %s",
            category.value,
            "; ".join(dict.fromkeys(reasons)),
        )
        record.retrieved.discard(category)
        record.unavailable.add(category)
    if others:
        logger.warning("left out %d resource(s) about another patient", others)
    return record


def _unpack(value: object) -> tuple[list[dict], bool]:
    """The resources inside a prefetch value, and False if it reports a failure."""
    if value is None:
        return [], True
    if value is UNAVAILABLE:
        return [], False
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict) and value.get("resourceType") == "Bundle":
        items = value.get("entry") or []
        items = [items] if isinstance(items, dict) else items
    else:
        items = [value]

    resources, outcomes = [], []
    # Entries that are not resources leave the value's data unknown, not empty.
    malformed = not isinstance(items, list)
    for item in items if isinstance(items, list) else []:
        # A value wrapped as a Bundle entry: {"fullUrl": ..., "resource": {...}}.
        if isinstance(item, dict) and "resourceType" not in item:
            item = item.get("resource")
        if not isinstance(item, dict) or not isinstance(item.get("resourceType"), str):
            malformed = True
            continue
        if item["resourceType"] == "OperationOutcome":
            outcomes.append(item)
        else:
            resources.append(item)

    failed = any(_is_error(outcome) for outcome in outcomes)
    for outcome in outcomes:
        logger.info("prefetch value carries an OperationOutcome: %s", _summary(outcome))
    if malformed:
        logger.warning("prefetch value holds entries that are not resources")
    # An error outcome beside real results (a partial search) still yields them.
    return resources, not (failed and not resources) and not malformed


def _is_error(outcome: dict) -> bool:
    issues = outcome.get("issue") or []
    issues = [issues] if isinstance(issues, dict) else issues
    return any(
        isinstance(issue, dict) and issue.get("severity") in {"error", "fatal"}
        for issue in issues
    )


def _summary(outcome: dict) -> str:
    issues = outcome.get("issue") or []
    issues = [issues] if isinstance(issues, dict) else issues
    return "; ".join(
        f"{issue.get('severity')}/{issue.get('code')}"
        for issue in issues
        if isinstance(issue, dict)
    )


def _add(record: PatientRecord, resource: dict) -> bool:
    """Add the fact of a resource some criterion reads; False when it is invalid
    and so left out (its category is then incomplete)."""
    resource_type = resource["resourceType"]
    valid = validated(resource)
    if valid is None:
        return False
    reference = f"{resource_type}/{valid.get('id', '#')}"
    if resource_type == "Condition":
        record.conditions.append(_condition(valid, reference))
    elif resource_type == "Procedure":
        record.procedures.append(_procedure(valid, reference))
    elif resource_type == "Observation":
        record.observations.append(_observation(valid, reference))
    elif resource_type in ("MedicationRequest", "MedicationStatement"):
        record.medications.append(_medication(valid, reference))
    else:
        record.coverages.append(_coverage(valid, reference))
    return True


_NO_CODES = (False, False)


class _Screen:
    """Whether a raw resource carries codings, and whether a criterion reads one.

    `(has codes, read)`: the codings are those `codings_of` would keep (a code that
    is a non-blank string), the ones a criterion could find the resource by: the
    code of a Condition, Procedure or Observation (and its components) and the
    medication of a MedicationRequest or MedicationStatement.

    A long history repeats a handful of codes (vital signs at every visit), and
    calls repeat them too, so each coding is asked once and its answer kept; after
    the first few resources each question is one dictionary lookup. Only the
    coding (system, code, display: the vocabulary, never a resource, reference,
    date or value) is a key.
    """

    # Distinct codings kept; past this many (a client sending made-up codes) the
    # answers are forgotten and gathered again. A coding with text longer than any
    # vocabulary's is asked every time, never kept, so that what is kept stays
    # within LIMIT x KEPT_TEXT characters whatever callers send.
    LIMIT = 20_000
    KEPT_TEXT = 512

    def __init__(self, is_relevant: Callable[[Coding], bool], answers=None):
        self.is_relevant = is_relevant
        self.answers: dict[tuple, bool] = {} if answers is None else answers

    def __call__(self, resource: dict, resource_type: str) -> tuple[bool, bool]:
        if resource_type == "Observation":
            has_codes, read = self.concept(resource.get("code"))
            components = resource.get("component")
            if read or not components:
                return has_codes, read
            for component in _as_list(components):
                if isinstance(component, dict):
                    found = self.concept(component.get("code"))
                    if found[1]:
                        return found
                    has_codes = has_codes or found[0]
            return has_codes, False
        if resource_type in ("MedicationRequest", "MedicationStatement"):
            return self.concept(_medication_concept(resource))
        return self.concept(resource.get("code"))

    def concept(self, concept: object) -> tuple[bool, bool]:
        if not isinstance(concept, dict):
            return _NO_CODES
        raw = concept.get("coding")
        if isinstance(raw, dict):
            raw = (raw,)
        elif not isinstance(raw, list):
            return _NO_CODES
        has_codes = False
        answers = self.answers
        for item in raw:
            # Only usable codings are kept, so a kept answer needs no checking.
            try:
                answer = answers[
                    (item.get("system"), item.get("code"), item.get("display"))
                ]
            except (KeyError, TypeError, AttributeError):
                answer = self.ask(item)
            if answer:
                return True, True
            has_codes = has_codes or answer is not None
        return has_codes, False

    def ask(self, item: object) -> bool | None:
        """`is_relevant` of one raw coding; None when it is not a usable coding."""
        if not isinstance(item, dict):
            return None
        code = item.get("code")
        if not isinstance(code, str) or not code.strip():
            return None
        system, display = item.get("system"), item.get("display")
        if not (isinstance(system, str | None) and isinstance(display, str | None)):
            # Not a coding FHIR allows, and no telling what it names: read, so
            # that validation finds it and the category counts as incomplete.
            return True
        answer = self.is_relevant(coding_of(item))
        if len(code) + len(system or "") + len(display or "") <= self.KEPT_TEXT:
            if len(self.answers) >= self.LIMIT:
                self.answers.clear()
            self.answers[(system, code, display)] = answer
        return answer


def validated(resource: dict) -> dict | None:
    """`resource` checked against its FHIR R4B model, repaired where lenient.

    Repairs are the quirks real clients send: a single object where R4 has an array,
    unknown elements, and date-times without a zone. What is still invalid after
    that is skipped and logged by type and id only (never its content).
    """
    resource_type = resource.get("resourceType")
    try:
        model = _model_class(resource_type)
    except (KeyError, ValueError):
        return None

    key = _digest(resource)
    if key is not None and _known_valid.get(key):
        return resource

    data = resource
    for _ in range(_MAX_REPAIRS):
        try:
            model.model_validate(data)
            if data is resource and key is not None:
                _known_valid.put(key, True)
            return data
        except ValidationError as error:
            errors = error.errors()
        if data is resource:
            data = copy.deepcopy(resource)
        if not _repair(data, errors):
            break

    first = errors[0]["loc"] if errors else ()
    logger.warning(
        "skipped invalid %s/%s: %d validation error(s), first at %s",
        resource_type,
        resource.get("id"),
        len(errors),
        ".".join(str(step) for step in first) or "(resource)",
    )
    return None


# order-select fires on every change to the order form, with the same prefetch each
# time, and validating a resource costs some 20 times parsing it. Only a digest of
# each resource that validated unchanged is kept, never its content: the service
# keeps no patient data between calls (CRD sec-6).
_known_valid = DigestMemo(size=8192)


def _digest(resource: dict) -> bytes | None:
    # marshal writes the types of parsed JSON apart (1, 1.0 and True; "1" and 1)
    # and keys in the order the client sent them, at a third of the cost of repr;
    # format 2 has no back-references, so equal content gives equal bytes. It is
    # only ever written here, never read back. A resource resent with its keys in
    # another order is only validated again.
    try:
        return digest(marshal.dumps(resource, 2))
    except ValueError:  # nested deeper than marshal goes, or not parsed JSON
        return None


# The lookup imports the model's module on every call; the classes never change.
_model_class = functools.lru_cache(maxsize=64)(get_fhir_model_class)


def _repair(data: dict, errors: list[dict]) -> bool:
    changed = False
    for error in errors:
        *path, last = error["loc"] or (None,)
        parent = data
        try:
            for step in path:
                parent = parent[step]
            value = parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        if error["type"] == "list_type" and isinstance(value, dict):
            parent[last] = [value]
        elif error["type"] == "extra_forbidden":
            del parent[last]
        elif is_naive_datetime(value):
            parent[last] = value.strip() + "Z"
        else:
            continue
        changed = True
    return changed


def _as_list(value: object) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _status(value: object) -> str | None:
    """A status as a code, whether sent as a code or a CodeableConcept."""
    if isinstance(value, str):
        return value
    codings = codings_of(value)
    return codings[0].code if codings else None


def _period(value: object) -> tuple[object, object]:
    if isinstance(value, dict):
        return value.get("start"), value.get("end")
    return None, None


def _condition(resource: dict, reference: str) -> ConditionFact:
    codings = codings_of(resource.get("code"))
    onset_start, _ = _period(resource.get("onsetPeriod"))
    abatement_start, abatement_end = _period(resource.get("abatementPeriod"))
    return ConditionFact(
        reference=reference,
        codings=codings,
        text=concept_text(resource.get("code"), codings),
        clinical_status=_status(resource.get("clinicalStatus")),
        verification_status=_status(resource.get("verificationStatus")),
        onset=first_date(resource.get("onsetDateTime"), onset_start),
        recorded=parse_date(resource.get("recordedDate")),
        abatement=first_date(
            resource.get("abatementDateTime"), abatement_end, abatement_start
        ),
    )


def _procedure(resource: dict, reference: str) -> ProcedureFact:
    codings = codings_of(resource.get("code"))
    start, end = _period(resource.get("performedPeriod"))
    outcome = resource.get("outcome")
    notes = [
        note.get("text")
        for note in _as_list(resource.get("note"))
        if isinstance(note, dict) and isinstance(note.get("text"), str)
    ]
    outcome_text = concept_text(outcome, codings_of(outcome))
    texts = [text for text in [outcome_text, *notes] if text]
    return ProcedureFact(
        reference=reference,
        codings=codings,
        text=concept_text(resource.get("code"), codings),
        status=_status(resource.get("status")),
        performed=first_date(resource.get("performedDateTime"), start),
        performed_end=parse_date(end),
        outcome_codings=codings_of(outcome),
        outcome_text="; ".join(texts) or None,
    )


def _observation(resource: dict, reference: str) -> ObservationFact:
    codings = codings_of(resource.get("code"))
    value, unit, text = observation_value(resource)
    components = []
    for component in _as_list(resource.get("component")):
        if isinstance(component, dict):
            components.append(
                (codings_of(component.get("code")), observation_value(component)[0])
            )
    if (
        value is None
        and components
        and MEAN_OF_COMPONENTS.intersection(Coding(c.system, c.code) for c in codings)
    ):
        items = [item for _, item in components]
        if all(item is not None for item in items):
            value = sum(items) / len(items)
    start, _ = _period(resource.get("effectivePeriod"))
    return ObservationFact(
        reference=reference,
        codings=codings,
        status=_status(resource.get("status")),
        effective=first_date(
            resource.get("effectiveDateTime"),
            start,
            resource.get("effectiveInstant"),
            resource.get("issued"),
        ),
        value=value,
        unit=unit,
        value_text=text,
        components=tuple(components),
    )


def observation_value(element: dict) -> tuple[float | None, str | None, str | None]:
    """(number, unit, text) of an Observation's or component's value[x]."""
    for key in ("valueInteger", "valueDecimal"):
        if isinstance(element.get(key), (int, float)) and not isinstance(
            element.get(key), bool
        ):
            return float(element[key]), None, None

    quantity = element.get("valueQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), (int, float)):
        unit = quantity.get("unit") or quantity.get("code")
        return float(quantity["value"]), unit, None

    concept = element.get("valueCodeableConcept")
    if isinstance(concept, dict):
        codings = codings_of(concept)
        text = concept_text(concept, codings)
        answers = answer_values(PAIN_SCALE_ANSWERS)
        for coding in codings:
            if coding.code in answers:
                return float(answers[coding.code]), None, text
        return None, None, text

    text = element.get("valueString")
    if isinstance(text, str):
        match = _SCORE_TEXT.match(text)
        return (float(match.group(1)) if match else None), None, text
    return None, None, None


def _medication_concept(resource: dict) -> object:
    concept = resource.get("medicationCodeableConcept")
    if concept is not None:
        return concept
    # A reference to a contained Medication ("#med1") carries the code there.
    reference = resource.get("medicationReference")
    target = reference.get("reference") if isinstance(reference, dict) else None
    if isinstance(target, str) and target.startswith("#"):
        for contained in _as_list(resource.get("contained")):
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                return contained.get("code")
    return None


def _medication(resource: dict, reference: str) -> MedicationFact:
    concept = _medication_concept(resource)
    codings = codings_of(concept)
    text = concept_text(concept, codings)
    if text is None and isinstance(resource.get("medicationReference"), dict):
        text = resource["medicationReference"].get("display")

    if resource["resourceType"] == "MedicationRequest":
        dosages = _as_list(resource.get("dosageInstruction"))
        timing = (
            dosages[0].get("timing")
            if dosages and isinstance(dosages[0], dict)
            else None
        )
        repeat = timing.get("repeat") if isinstance(timing, dict) else None
        bounds = repeat.get("boundsPeriod") if isinstance(repeat, dict) else None
        bounds_start, bounds_end = _period(bounds)
        dispense = resource.get("dispenseRequest")
        validity = (
            dispense.get("validityPeriod") if isinstance(dispense, dict) else None
        )
        start = first_date(resource.get("authoredOn"), bounds_start)
        end = first_date(bounds_end, _period(validity)[1])
    else:
        period_start, period_end = _period(resource.get("effectivePeriod"))
        start = first_date(
            resource.get("effectiveDateTime"),
            period_start,
            resource.get("dateAsserted"),
        )
        end = parse_date(period_end)

    return MedicationFact(
        reference=reference,
        codings=codings,
        text=text,
        status=_status(resource.get("status")),
        start=start,
        end=end,
    )


def _coverage(resource: dict, reference: str) -> CoverageFact:
    start, end = _period(resource.get("period"))
    plan_names = []
    for item in _as_list(resource.get("class")):
        if isinstance(item, dict):
            plan_names += [
                item[k] for k in ("value", "name") if isinstance(item.get(k), str)
            ]
    payor_names = [
        payor["display"]
        for payor in _as_list(resource.get("payor"))
        if isinstance(payor, dict) and isinstance(payor.get("display"), str)
    ]
    return CoverageFact(
        reference=reference,
        type_codings=codings_of(resource.get("type")),
        status=_status(resource.get("status")),
        period_start=parse_date(start),
        period_end=parse_date(end),
        plan_names=tuple(plan_names),
        payor_names=tuple(payor_names),
    )
