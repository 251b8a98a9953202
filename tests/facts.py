"""Builders of PatientRecord facts and orders for the engine tests (no FHIR JSON)."""

from __future__ import annotations

from datetime import date, timedelta

from cds_service.model import (
    Coding,
    ConditionFact,
    CoverageFact,
    DataCategory,
    MedicationFact,
    ObservationFact,
    Order,
    PatientRecord,
    ProcedureFact,
)

ON = date(2026, 12, 3)


def days_ago(n: int) -> date:
    return ON - timedelta(days=n)


def coding(text: str, display: str | None = None) -> Coding:
    system, code = text.split(":", 1)
    return Coding(system, code, display)


def cond(
    ref,
    *codes,
    clinical="active",
    verification="confirmed",
    onset=400,
    text=None,
    abatement=None,
):
    return ConditionFact(
        reference=f"Condition/{ref}",
        codings=tuple(coding(c) for c in codes),
        text=text,
        clinical_status=clinical,
        verification_status=verification,
        onset=days_ago(onset) if onset is not None else None,
        recorded=None,
        abatement=days_ago(abatement) if abatement is not None else None,
    )


def obs(ref, loinc, value, ago, unit=None, status="final"):
    return ObservationFact(
        reference=f"Observation/{ref}",
        codings=(coding(f"loinc:{loinc}"),),
        status=status,
        effective=days_ago(ago),
        value=value,
        unit=unit,
    )


def pain(ref, value, ago):
    return obs(ref, "72514-3", value, ago)


def med(ref, display, ago, status="active", code="999999", end=None):
    return MedicationFact(
        reference=f"MedicationRequest/{ref}",
        codings=(Coding("rxnorm", code, display),),
        text=None,
        status=status,
        start=days_ago(ago) if ago is not None else None,
        end=days_ago(end) if end is not None else None,
    )


def proc(ref, code, ago, status="completed", outcome=None):
    system = "hcpcs" if code[0].isalpha() else ("snomed" if len(code) > 5 else "cpt")
    return ProcedureFact(
        reference=f"Procedure/{ref}",
        codings=(Coding(system, code),),
        text=None,
        status=status,
        performed=days_ago(ago) if ago is not None else None,
        outcome_text=outcome,
    )


def coverage(ref, sop, status="active"):
    return CoverageFact(
        reference=f"Coverage/{ref}",
        type_codings=(Coding("sop", sop),) if sop else (),
        status=status,
        period_start=None,
        period_end=None,
    )


def order(code, ref=None, selected=True):
    system = "hcpcs" if code[0].isalpha() else "cpt"
    return Order(
        reference=f"ServiceRequest/{ref or code}",
        resource_type="ServiceRequest",
        codings=(Coding(system, code),),
        resource={"resourceType": "ServiceRequest", "id": ref or code},
        selected=selected,
        text=code,
    )


def record(
    conditions=(),
    observations=(),
    medications=(),
    procedures=(),
    coverages=(),
    unavailable=(),
):
    unavailable = set(unavailable)
    return PatientRecord(
        patient_id="p1",
        conditions=list(conditions),
        observations=list(observations),
        medications=list(medications),
        procedures=list(procedures),
        coverages=list(coverages),
        unavailable=unavailable,
        retrieved=set(DataCategory) - unavailable,
    )


def failing(determination) -> dict[str, str]:
    """Criterion id -> state for every criterion that is not met."""
    return {r.criterion_id: r.state.value for r in determination.failing}
