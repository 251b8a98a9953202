"""Domain types shared by the request layer, the guideline engine and the cards."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date


class CodeSystem:
    """Short names for the code systems the guideline uses.

    `cds_service.guideline.valuesets.normalize_system` maps every URI variant an EHR
    may send (see shared/reference/codes.md, section 0) to one of these names.
    """

    CPT = "cpt"
    HCPCS = "hcpcs"
    ICD10CM = "icd10cm"
    SNOMED = "snomed"
    LOINC = "loinc"
    RXNORM = "rxnorm"
    SOP = "sop"
    ACTCODE = "actcode"


@dataclass(frozen=True)
class Coding:
    """One coding, with its system already normalised to a `CodeSystem` name."""

    system: str
    code: str
    display: str | None = None


@dataclass(frozen=True)
class Order:
    """A draft order from `context.draftOrders` that carries a procedure code."""

    reference: str  # "ServiceRequest/abc", as in context.selections
    resource_type: str
    codings: tuple[Coding, ...]
    resource: dict  # the raw JSON, for systemActions that echo it back
    authored: date | None = None
    selected: bool = True  # False for order-select drafts that are context only
    text: str | None = None  # code.text or the first display, for cards


# --- Facts read from the patient record --------------------------------------------
# The record builder turns raw FHIR resources into these facts; the engine reads only
# facts, never raw JSON, so that lenient parsing lives in one place.


@dataclass(frozen=True)
class ConditionFact:
    reference: str
    codings: tuple[Coding, ...]
    text: str | None
    clinical_status: str | None  # active, recurrence, relapse, inactive, remission...
    verification_status: str | None  # confirmed, provisional, refuted, entered-in-error
    onset: date | None
    recorded: date | None
    abatement: date | None

    @property
    def first_evidence(self) -> date | None:
        return self.onset or self.recorded


@dataclass(frozen=True)
class ProcedureFact:
    reference: str
    codings: tuple[Coding, ...]
    text: str | None
    status: str | None  # completed, in-progress, not-done, entered-in-error...
    performed: date | None
    performed_end: date | None = None
    # Coded outcome or notes, e.g. "no relief"; used by the prior-response criteria.
    outcome_codings: tuple[Coding, ...] = ()
    outcome_text: str | None = None


@dataclass(frozen=True)
class ObservationFact:
    reference: str
    codings: tuple[Coding, ...]
    status: str | None
    effective: date | None
    # Numeric value read from valueInteger, valueQuantity, a LOINC answer code or a
    # "7/10" string; None when the value could not be read as a number.
    value: float | None
    unit: str | None = None
    value_text: str | None = None
    components: tuple[tuple[tuple[Coding, ...], float | None], ...] = ()


@dataclass(frozen=True)
class MedicationFact:
    reference: str  # MedicationRequest/x or MedicationStatement/x
    codings: tuple[Coding, ...]
    text: str | None
    status: str | None
    start: date | None  # authoredOn, effectivePeriod.start, effectiveDateTime
    end: date | None = None


@dataclass(frozen=True)
class CoverageFact:
    reference: str
    type_codings: tuple[Coding, ...]
    status: str | None
    period_start: date | None
    period_end: date | None
    plan_names: tuple[str, ...] = ()  # Coverage.class values and names (plan, group)
    payor_names: tuple[str, ...] = ()


class DataCategory(str, enum.Enum):
    """Kinds of patient data a criterion can depend on (one per prefetch key)."""

    PATIENT = "patient"
    CONDITIONS = "conditions"
    PROCEDURES = "procedures"
    OBSERVATIONS = "observations"
    MEDICATIONS = "medications"
    COVERAGE = "coverage"


@dataclass
class PatientRecord:
    """Everything known about the patient for one hook call."""

    patient_id: str | None = None
    conditions: list[ConditionFact] = field(default_factory=list)
    procedures: list[ProcedureFact] = field(default_factory=list)
    observations: list[ObservationFact] = field(default_factory=list)
    medications: list[MedicationFact] = field(default_factory=list)
    coverages: list[CoverageFact] = field(default_factory=list)
    # Categories that could not be retrieved (FHIR server down, timeout...), as
    # opposed to categories the client said are empty. Criteria reading these are
    # "not documented" and the coverage determination becomes indeterminate.
    unavailable: set[DataCategory] = field(default_factory=set)
    # Categories for which the record holds any answer at all (possibly empty).
    retrieved: set[DataCategory] = field(default_factory=set)
    # Resources with at least one coding the EHR returned per category, counted
    # before irrelevant ones are skipped: "no radiculopathy on record" means
    # something only when the record holds coded conditions at all.
    received_coded: dict[DataCategory, int] = field(default_factory=dict)


# --- Determinations ------------------------------------------------------------------


class State(str, enum.Enum):
    MET = "met"
    NOT_MET = "not-met"
    NOT_DOCUMENTED = "not-documented"


class Role(str, enum.Enum):
    """What a rule does to the determination when it is not satisfied."""

    REQUIREMENT = "requirement"  # not met / not documented -> conditional
    EXCLUSION = "exclusion"  # not met -> not-covered
    LIMIT = "limit"  # not met -> not-covered (frequency or hard limits)
    REVIEW = "review"  # always sends the order to manual review


class Outcome(str, enum.Enum):
    """Values of the CRD coverage-information `covered` element."""

    COVERED = "covered"
    CONDITIONAL = "conditional"
    NOT_COVERED = "not-covered"
    INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class Evidence:
    """A resource, date or value that decided a criterion."""

    description: str
    reference: str | None = None
    date: date | None = None
    value: str | None = None


@dataclass(frozen=True)
class CriterionResult:
    criterion_id: str
    section: str  # the guideline section the rule encodes
    text: str  # short paraphrase of the guideline wording
    role: Role
    state: State
    explanation: str  # one clinician-readable sentence on why
    evidence: tuple[Evidence, ...] = ()
    reading: str | None = None  # the interpretation chosen where the text is ambiguous
    data_unavailable: bool = False  # not documented because data could not be had


@dataclass(frozen=True)
class Determination:
    order: Order
    billing_code: Coding
    rule_set: str  # id of the guideline section, e.g. "epidural-interlaminar"
    rule_set_title: str
    outcome: Outcome
    results: tuple[CriterionResult, ...]
    evaluated_on: date
    coverage: CoverageFact | None = None
    manual_review: str | None = None  # why the code needs manual review, if it does

    @property
    def failing(self) -> tuple[CriterionResult, ...]:
        return tuple(r for r in self.results if r.state is not State.MET)
