"""Criterion kinds about sessions: frequency edits, series, same-day and recent care."""

from __future__ import annotations

import logging
from datetime import date, timedelta

from marshmallow import Schema, fields, validate

from cds_service.fhir_dates import parse_date
from cds_service.guideline.criteria import (
    Context,
    Finding,
    register_kind,
    unavailable,
    usable_procedures,
)
from cds_service.guideline.kinds.procedures import proc_evidence
from cds_service.model import DataCategory, Evidence, Order, State

logger = logging.getLogger(__name__)


def service_date(order: Order, default: date) -> date:
    """The date the order is for: occurrence[x], else `default` (the request date)."""
    res = order.resource if isinstance(order.resource, dict) else {}
    period = res.get("occurrencePeriod")
    timing = res.get("occurrenceTiming")
    events = timing.get("event") if isinstance(timing, dict) else None
    for value in (
        res.get("occurrenceDateTime"),
        period.get("start") if isinstance(period, dict) else None,
        events[0] if isinstance(events, list) and events else None,
    ):
        found = parse_date(value)
        if found:
            return found
    return default


def sessions_ordered(order: Order) -> int:
    """How many sessions one order asks for (occurrenceTiming count or events).

    `quantity` is left out: for add-on codes it counts levels or units on one day,
    not sessions.
    """
    res = order.resource if isinstance(order.resource, dict) else {}
    counts = [1]
    timing = res.get("occurrenceTiming")
    if isinstance(timing, dict):
        repeat = timing.get("repeat")
        if isinstance(repeat, dict) and isinstance(repeat.get("count"), int):
            counts.append(repeat["count"])
        if isinstance(timing.get("event"), list):
            counts.append(len(timing["event"]))
    return max(counts)


def _family(ctx: Context, order: Order) -> str | None:
    for coding in order.codings:
        code = ctx.guideline.procedure_code(coding)
        if code is not None:
            return code.rule_set
    return None


def _draft_evidence(order: Order, on: date | None = None) -> Evidence:
    label = order.text or ", ".join(c.code for c in order.codings)
    return Evidence(f"Draft order {label}".strip(), order.reference, on)


# --- "billed more than N times in D days" ---------------------------------------------


class ServiceDatesLimitParams(Schema):
    procedures = fields.String(required=True)
    max_count = fields.Integer(required=True, validate=validate.Range(min=1))
    window_days = fields.Integer(required=True, validate=validate.Range(min=1))


@register_kind(
    "service-dates-limit",
    ServiceDatesLimitParams,
    valuesets=("procedures",),
    data=(DataCategory.PROCEDURES,),
)
def service_dates_limit(params: dict, ctx: Context) -> Finding:
    """Not met when this order would make more than `max_count` dates of service.

    The window is the `window_days` days ending on this order's date of service.
    Dates come from the procedure history and from every draft order of the set
    (dated by its occurrence, else the request date); one date counts once however
    many lines it holds; an order for several sessions counts each.
    """
    vs = params["procedures"]
    day = service_date(ctx.order, ctx.on)
    start = day - timedelta(days=params["window_days"] - 1)
    dates: dict[date, Evidence] = {}
    extra = sessions_ordered(ctx.order) - 1
    for order in ctx.orders:
        if order is ctx.order or not vs.match(order.codings):
            continue
        when = service_date(order, ctx.on)
        if start <= when <= day:
            dates.setdefault(when, _draft_evidence(order, when))
            extra += sessions_ordered(order) - 1
    history_missing = DataCategory.PROCEDURES in ctx.record.unavailable
    if not history_missing:
        for proc in usable_procedures(ctx):
            if (
                proc.performed
                and start <= proc.performed <= day
                and vs.match(proc.codings)
            ):
                dates.setdefault(proc.performed, proc_evidence(proc))
    dates.pop(day, None)
    count = len(dates) + 1 + extra
    evidence = tuple(e for _, e in sorted(dates.items()))
    summary = (
        f"{count} date(s) of {vs.title} from {start.isoformat()} to {day.isoformat()} "
        f"counting this order; more than {params['max_count']} in "
        f"{params['window_days']} days is denied."
    )
    if count > params["max_count"]:
        return Finding(State.NOT_MET, summary, evidence)
    if history_missing:
        return unavailable(ctx, DataCategory.PROCEDURES)
    return Finding(State.MET, summary, evidence)


# --- a series ordered in advance ------------------------------------------------------


class OrderedSessionsParams(Schema):
    max_sessions = fields.Integer(load_default=1, validate=validate.Range(min=1))


@register_kind("ordered-sessions", OrderedSessionsParams)
def ordered_sessions(params: dict, ctx: Context) -> Finding:
    """Not met when one request books more sessions of this procedure than allowed.

    Sessions are the order's own count (occurrenceTiming) plus the other
    draft orders of the same guideline section for other dates of service.
    """
    family = ctx.code.rule_set
    day = service_date(ctx.order, ctx.on)
    count = sessions_ordered(ctx.order)
    evidence = [_draft_evidence(ctx.order, day)] if count > 1 else []
    days = {day}
    for order in ctx.orders:
        if order is ctx.order or _family(ctx, order) != family:
            continue
        when = service_date(order, ctx.on)
        if when not in days:
            days.add(when)
            count += sessions_ordered(order)
            evidence.append(_draft_evidence(order, when))
    if count > params["max_sessions"]:
        return Finding(
            State.NOT_MET,
            f"{count} sessions of {ctx.code.code} are ordered in one request: a series "
            "booked in advance.",
            tuple(evidence),
        )
    return Finding(State.MET, "A single session is ordered.")


# --- other procedures on the same day -------------------------------------------------


class SameDayProcedureParams(Schema):
    procedures = fields.String(required=True)
    what = fields.String(required=True)


@register_kind(
    "same-day-procedure",
    SameDayProcedureParams,
    valuesets=("procedures",),
    data=(DataCategory.PROCEDURES,),
)
def same_day_procedure(params: dict, ctx: Context) -> Finding:
    """Met when a procedure of the set is ordered with this one or done that day."""
    vs = params["procedures"]
    day = service_date(ctx.order, ctx.on)
    found = [
        _draft_evidence(order, day)
        for order in ctx.orders
        if order is not ctx.order
        and vs.match(order.codings)
        and service_date(order, ctx.on) == day
    ]
    if DataCategory.PROCEDURES not in ctx.record.unavailable:
        found += [
            proc_evidence(proc, "same day")
            for proc in usable_procedures(ctx)
            if proc.performed == day and vs.match(proc.codings)
        ]
    if found:
        return Finding(
            State.MET, f"{params['what']} on {day.isoformat()}.", tuple(found)
        )
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    return Finding(State.NOT_MET, f"No {params['what']} on {day.isoformat()}.")


class GuidancePairingParams(Schema):
    pass


@register_kind(
    "guidance-pairing", GuidancePairingParams, data=(DataCategory.PROCEDURES,)
)
def guidance_pairing(params: dict, ctx: Context) -> Finding:
    """Met when imaging guidance goes with a guideline procedure whose code lacks it.

    Not met when every guideline procedure it goes with already includes guidance
    in its descriptor; not documented when it goes with no guideline procedure.
    """
    day = service_date(ctx.order, ctx.on)
    paired = []
    for order in ctx.orders:
        if order is ctx.order or service_date(order, ctx.on) != day:
            continue
        for coding in order.codings:
            code = ctx.guideline.procedure_code(coding)
            if code is not None and code.rule_set != ctx.code.rule_set:
                paired.append((code, _draft_evidence(order, day)))
                break
    if DataCategory.PROCEDURES not in ctx.record.unavailable:
        for proc in usable_procedures(ctx):
            if proc.performed != day:
                continue
            for coding in proc.codings:
                code = ctx.guideline.procedure_code(coding)
                if code is not None and code.rule_set != ctx.code.rule_set:
                    paired.append((code, proc_evidence(proc, "same day")))
                    break
    evidence = tuple(e for _, e in paired)
    blind = [c.code for c, _ in paired if not c.image_guided]
    if blind:
        return Finding(
            State.MET,
            f"Goes with {', '.join(blind)}, whose code does not include imaging "
            "guidance.",
            evidence,
        )
    if paired:
        codes = ", ".join(c.code for c, _ in paired)
        return Finding(
            State.NOT_MET,
            f"Imaging guidance is already part of {codes}; reported separately it "
            "duplicates that code.",
            evidence,
        )
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    return Finding(
        State.NOT_DOCUMENTED,
        f"No guideline procedure is ordered or on record for {day.isoformat()} to go "
        "with this imaging guidance.",
    )


# --- a qualifying procedure shortly before --------------------------------------------


class RecentProcedureParams(Schema):
    procedures = fields.List(
        fields.String(), required=True, validate=validate.Length(min=1)
    )
    days_before = fields.Integer(required=True, validate=validate.Range(min=0))
    what = fields.String(required=True)


@register_kind(
    "recent-procedure",
    RecentProcedureParams,
    valuesets=("procedures",),
    data=(DataCategory.PROCEDURES,),
)
def recent_procedure(params: dict, ctx: Context) -> Finding:
    """Met by a procedure of the sets in the `days_before` days up to the order's date,
    or ordered in the same request; not met when the only ones are older."""
    sets = params["procedures"]
    day = service_date(ctx.order, ctx.on)
    start = day - timedelta(days=params["days_before"])
    for order in ctx.orders:
        if order is not ctx.order and any(vs.match(order.codings) for vs in sets):
            return Finding(
                State.MET,
                f"{params['what']} is ordered in the same request.",
                (_draft_evidence(order),),
            )
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    matching = sorted(
        (
            p
            for p in usable_procedures(ctx)
            if p.performed
            and p.performed <= day
            and any(vs.match(p.codings) for vs in sets)
        ),
        key=lambda p: p.performed,
    )
    recent = [p for p in matching if p.performed >= start]
    # `what` is written for mid-sentence use ("a qualifying major operation").
    what = params["what"][:1].upper() + params["what"][1:]
    if recent:
        last = recent[-1]
        return Finding(
            State.MET,
            f"{what} on {last.performed.isoformat()}, "
            f"{(day - last.performed).days} day(s) before.",
            (proc_evidence(last),),
        )
    if matching:
        last = matching[-1]
        return Finding(
            State.NOT_MET,
            f"{what} is on record, the latest on {last.performed.isoformat()}, "
            "more than "
            f"{params['days_before']} days before {day.isoformat()}.",
            (proc_evidence(last),),
        )
    return Finding(State.NOT_DOCUMENTED, f"{what} is not on record.")


# --- routine, periodic use ------------------------------------------------------------


class RoutineUseParams(Schema):
    procedures = fields.String(required=True)
    periods = fields.Integer(required=True, validate=validate.Range(min=2))
    period_days = fields.Integer(required=True, validate=validate.Range(min=1))


@register_kind(
    "routine-use",
    RoutineUseParams,
    valuesets=("procedures",),
    data=(DataCategory.PROCEDURES,),
)
def routine_use(params: dict, ctx: Context) -> Finding:
    """Not met when sessions recur in each of `periods` back-to-back periods before."""
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    vs = params["procedures"]
    day = service_date(ctx.order, ctx.on)
    size, periods = params["period_days"], params["periods"]
    by_day = {
        p.performed: p
        for p in usable_procedures(ctx)
        if p.performed and p.performed < day and vs.match(p.codings)
    }
    sessions = sorted(by_day)
    filled = 0
    for i in range(periods):
        end = day - timedelta(days=i * size)
        begin = end - timedelta(days=size)
        if any(begin <= s < end for s in sessions):
            filled += 1
    since = day - timedelta(days=periods * size)
    evidence = tuple(proc_evidence(by_day[s]) for s in sessions if s >= since)
    text = (
        f"{vs.title} sessions in {filled} of the last {periods} periods of {size} days "
        f"before {day.isoformat()}"
    )
    if filled == periods:
        return Finding(
            State.NOT_MET,
            f"{text}: injections on a regular, continuous basis.",
            evidence,
        )
    return Finding(State.MET, f"{text}; not a routine, continuous pattern.", evidence)
