"""Criterion kinds that read the patient's conditions (problem list, diagnoses)."""

from __future__ import annotations

import logging

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import (
    REGION_NAMES,
    Context,
    Finding,
    condition_evidence,
    condition_label,
    days_between,
    holds_coded_conditions,
    ignored_note,
    match_conditions,
    register_kind,
    split_by_region,
    unavailable,
)
from cds_service.model import DataCategory, State

logger = logging.getLogger(__name__)

_VS_LIST = fields.List(fields.String(), validate=validate.Length(min=1))


def _titles(valuesets) -> str:
    titles = [vs.title for vs in valuesets]
    if len(titles) == 1:
        return titles[0]
    return ", ".join(titles[:-1]) + " or " + titles[-1]


def _found(conditions) -> str:
    parts = []
    for cond in conditions:
        codes = ", ".join(c.code for c in cond.codings)
        since = (
            f" since {cond.first_evidence.isoformat()}" if cond.first_evidence else ""
        )
        parts.append(f"{condition_label(cond)} ({codes}){since}")
    return "; ".join(parts)


def _current(ctx: Context, params: dict, name: str):
    """Current conditions of a value-set param: (counted, in another region)."""
    valuesets = params.get(name)
    if not valuesets:
        return [], []
    return _by_region(ctx, params, valuesets, match_conditions(ctx, valuesets).current)


def _by_region(ctx: Context, params: dict, valuesets, current):
    """Current conditions split by the order's spine region, when the rule asks."""
    if not params.get("same_region"):
        return current, []
    return split_by_region(ctx, current, valuesets)


def _other_region_note(ctx: Context, conditions) -> str:
    if not conditions:
        return ""
    return (
        f" {_found(conditions)} is on record, but the order is for the "
        f"{REGION_NAMES[ctx.code.region]}."
    )


def _text_only_note(ctx: Context) -> str:
    count = sum(1 for c in ctx.record.conditions if not c.codings and c.text)
    if not count:
        return ""
    return f" {count} condition(s) recorded as text only could not be assessed."


class ConditionPresentParams(Schema):
    any_of = fields.List(
        fields.String(), required=True, validate=validate.Length(min=1)
    )
    min_duration_days = fields.Integer(
        load_default=None, validate=validate.Range(min=0)
    )
    counter_evidence = fields.List(fields.String(), load_default=None)
    counter_explanation = fields.String(load_default=None)
    # Only conditions whose code names the order's spine region (or no region) count.
    same_region = fields.Boolean(load_default=False)


@register_kind(
    "condition-present",
    ConditionPresentParams,
    valuesets=("any_of", "counter_evidence"),
    data=(DataCategory.CONDITIONS,),
)
def condition_present(params: dict, ctx: Context) -> Finding:
    """Met by a current condition from the value sets (held long enough, if asked)."""
    if missing := unavailable(ctx, DataCategory.CONDITIONS):
        return missing
    wanted = _titles(params["any_of"])
    found = match_conditions(ctx, params["any_of"])
    current, elsewhere = _by_region(ctx, params, params["any_of"], found.current)
    note = ignored_note(found.ignored)
    if not current:
        against, _ = _current(ctx, params, "counter_evidence")
        if against:
            return Finding(
                State.NOT_MET,
                (params.get("counter_explanation") or f"No {wanted} on record.") + note,
                tuple(condition_evidence(c) for c in against),
            )
        if elsewhere:
            return Finding(
                State.NOT_DOCUMENTED,
                _other_region_note(ctx, elsewhere).strip() + note,
                tuple(condition_evidence(c, "other region") for c in elsewhere),
            )
        return Finding(
            State.NOT_DOCUMENTED,
            f"No current {wanted} on record.{note}{_text_only_note(ctx)}".strip(),
        )

    evidence = tuple(condition_evidence(c) for c in current)
    min_days = params.get("min_duration_days")
    if min_days is None:
        return Finding(State.MET, f"On record: {_found(current)}.{note}", evidence)

    dated = [c.first_evidence for c in current if c.first_evidence]
    if not dated:
        return Finding(
            State.NOT_DOCUMENTED,
            f"{wanted} is on record but without an onset or recorded date, so its "
            f"duration (at least {min_days} days) cannot be established.",
            evidence,
        )
    first = min(dated)
    held = days_between(first, ctx.on)
    if held >= min_days:
        return Finding(
            State.MET,
            f"On record: {_found(current)}; {held} days (at least {min_days} "
            f"required).{note}",
            evidence,
        )
    return Finding(
        State.NOT_MET,
        f"{wanted} since {first.isoformat()} is only {held} days old; at least "
        f"{min_days} days are required.{note}",
        evidence,
    )


class ConditionAbsentParams(Schema):
    any_of = fields.List(
        fields.String(), required=True, validate=validate.Length(min=1)
    )
    unless_any_of = fields.List(fields.String(), load_default=None)
    # A condition whose code names another spine region than the order's is not
    # counted against (nor, in unless_any_of, for) the order.
    same_region = fields.Boolean(load_default=False)


@register_kind(
    "condition-absent",
    ConditionAbsentParams,
    valuesets=("any_of", "unless_any_of"),
    data=(DataCategory.CONDITIONS,),
)
def condition_absent(params: dict, ctx: Context) -> Finding:
    """Met when no current condition from the value sets is on record.

    Absence is read only from a record that holds coded conditions: an empty
    problem list (null or empty prefetch) makes the criterion not documented, so
    neither an exclusion nor a requirement is ever met by missing data.
    """
    if missing := unavailable(ctx, DataCategory.CONDITIONS):
        return missing
    unwanted = _titles(params["any_of"])
    found = match_conditions(ctx, params["any_of"])
    current, elsewhere = _by_region(ctx, params, params["any_of"], found.current)
    note = ignored_note(found.ignored)
    if current:
        evidence = tuple(condition_evidence(c) for c in current)
        overriding, _ = _current(ctx, params, "unless_any_of")
        if overriding:
            return Finding(
                State.MET,
                f"{_found(current)} is on record, but so is "
                f"{_found(overriding)}, taken as the source of the pain.",
                evidence + tuple(condition_evidence(c) for c in overriding),
            )
        return Finding(State.NOT_MET, f"On record: {_found(current)}.{note}", evidence)
    if elsewhere:
        return Finding(
            State.MET,
            f"No current {unwanted} on record for the "
            f"{REGION_NAMES[ctx.code.region]}; {_found(elsewhere)} concerns "
            f"another region.{note}",
            tuple(condition_evidence(c, "other region") for c in elsewhere),
        )

    if not holds_coded_conditions(ctx):
        return Finding(
            State.NOT_DOCUMENTED,
            "The record holds no coded conditions, so the absence of "
            f"{unwanted} cannot be confirmed.{_text_only_note(ctx)}",
        )
    return Finding(State.MET, f"No current {unwanted} on record.{note}")
