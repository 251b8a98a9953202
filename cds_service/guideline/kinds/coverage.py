"""Criterion kind reading the member's line of business from Coverage."""

from __future__ import annotations

import logging
from datetime import date

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import Context, Finding, register_kind, unavailable
from cds_service.guideline.valuesets import ValueSet
from cds_service.model import CoverageFact, DataCategory, Evidence, State

logger = logging.getLogger(__name__)

LINES = ("dual", "medicare", "medicaid", "commercial")


def active_coverages(coverages, on: date) -> list[CoverageFact]:
    out = []
    for cov in coverages:
        if cov.status not in (None, "active"):
            continue
        if (cov.period_start and cov.period_start > on) or (
            cov.period_end and cov.period_end < on
        ):
            continue
        out.append(cov)
    return out


def classify_line_of_business(
    coverages,
    on: date,
    code_sets: dict[str, ValueSet],
    plan_names: dict[str, list[str]],
) -> tuple[set[str], list[Evidence]]:
    """The member's lines of business on `on` and the coverages that showed them.

    Decision order (codes.md section 5): dual-eligible codes, then Medicare, Medicaid,
    Commercial payer-type codes, then plan names; a member with an active Medicare
    and an active Medicaid coverage is dual eligible. A dual member is also Medicare
    and Medicaid. Nothing here ever defaults to Commercial.
    """
    found: set[str] = set()
    evidence = []
    for cov in active_coverages(coverages, on):
        lob = None
        for line in LINES:
            vs = code_sets.get(line)
            if vs is not None and vs.match(cov.type_codings):
                lob = line
                break
        if lob is None:
            names = " ".join(cov.plan_names + cov.payor_names).lower()
            for line in LINES:
                if any(n.lower() in names for n in plan_names.get(line, ())):
                    lob = line
                    break
        if lob:
            found.add(lob)
            evidence.append(
                Evidence(
                    f"Coverage classed as {lob}",
                    cov.reference,
                    value=", ".join(c.code for c in cov.type_codings) or None,
                )
            )
    if "dual" in found or {"medicare", "medicaid"} <= found:
        found |= {"dual", "medicare", "medicaid"}
    return found, evidence


class LineOfBusinessParams(Schema):
    any_of = fields.List(
        fields.String(validate=validate.OneOf(LINES)),
        required=True,
        validate=validate.Length(min=1),
    )
    dual_codes = fields.String(load_default="lob-dual")
    medicare_codes = fields.String(load_default="lob-medicare")
    medicaid_codes = fields.String(load_default="lob-medicaid")
    commercial_codes = fields.String(load_default="lob-commercial")
    plan_names = fields.Dict(
        keys=fields.String(validate=validate.OneOf(LINES)),
        values=fields.List(fields.String()),
        load_default=dict,
    )


@register_kind(
    "line-of-business",
    LineOfBusinessParams,
    valuesets=("dual_codes", "medicare_codes", "medicaid_codes", "commercial_codes"),
    data=(DataCategory.COVERAGE,),
)
def line_of_business(params: dict, ctx: Context) -> Finding:
    """Met when the member's line of business is one of `any_of`."""
    if missing := unavailable(ctx, DataCategory.COVERAGE):
        return missing
    code_sets = {line: params[f"{line}_codes"] for line in LINES}
    lines, evidence = classify_line_of_business(
        ctx.record.coverages, ctx.on, code_sets, params["plan_names"]
    )
    wanted = " or ".join(params["any_of"])
    if not lines:
        return Finding(
            State.NOT_DOCUMENTED,
            "The member's line of business cannot be told from the Coverage on record "
            "(it is not assumed to be Commercial).",
        )
    shown = ", ".join(sorted(lines))
    if lines & set(params["any_of"]):
        return Finding(
            State.MET, f"Line of business {shown} (needs {wanted}).", tuple(evidence)
        )
    return Finding(
        State.NOT_MET,
        f"Line of business {shown}; this applies to {wanted}.",
        tuple(evidence),
    )
