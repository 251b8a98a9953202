"""Criterion kinds that read what the order itself says: injectate, wording, reasons."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import (
    Context,
    Finding,
    condition_evidence,
    condition_label,
    holds_coded_conditions,
    match_conditions,
    register_kind,
    unavailable,
)
from cds_service.guideline.valuesets import match_any, normalize_system
from cds_service.model import Coding, DataCategory, Evidence, Order, State

logger = logging.getLogger(__name__)


# --- reading the order resource -------------------------------------------------------


def _codings(concept: object) -> tuple[Coding, ...]:
    if not isinstance(concept, dict):
        return ()
    raw = concept.get("coding")
    raw = [raw] if isinstance(raw, dict) else raw
    out = []
    for item in raw if isinstance(raw, list) else ():
        if isinstance(item, dict) and isinstance(item.get("code"), str):
            system = normalize_system(item.get("system")) or str(item.get("system"))
            display = item.get("display")
            out.append(
                Coding(
                    system,
                    item["code"].strip(),
                    display if isinstance(display, str) else None,
                )
            )
    return tuple(out)


def _concepts(value: object) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


@dataclass(frozen=True)
class Statement:
    """One thing an order says: a coded concept or a free-text line, and where."""

    where: str
    codings: tuple[Coding, ...]
    text: str | None


def order_statements(order: Order) -> list[Statement]:
    """What the order says about itself: code text, orderDetail, notes, instructions.

    A MedicationRequest draft contributes its medication; other resources the code
    text and displays only.
    """
    res = order.resource if isinstance(order.resource, dict) else {}
    out = []
    if order.resource_type == "MedicationRequest":
        concept = res.get("medicationCodeableConcept")
        text = concept.get("text") if isinstance(concept, dict) else None
        if text is None and isinstance(res.get("medicationReference"), dict):
            text = res["medicationReference"].get("display")
        out.append(
            Statement(
                "medication order",
                order.codings,
                text if isinstance(text, str) else order.text,
            )
        )
    else:
        out.append(Statement("order", order.codings, order.text))
        for concept in _concepts(res.get("orderDetail")):
            text = concept.get("text")
            out.append(
                Statement(
                    "orderDetail",
                    _codings(concept),
                    text if isinstance(text, str) else None,
                )
            )
    for note in _concepts(res.get("note")):
        if isinstance(note.get("text"), str):
            out.append(Statement("note", (), note["text"]))
    instruction = res.get("patientInstruction")
    if isinstance(instruction, str):
        out.append(Statement("patientInstruction", (), instruction))
    return out


def order_reasons(order: Order) -> list[tuple[Coding, ...]]:
    """The coded reasons of an order (`reasonCode`), one tuple of codings each."""
    res = order.resource if isinstance(order.resource, dict) else {}
    return [c for c in (_codings(x) for x in _concepts(res.get("reasonCode"))) if c]


def order_reason_references(order: Order) -> list[str]:
    res = order.resource if isinstance(order.resource, dict) else {}
    out = []
    for ref in _concepts(res.get("reasonReference")):
        if isinstance(ref.get("reference"), str):
            out.append(ref["reference"])
    return out


def _label(order: Order) -> str:
    return order.text or ", ".join(c.code for c in order.codings) or order.reference


# --- injectate ------------------------------------------------------------------------


class AgentSchema(Schema):
    valueset = fields.String(required=True)
    role = fields.String(
        required=True, validate=validate.OneOf(["allowed", "diluent", "not-allowed"])
    )


class InjectateParams(Schema):
    agents = fields.List(
        fields.Nested(AgentSchema), required=True, validate=validate.Length(min=1)
    )
    # "allowed-only": every agent must be allowed (diluents only beside one);
    # "not-only": not met when every agent is in `only_of` (e.g. saline, botanical).
    mode = fields.String(
        load_default="allowed-only",
        validate=validate.OneOf(["allowed-only", "not-only"]),
    )
    only_of = fields.List(fields.String(), load_default=None)
    companion_medications = fields.Boolean(load_default=True)


@dataclass(frozen=True)
class Agent:
    title: str
    role: str
    valueset_id: str
    evidence: Evidence


def read_injectate(params: dict, ctx: Context) -> list[Agent]:
    """The agents named by the order and by medication orders in the same request."""
    sources: list[tuple[Order, Statement]] = [
        (ctx.order, s) for s in order_statements(ctx.order)
    ]
    if params.get("companion_medications", True):
        for other in ctx.orders:
            if other is not ctx.order and other.resource_type == "MedicationRequest":
                sources += [(other, s) for s in order_statements(other)]
    found: dict[tuple[str, str], Agent] = {}
    for order, statement in sources:
        for agent in params["agents"]:
            vs = agent["valueset"]
            if vs.match(statement.codings, statement.text):
                key = (vs.id, order.reference + statement.where)
                found.setdefault(
                    key,
                    Agent(
                        vs.title,
                        agent["role"],
                        vs.id,
                        Evidence(
                            f"{vs.title} in the {statement.where}: "
                            f"{statement.text or _label(order)}",
                            order.reference,
                        ),
                    ),
                )
    return list(found.values())


def _titles(agents: Iterable[Agent]) -> str:
    return ", ".join(sorted({a.title for a in agents}))


@register_kind(
    "injectate",
    InjectateParams,
    valuesets=("agents.valueset", "only_of"),
)
def injectate(params: dict, ctx: Context) -> Finding:
    """Judges the injected agents named by the order or a companion medication order."""
    agents = read_injectate(params, ctx)
    evidence = tuple(a.evidence for a in agents)
    if not agents:
        return Finding(
            State.NOT_DOCUMENTED,
            "The injectate is not stated: neither the order (orderDetail, note) nor a "
            "medication order in the same request names the agent.",
        )
    if params["mode"] == "not-only":
        only = {vs.id for vs in params.get("only_of") or ()}
        if all(a.valueset_id in only for a in agents):
            return Finding(
                State.NOT_MET,
                f"The injectate consists only of {_titles(agents)}.",
                evidence,
            )
        return Finding(
            State.MET, f"The injectate is not only {_titles_of(params)}.", evidence
        )
    barred = [a for a in agents if a.role == "not-allowed"]
    allowed = [a for a in agents if a.role == "allowed"]
    if barred:
        return Finding(
            State.NOT_MET,
            f"The injectate includes {_titles(barred)}, which is not a local "
            "anaesthetic or corticosteroid.",
            evidence,
        )
    if not allowed:
        return Finding(
            State.NOT_MET,
            f"The injectate is {_titles(agents)} without a local anaesthetic or "
            "corticosteroid.",
            evidence,
        )
    return Finding(State.MET, f"The injectate is {_titles(agents)}.", evidence)


def _titles_of(params: dict) -> str:
    return " or ".join(vs.title for vs in params.get("only_of") or ())


class InjectateStatedParams(Schema):
    agents = fields.List(
        fields.Nested(AgentSchema), required=True, validate=validate.Length(min=1)
    )
    companion_medications = fields.Boolean(load_default=True)


@register_kind(
    "injectate-stated", InjectateStatedParams, valuesets=("agents.valueset",)
)
def injectate_stated(params: dict, ctx: Context) -> Finding:
    """Met when the order or a companion medication order names an injected agent."""
    agents = read_injectate(params, ctx)
    if agents:
        return Finding(
            State.MET,
            f"The injectate is stated: {_titles(agents)}.",
            tuple(a.evidence for a in agents),
        )
    return Finding(State.NOT_DOCUMENTED, "The injectate is not stated.")


# --- wording of the order -------------------------------------------------------------


class OrderMentionsParams(Schema):
    terms = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    what = fields.String(required=True)
    agents = fields.List(fields.String(), load_default=None)


@register_kind("order-mentions", OrderMentionsParams, valuesets=("agents",))
def order_mentions(params: dict, ctx: Context) -> Finding:
    """Not met when the order's wording (or a named agent) shows the barred service.

    Terms are matched as whole words, case-insensitively, in the code text and
    displays, orderDetail, notes and instructions of the order; `agents` value sets
    are matched against the same statements and companion medication orders.
    """
    pattern = re.compile(
        r"\b(?:" + "|".join(re.escape(t.strip()) for t in params["terms"]) + r")\b",
        re.IGNORECASE,
    )
    hits = []
    for statement in order_statements(ctx.order):
        texts = [statement.text] + [c.display for c in statement.codings]
        for text in texts:
            if text and (match := pattern.search(text)):
                hits.append(
                    Evidence(
                        f"The {statement.where} says \u201c{match.group(0)}\u201d: "
                        + text,
                        ctx.order.reference,
                    )
                )
                break
    for vs in params.get("agents") or ():
        for other in ctx.orders:
            if other is not ctx.order and other.resource_type != "MedicationRequest":
                continue
            for statement in order_statements(other):
                if vs.match(statement.codings, statement.text):
                    hits.append(
                        Evidence(
                            f"{vs.title} in the {statement.where}: "
                            f"{statement.text or _label(other)}",
                            other.reference,
                        )
                    )
    if hits:
        return Finding(
            State.NOT_MET, f"The order describes {params['what']}.", tuple(hits)
        )
    return Finding(State.MET, f"Nothing in the order describes {params['what']}.")


# --- what the order is for ------------------------------------------------------------


class NotForIndicationParams(Schema):
    any_of = fields.List(
        fields.String(), required=True, validate=validate.Length(min=1)
    )
    unless_any_of = fields.List(fields.String(), load_default=None)


def _reasons_given(ctx: Context) -> tuple[tuple, tuple]:
    """The order's coded reasons (reasonCode, and the codings of the Conditions it
    references) and those Conditions; kept for the call, as every indication rule
    of the order asks."""
    # Orders hold their resource, so are not hashable; each lives through the call.
    key = ("reasons", id(ctx.order))
    if key in ctx.cache:
        return ctx.cache[key]
    reasons = order_reasons(ctx.order)
    linked = []
    references = order_reason_references(ctx.order)
    if references:
        by_ref = {c.reference: c for c in ctx.record.conditions}
        for ref in references:
            cond = by_ref.get(ref)
            if cond is not None and cond.codings:
                reasons.append(cond.codings)
                linked.append(cond)
    ctx.cache[key] = found = (tuple(reasons), tuple(linked))
    return found


@register_kind(
    "not-for-indication",
    NotForIndicationParams,
    valuesets=("any_of", "unless_any_of"),
    data=(DataCategory.CONDITIONS,),
)
def not_for_indication(params: dict, ctx: Context) -> Finding:
    """Not met when the order is for an excluded indication.

    The order's own reasons (`reasonCode`, `reasonReference` to a Condition) decide
    when present: not met when every reason is excluded. Without them the problem
    list decides: not met when a current excluded condition is on record and none
    of `unless_any_of` (another indication, taken as the reason) is; not
    documented when the record holds no coded conditions at all.
    """
    excluded = params["any_of"]
    wanted = " or ".join(vs.title for vs in excluded)
    reasons, linked = _reasons_given(ctx)
    if reasons:
        hits = [r for r in reasons if match_any(excluded, r)]
        shown = "; ".join(", ".join(c.display or c.code for c in r) for r in reasons)
        evidence = tuple(condition_evidence(c) for c in linked) or (
            Evidence(f"Order reason: {shown}", ctx.order.reference),
        )
        if hits and len(hits) == len(reasons):
            return Finding(
                State.NOT_MET, f"The order is for {wanted} ({shown}).", evidence
            )
        return Finding(
            State.MET,
            f"The order's reason ({shown}) is not only {wanted}.",
            evidence,
        )

    if missing := unavailable(ctx, DataCategory.CONDITIONS):
        return missing
    found = match_conditions(ctx, excluded).current
    if not found and not holds_coded_conditions(ctx):
        return Finding(
            State.NOT_DOCUMENTED,
            "The order gives no reason and the record holds no coded conditions, "
            f"so it cannot be confirmed that the order is not for {wanted}.",
        )
    if not found:
        return Finding(State.MET, f"No current {wanted} on record.")
    evidence = tuple(condition_evidence(c) for c in found)
    others = match_conditions(ctx, params.get("unless_any_of") or ()).current
    names = "; ".join(condition_label(c) for c in found)
    if others:
        return Finding(
            State.MET,
            f"{names} is on record, but so is "
            f"{'; '.join(condition_label(c) for c in others)}, taken as the reason "
            "for the order.",
            evidence + tuple(condition_evidence(c) for c in others),
        )
    return Finding(
        State.NOT_MET,
        f"The order gives no reason and the only matching indication on record is "
        f"{names} ({wanted}).",
        evidence,
    )


class CodeIsParams(Schema):
    codes = fields.List(fields.String(), required=True, validate=validate.Length(min=1))


@register_kind("code-is", CodeIsParams)
def code_is(params: dict, ctx: Context) -> Finding:
    """Met when the ordered code is one of `codes` (for exceptions named by code)."""
    listed = ", ".join(params["codes"])
    if ctx.code.code in params["codes"]:
        return Finding(State.MET, f"{ctx.code.code} is one of {listed}.")
    return Finding(State.NOT_MET, f"{ctx.code.code} is not one of {listed}.")


class RecentConditionParams(Schema):
    any_of = fields.List(
        fields.String(), required=True, validate=validate.Length(min=1)
    )
    within_days = fields.Integer(required=True, validate=validate.Range(min=0))


@register_kind(
    "recent-condition",
    RecentConditionParams,
    valuesets=("any_of",),
    data=(DataCategory.CONDITIONS,),
)
def recent_condition(params: dict, ctx: Context) -> Finding:
    """Met by a current condition of the sets that began within `within_days`.

    Not met when the matching conditions all began earlier (an acute setting that
    has passed); not documented when none is on record or none is dated.
    """
    if missing := unavailable(ctx, DataCategory.CONDITIONS):
        return missing
    wanted = " or ".join(vs.title for vs in params["any_of"])
    found = match_conditions(ctx, params["any_of"]).current
    if not found:
        return Finding(State.NOT_DOCUMENTED, f"No current {wanted} on record.")
    evidence = tuple(condition_evidence(c) for c in found)
    dated = [c for c in found if c.first_evidence]
    if not dated:
        return Finding(
            State.NOT_DOCUMENTED,
            f"{wanted} is on record without a date, so whether it is recent cannot be "
            "told.",
            evidence,
        )
    latest = max(c.first_evidence for c in dated)
    age = (ctx.on - latest).days
    if age <= params["within_days"]:
        return Finding(
            State.MET,
            f"{wanted} since {latest.isoformat()} ({age} days; within "
            f"{params['within_days']}).",
            evidence,
        )
    return Finding(
        State.NOT_MET,
        f"{wanted} began {latest.isoformat()}, {age} days ago; an acute setting means "
        f"within {params['within_days']} days.",
        evidence,
    )
