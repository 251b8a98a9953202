"""Criterion kinds that read treatment history: conservative therapy, current drugs."""

from __future__ import annotations

import logging
from datetime import date

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import (
    Context,
    Finding,
    condition_evidence,
    days_between,
    match_conditions,
    register_kind,
    unavailable,
    usable_medications,
    usable_procedures,
)
from cds_service.model import DataCategory, Evidence, MedicationFact, State

logger = logging.getLogger(__name__)


def _med_label(med: MedicationFact) -> str:
    if med.text:
        return med.text
    return next((c.display for c in med.codings if c.display), med.reference)


def _therapy_evidence(params: dict, ctx: Context) -> list[tuple[date | None, Evidence]]:
    key = (
        "therapy",
        tuple(vs.id for vs in params.get("medications") or ()),
        tuple(vs.id for vs in params.get("procedures") or ()),
    )
    if key in ctx.cache:
        return ctx.cache[key]
    found: list[tuple[date | None, Evidence]] = []
    if DataCategory.MEDICATIONS not in ctx.record.unavailable:
        for med in usable_medications(ctx):
            if med.start and med.start > ctx.on:
                continue
            for vs in params.get("medications") or ():
                how = vs.match(med.codings, med.text)
                if how:
                    note = "" if how == "code" else " (matched by ingredient name)"
                    found.append(
                        (
                            med.start,
                            Evidence(
                                f"{vs.title}: {_med_label(med)}{note}",
                                med.reference,
                                med.start,
                            ),
                        )
                    )
                    break
    if DataCategory.PROCEDURES not in ctx.record.unavailable:
        for proc in usable_procedures(ctx):
            if proc.performed and proc.performed > ctx.on:
                continue
            for vs in params.get("procedures") or ():
                if vs.match(proc.codings):
                    label = proc.text or next(
                        (c.display for c in proc.codings if c.display), proc.reference
                    )
                    found.append(
                        (
                            proc.performed,
                            Evidence(
                                f"{vs.title}: {label}", proc.reference, proc.performed
                            ),
                        )
                    )
                    break
    ctx.cache[key] = found
    return found


class ConservativeTherapyParams(Schema):
    medications = fields.List(fields.String(), load_default=None)
    procedures = fields.List(fields.String(), load_default=None)
    min_days = fields.Integer(load_default=0, validate=validate.Range(min=0))
    waivers = fields.List(fields.Dict(), load_default=None)


@register_kind(
    "conservative-therapy",
    ConservativeTherapyParams,
    valuesets=("medications", "procedures"),
    criteria=("waivers",),
    data=(DataCategory.MEDICATIONS, DataCategory.PROCEDURES),
)
def conservative_therapy(params: dict, ctx: Context) -> Finding:
    """Met by therapy begun at least `min_days` before the date, or by a waiver.

    Duration runs from the first evidence (medication start or therapy session) to
    the evaluation date; failure itself cannot be coded, so a trial of that length
    followed by this order is taken as failed.
    """
    finding = _therapy_finding(params, ctx)
    if finding.state is State.MET or not params.get("waivers"):
        return finding

    states = []
    for waiver in params["waivers"]:
        result = ctx.evaluate(waiver)
        if result.state is State.MET:
            return Finding(
                State.MET,
                f"Exception applies: {waiver.text}. {result.explanation}",
                result.evidence + finding.evidence,
            )
        states.append(f"{waiver.text} ({result.state.value})")
    return Finding(
        finding.state,
        f"{finding.explanation} No exception applies: {'; '.join(states)}.",
        finding.evidence,
        finding.data_unavailable,
    )


def _therapy_finding(params: dict, ctx: Context) -> Finding:
    found = _therapy_evidence(params, ctx)
    min_days = params["min_days"]
    evidence = tuple(e for _, e in sorted(found, key=lambda f: f[0] or date.max))
    cats = []
    if params.get("medications"):
        cats.append(DataCategory.MEDICATIONS)
    if params.get("procedures"):
        cats.append(DataCategory.PROCEDURES)
    # With one source missing, what the other shows may not be the whole history.
    missing = unavailable(ctx, *cats)
    if not found:
        if missing:
            return missing
        return Finding(
            State.NOT_DOCUMENTED,
            "No conservative therapy (medication or therapy session) on record.",
        )
    dated = [d for d, _ in found if d]
    if not dated:
        return Finding(
            State.NOT_DOCUMENTED,
            "Conservative therapy is on record without dates, so its duration "
            f"(at least {min_days} days) cannot be established.",
            evidence,
        )
    first = min(dated)
    held = days_between(first, ctx.on)
    if held >= min_days:
        # Sections that name no duration (SI, soft tissue) set min_days to 0.
        needed = f"; at least {min_days} required" if min_days else ""
        return Finding(
            State.MET,
            f"Conservative therapy since {first.isoformat()} ({held} days{needed}).",
            evidence,
        )
    if missing:
        return Finding(
            State.NOT_DOCUMENTED,
            f"{missing.explanation} Therapy on record began {first.isoformat()}, "
            f"{held} days before {ctx.on.isoformat()}; {min_days} days are required.",
            evidence,
            data_unavailable=True,
        )
    return Finding(
        State.NOT_MET,
        f"Conservative therapy began {first.isoformat()}, only {held} days before "
        f"{ctx.on.isoformat()}; at least {min_days} days are required.",
        evidence,
    )


class MedicationCurrentParams(Schema):
    medications = fields.List(fields.String(), required=True)
    conditions = fields.List(fields.String(), load_default=None)


@register_kind(
    "medication-current",
    MedicationCurrentParams,
    valuesets=("medications", "conditions"),
    data=(DataCategory.MEDICATIONS,),
)
def medication_current(params: dict, ctx: Context) -> Finding:
    """Met by an active medication from the sets (or a condition saying so)."""
    evidence = []
    if DataCategory.MEDICATIONS not in ctx.record.unavailable:
        for med in usable_medications(ctx):
            if med.status not in (None, "active", "on-hold"):
                continue
            if (med.start and med.start > ctx.on) or (med.end and med.end < ctx.on):
                continue
            for vs in params["medications"]:
                if vs.match(med.codings, med.text):
                    evidence.append(
                        Evidence(
                            f"{vs.title}: {_med_label(med)}", med.reference, med.start
                        )
                    )
                    break
    if (
        params.get("conditions")
        and DataCategory.CONDITIONS not in ctx.record.unavailable
    ):
        for cond in match_conditions(ctx, params["conditions"]).current:
            evidence.append(condition_evidence(cond))
    titles = " or ".join(vs.title for vs in params["medications"])
    if evidence:
        return Finding(State.MET, f"Currently on {titles}.", tuple(evidence))
    if missing := unavailable(ctx, DataCategory.MEDICATIONS):
        return missing
    return Finding(State.NOT_DOCUMENTED, f"No current {titles} on record.")
