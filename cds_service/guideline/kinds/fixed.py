"""Criterion kinds that need no patient data, and the all-of / any-of composites."""

from __future__ import annotations

import logging

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import Context, Finding, register_kind
from cds_service.model import State

logger = logging.getLogger(__name__)


class AlwaysParams(Schema):
    state = fields.String(
        load_default=State.NOT_MET.value,
        validate=validate.OneOf([State.MET.value, State.NOT_MET.value]),
    )
    explanation = fields.String(required=True)


@register_kind("always", AlwaysParams)
def always(params: dict, ctx: Context) -> Finding:
    """A fixed verdict, for services the guideline never (or always) covers."""
    return Finding(State(params["state"]), params["explanation"])


class ManualReviewParams(Schema):
    reason = fields.String(required=True)


@register_kind("manual-review", ManualReviewParams)
def manual_review(params: dict, ctx: Context) -> Finding:
    """The code cannot be adjudicated from structured data; a reviewer must look."""
    return Finding(State.NOT_DOCUMENTED, f"Needs manual review: {params['reason']}")


class CompositeParams(Schema):
    criteria = fields.List(
        fields.Dict(), required=True, validate=validate.Length(min=1)
    )


def _summary(ctx: Context, criteria):
    results = [(c, ctx.evaluate(c)) for c in criteria]
    evidence = tuple(e for _, r in results for e in r.evidence)
    unavailable = any(r.data_unavailable for _, r in results)
    return results, evidence, unavailable


@register_kind("all-of", CompositeParams, criteria=("criteria",))
def all_of(params: dict, ctx: Context) -> Finding:
    """Met when every nested criterion is met; not met if any is not met."""
    results, evidence, unavail = _summary(ctx, params["criteria"])
    text = " ".join(r.explanation for _, r in results)
    if any(r.state is State.NOT_MET for _, r in results):
        return Finding(State.NOT_MET, text, evidence)
    if any(r.state is State.NOT_DOCUMENTED for _, r in results):
        return Finding(State.NOT_DOCUMENTED, text, evidence, unavail)
    return Finding(State.MET, text, evidence)


@register_kind("any-of", CompositeParams, criteria=("criteria",))
def any_of(params: dict, ctx: Context) -> Finding:
    """Met when one nested criterion is met; not met only if all are not met."""
    results, evidence, unavail = _summary(ctx, params["criteria"])
    for crit, result in results:
        if result.state is State.MET:
            return Finding(
                State.MET, f"{crit.text}: {result.explanation}", result.evidence
            )
    text = " ".join(r.explanation for _, r in results)
    if all(r.state is State.NOT_MET for _, r in results):
        return Finding(State.NOT_MET, text, evidence)
    return Finding(State.NOT_DOCUMENTED, text, evidence, unavail)
