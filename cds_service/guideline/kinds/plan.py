"""Criterion kind reading the member's plan (Coverage.class and payor names)."""

from __future__ import annotations

import logging

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import Context, Finding, register_kind, unavailable
from cds_service.guideline.kinds.coverage import active_coverages
from cds_service.model import DataCategory, Evidence, State

logger = logging.getLogger(__name__)


class PlanNameParams(Schema):
    names = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    what = fields.String(required=True)


@register_kind("plan-name", PlanNameParams, data=(DataCategory.COVERAGE,))
def plan_name(params: dict, ctx: Context) -> Finding:
    """Met when an active coverage's plan or payor name contains one of `names`.

    Names are compared case-insensitively as substrings. With no plan or payor name
    on any active coverage the plan cannot be told: not documented.
    """
    if missing := unavailable(ctx, DataCategory.COVERAGE):
        return missing
    wanted = [n.lower() for n in params["names"]]
    named = []
    for cov in active_coverages(ctx.record.coverages, ctx.on):
        names = [n for n in cov.plan_names + cov.payor_names if n.strip()]
        if not names:
            continue
        named.append((cov, names))
        hit = next((n for n in names if any(w in n.lower() for w in wanted)), None)
        if hit:
            return Finding(
                State.MET,
                f"The member's plan is {hit} ({params['what']}).",
                (Evidence(f"Coverage plan {hit}", cov.reference),),
            )
    if not named:
        return Finding(
            State.NOT_DOCUMENTED,
            f"No plan name on an active Coverage, so whether the member is in "
            f"{params['what']} cannot be told.",
        )
    shown = "; ".join(", ".join(names) for _, names in named)
    return Finding(
        State.NOT_MET,
        f"The member's plan ({shown}) is not {params['what']}.",
        tuple(Evidence("Coverage plan", cov.reference) for cov, _ in named),
    )
