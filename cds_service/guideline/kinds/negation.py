"""The `not` composite: turns a detector into a rule, e.g. to gate `applies_when`."""

from __future__ import annotations

import logging

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import NEGATED, Context, Finding, register_kind

logger = logging.getLogger(__name__)


class NotParams(Schema):
    criteria = fields.List(
        fields.Dict(), required=True, validate=validate.Length(equal=1)
    )


@register_kind("not", NotParams, criteria=("criteria",))
def negation(params: dict, ctx: Context) -> Finding:
    """Met when the nested criterion is not met (and the reverse); not documented
    stays not documented, since the absence of data proves neither."""
    (inner,) = params["criteria"]
    found = ctx.evaluate(inner)
    return Finding(
        NEGATED.get(found.state, found.state),
        found.explanation,
        found.evidence,
        found.data_unavailable,
    )
