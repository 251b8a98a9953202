"""Criterion kinds that read procedure history and the other draft orders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta

from dateutil.relativedelta import relativedelta
from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import (
    Context,
    Finding,
    register_kind,
    unavailable,
    usable_procedures,
)
from cds_service.guideline.kinds.observations import Score, read_scores, score_evidence
from cds_service.guideline.valuesets import ValueSet
from cds_service.model import DataCategory, Evidence, ProcedureFact, State

logger = logging.getLogger(__name__)

FAILURE_WORDS = (
    "no relief",
    "not effective",
    "ineffective",
    "no improvement",
    "failed",
)


def _proc_label(proc: ProcedureFact) -> str:
    if proc.text:
        return proc.text
    return next((c.display or c.code for c in proc.codings), proc.reference)


def proc_evidence(proc: ProcedureFact, note: str = "") -> Evidence:
    return Evidence(
        _proc_label(proc) + (f" ({note})" if note else ""),
        proc.reference,
        proc.performed,
        ", ".join(c.code for c in proc.codings) or None,
    )


def region_of(ctx: Context, codings) -> str | None:
    for coding in codings:
        code = ctx.guideline.procedure_code(coding)
        if code is not None:
            return code.region
    return None


def prior_procedures(
    ctx: Context, valueset: ValueSet, *, per_region: bool, include_today: bool = False
) -> list[ProcedureFact]:
    """Dated procedures from the set before the evaluation date, oldest first."""
    region = ctx.code.region if per_region else None
    key = ("procedures", valueset.id, per_region, region, include_today)
    if key in ctx.cache:
        return ctx.cache[key]
    out = []
    for proc in usable_procedures(ctx):
        if proc.performed is None or not valueset.match(proc.codings):
            continue
        if proc.performed > ctx.on or (proc.performed == ctx.on and not include_today):
            continue
        if per_region and region_of(ctx, proc.codings) != ctx.code.region:
            continue
        out.append(proc)
    out.sort(key=lambda p: p.performed)
    ctx.cache[key] = out
    return out


def _window_start(on: date, days: int | None, months: int | None) -> date:
    if months:
        return on - relativedelta(months=months)
    return on - timedelta(days=days or 0)


# --- relief from pain scores ----------------------------------------------------------


@dataclass(frozen=True)
class Relief:
    percent: float | None
    pre: Score | None
    post: Score | None
    reported_failure: bool = False

    def evidence(self) -> tuple[Evidence, ...]:
        return tuple(score_evidence(s) for s in (self.pre, self.post) if s)


def relief_after(
    proc: ProcedureFact,
    scores: list[Score],
    *,
    pre_days: int,
    post_from_days: int,
    post_to_days: int,
) -> Relief:
    """Percent relief: pre = last score before the procedure, post = first after.

    Scores carry dates only. A score on the procedure day is a post-procedure score,
    unless no earlier pre score exists and the day holds two or more scores: then the
    highest is read as the pre score and the lowest as the post score.
    """
    day = proc.performed
    since = day - timedelta(days=pre_days)
    before = [s for s in scores if since <= s.on < day]
    start, end = (
        day + timedelta(days=post_from_days),
        day + timedelta(days=post_to_days),
    )
    after = [s for s in scores if start <= s.on <= end]
    pre = before[-1] if before else None
    post = after[0] if after else None
    if pre is None and post_from_days == 0:
        same_day = [s for s in scores if s.on == day]
        if len(same_day) >= 2:
            pre = max(same_day, key=lambda s: s.value)
            post = min(same_day, key=lambda s: s.value)
    text = " ".join(
        [proc.outcome_text or ""] + [c.display or "" for c in proc.outcome_codings]
    ).lower()
    failure = any(word in text for word in FAILURE_WORDS)
    if pre is None or post is None or pre.value <= 0:
        return Relief(None, pre, post, failure)
    percent = max(0.0, (pre.value - post.value) / pre.value * 100)
    return Relief(percent, pre, post, failure)


class ReliefCheckSchema(Schema):
    min_relief_percent = fields.Float(required=True, validate=validate.Range(0, 100))
    post_from_days = fields.Integer(load_default=0, validate=validate.Range(min=0))
    post_to_days = fields.Integer(load_default=1, validate=validate.Range(min=0))
    label = fields.String(load_default="relief")
    # "each": every procedure judged (see `evaluate`); "latest": the last one only,
    # for a check such as lasting relief that later procedures would mask.
    of = fields.String(load_default="each", validate=validate.OneOf(["each", "latest"]))


class PriorResponseParams(Schema):
    procedures = fields.String(required=True)
    pain_codes = fields.String(required=True)
    per_region = fields.Boolean(load_default=False)
    lookback_days = fields.Integer(load_default=730, validate=validate.Range(min=1))
    pre_days = fields.Integer(load_default=30, validate=validate.Range(min=0))
    min_procedures = fields.Integer(load_default=1, validate=validate.Range(min=1))
    evaluate = fields.String(
        load_default="latest", validate=validate.OneOf(["latest", "each"])
    )
    checks = fields.List(
        fields.Nested(ReliefCheckSchema), required=True, validate=validate.Length(min=1)
    )
    if_none = fields.String(
        load_default="not-documented",
        validate=validate.OneOf(["not-documented", "met"]),
    )


@register_kind(
    "prior-response",
    PriorResponseParams,
    valuesets=("procedures", "pain_codes"),
    data=(DataCategory.PROCEDURES, DataCategory.OBSERVATIONS),
)
def prior_response(params: dict, ctx: Context) -> Finding:
    """Met when prior procedures gave the required relief, computed from pain scores."""
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    since = ctx.on - timedelta(days=params["lookback_days"])
    priors = [
        p
        for p in prior_procedures(
            ctx, params["procedures"], per_region=params["per_region"]
        )
        if p.performed >= since
    ]
    what = params["procedures"].title
    if len(priors) < params["min_procedures"]:
        state = State.MET if params["if_none"] == "met" else State.NOT_DOCUMENTED
        return Finding(
            state,
            f"{len(priors)} prior {what} on record; {params['min_procedures']} "
            "needed to judge the response.",
            tuple(proc_evidence(p) for p in priors),
        )
    if missing := unavailable(ctx, DataCategory.OBSERVATIONS):
        return missing

    scores = read_scores(ctx, params["pain_codes"], scale_max=10)
    judged = (
        priors[-params["min_procedures"] :]
        if params["evaluate"] == "each"
        else priors[-1:]
    )
    evidence: list[Evidence] = []
    unknown, failed, passed = [], [], []
    for proc in judged:
        evidence.append(proc_evidence(proc))
        for check in params["checks"]:
            if check["of"] == "latest" and proc is not judged[-1]:
                continue
            relief = relief_after(
                proc,
                scores,
                pre_days=params["pre_days"],
                post_from_days=check["post_from_days"],
                post_to_days=check["post_to_days"],
            )
            evidence.extend(relief.evidence())
            name = f"{check['label']} after the {proc.performed.isoformat()} procedure"
            if relief.percent is None:
                if relief.reported_failure:
                    failed.append(f"{name}: recorded as not effective")
                else:
                    unknown.append(name)
            elif relief.percent >= check["min_relief_percent"]:
                passed.append(f"{name} {relief.percent:.0f}%")
            else:
                failed.append(
                    f"{name} {relief.percent:.0f}% (at least "
                    f"{check['min_relief_percent']:g}% required)"
                )
    evidence_t = tuple(dict.fromkeys(evidence))
    if failed:
        return Finding(
            State.NOT_MET, "Insufficient relief: " + "; ".join(failed) + ".", evidence_t
        )
    if unknown:
        return Finding(
            State.NOT_DOCUMENTED,
            "Pain scores before and after the procedure are needed for: "
            + "; ".join(unknown)
            + ".",
            evidence_t,
        )
    return Finding(
        State.MET, "Relief documented: " + "; ".join(passed) + ".", evidence_t
    )


class ProcedureHistoryParams(Schema):
    procedures = fields.String(required=True)
    min_count = fields.Integer(load_default=1, validate=validate.Range(min=1))
    per_region = fields.Boolean(load_default=False)
    window_days = fields.Integer(load_default=None, validate=validate.Range(min=1))


@register_kind(
    "procedure-history",
    ProcedureHistoryParams,
    valuesets=("procedures",),
    data=(DataCategory.PROCEDURES,),
)
def procedure_history(params: dict, ctx: Context) -> Finding:
    """Met when at least `min_count` prior sessions (distinct days) are on record."""
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    priors = prior_procedures(
        ctx, params["procedures"], per_region=params["per_region"]
    )
    if params["window_days"]:
        since = ctx.on - timedelta(days=params["window_days"])
        priors = [p for p in priors if p.performed >= since]
    days = {p.performed for p in priors}
    state = State.MET if len(days) >= params["min_count"] else State.NOT_MET
    return Finding(
        state,
        f"{len(days)} prior {params['procedures'].title} session(s) on record.",
        tuple(proc_evidence(p) for p in priors),
    )


class FrequencyLimitParams(Schema):
    procedures = fields.String(required=True)
    max_count = fields.Integer(required=True, validate=validate.Range(min=1))
    window_days = fields.Integer(load_default=None, validate=validate.Range(min=1))
    window_months = fields.Integer(load_default=None, validate=validate.Range(min=1))
    per_region = fields.Boolean(load_default=True)
    unit = fields.String(
        load_default="session", validate=validate.OneOf(["session", "line"])
    )


@register_kind(
    "frequency-limit",
    FrequencyLimitParams,
    valuesets=("procedures",),
    data=(DataCategory.PROCEDURES,),
)
def frequency_limit(params: dict, ctx: Context) -> Finding:
    """Not met when this order would exceed `max_count` in the window.

    `session` counts distinct days (add-on levels on one day are one session; this
    order is one); `line` counts every prior procedure and every draft order in the
    set, this one included.
    """
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    vs = params["procedures"]
    start = _window_start(ctx.on, params["window_days"], params["window_months"])
    window = (
        f"{params['window_months']} month(s)"
        if params["window_months"]
        else f"{params['window_days']} days"
    )
    priors = [
        p
        for p in prior_procedures(
            ctx,
            vs,
            per_region=params["per_region"],
            include_today=params["unit"] == "line",
        )
        if p.performed > start
    ]
    if params["unit"] == "session":
        count = len({p.performed for p in priors}) + 1
    else:
        drafts = [
            o
            for o in ctx.orders
            if vs.match(o.codings)
            and (
                not params["per_region"] or region_of(ctx, o.codings) == ctx.code.region
            )
        ]
        count = len(priors) + max(len(drafts), 1)
    region = f" in the {ctx.code.region} region" if params["per_region"] else ""
    evidence = tuple(proc_evidence(p) for p in priors)
    summary = (
        f"{count} {vs.title} {params['unit']}(s){region} within {window} up to "
        f"{ctx.on.isoformat()} including this order; at most "
        f"{params['max_count']} allowed."
    )
    if count > params["max_count"]:
        return Finding(State.NOT_MET, summary, evidence)
    return Finding(State.MET, summary, evidence)


class AddOnParams(Schema):
    pass


@register_kind("add-on-requires-primary", AddOnParams, data=(DataCategory.PROCEDURES,))
def add_on_requires_primary(params: dict, ctx: Context) -> Finding:
    """Met when every primary code of an add-on is ordered or done the same day."""
    primaries = ctx.code.add_on_of
    if not primaries:
        return Finding(State.MET, f"{ctx.code.code} is not an add-on code.")
    present: dict[str, Evidence] = {}
    for order in ctx.orders:
        if order is ctx.order:
            continue
        for coding in order.codings:
            if coding.code in primaries:
                present.setdefault(
                    coding.code,
                    Evidence(
                        f"Draft order {coding.code}", order.reference, order.authored
                    ),
                )
    if DataCategory.PROCEDURES not in ctx.record.unavailable:
        for proc in usable_procedures(ctx):
            if proc.performed != ctx.on:
                continue
            for coding in proc.codings:
                if coding.code in primaries:
                    present.setdefault(coding.code, proc_evidence(proc, "same day"))
    missing_codes = [c for c in primaries if c not in present]
    if not missing_codes:
        return Finding(
            State.MET,
            f"Add-on {ctx.code.code} is ordered with {', '.join(primaries)}.",
            tuple(present.values()),
        )
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    return Finding(
        State.NOT_MET,
        f"Add-on {ctx.code.code} needs {', '.join(missing_codes)} on the same day, "
        "which is neither ordered nor on record.",
        tuple(present.values()),
    )


class SameDayParams(Schema):
    families = fields.List(
        fields.String(), required=True, validate=validate.Length(min=2)
    )
    other_blocks = fields.String(load_default=None)
    paired_families = fields.List(fields.String(), load_default=None)
    paired_requires = fields.List(fields.Dict(), load_default=None)
    waivers = fields.List(fields.Dict(), load_default=None)
    documentation = fields.String(load_default=None)


@register_kind(
    "same-day-limit",
    SameDayParams,
    valuesets=("other_blocks",),
    criteria=("paired_requires", "waivers"),
    data=(DataCategory.PROCEDURES,),
)
def same_day_limit(params: dict, ctx: Context) -> Finding:
    """Met when this order is the only procedure family of the set on its day."""
    families = set(params["families"])
    other = params.get("other_blocks")

    def family(codings) -> str | None:
        for coding in codings:
            code = ctx.guideline.procedure_code(coding)
            if code is not None and code.rule_set in families:
                return code.rule_set
        if other is not None and other.match(codings):
            return "other nerve block"
        return None

    today = {family(ctx.order.codings) or ctx.code.rule_set: []}
    for order in ctx.orders:
        if order is ctx.order:
            continue
        fam = family(order.codings)
        if fam:
            today.setdefault(fam, []).append(
                Evidence(
                    f"Draft order {order.text or fam}", order.reference, order.authored
                )
            )
    if DataCategory.PROCEDURES not in ctx.record.unavailable:
        for proc in usable_procedures(ctx):
            if proc.performed == ctx.on and (fam := family(proc.codings)):
                today.setdefault(fam, []).append(proc_evidence(proc, "same day"))
    evidence = tuple(e for items in today.values() for e in items)
    if len(today) == 1:
        if missing := unavailable(ctx, DataCategory.PROCEDURES):
            return missing
        return Finding(
            State.MET,
            f"No other injection procedure on {ctx.on.isoformat()}.",
            evidence,
        )

    names = ", ".join(sorted(today))
    paired = params.get("paired_families")
    if paired and set(today) == set(paired):
        results = [ctx.evaluate(c) for c in params.get("paired_requires") or ()]
        if all(r.state is State.MET for r in results):
            return Finding(
                State.MET,
                f"{names} on the same day: prior diagnostic blocks implicate both.",
                evidence + tuple(e for r in results for e in r.evidence),
            )
    for waiver in params.get("waivers") or ():
        result = ctx.evaluate(waiver)
        if result.state is State.MET:
            return Finding(
                State.MET,
                f"{names} on the same day; exception applies: {waiver.text}.",
                evidence + result.evidence,
            )
    return Finding(
        State.NOT_DOCUMENTED,
        f"More than one injection procedure on {ctx.on.isoformat()} ({names}). "
        + (params.get("documentation") or ""),
        evidence,
    )


class RepeatBlindParams(Schema):
    prior = fields.String(required=True)
    pain_codes = fields.String(required=True)
    adequate_relief_percent = fields.Float(
        load_default=50, validate=validate.Range(0, 100)
    )
    lookback_days = fields.Integer(load_default=365, validate=validate.Range(min=1))
    pre_days = fields.Integer(load_default=30, validate=validate.Range(min=0))
    post_to_days = fields.Integer(load_default=14, validate=validate.Range(min=0))


@register_kind(
    "repeat-blind-epidural-needs-imaging",
    RepeatBlindParams,
    valuesets=("prior", "pain_codes"),
    data=(DataCategory.PROCEDURES, DataCategory.OBSERVATIONS),
)
def repeat_blind_needs_imaging(params: dict, ctx: Context) -> Finding:
    """A blind epidural after a failed or inadequate blind one is not met."""
    if ctx.code.image_guided:
        return Finding(
            State.MET, f"{ctx.code.code} is performed with imaging guidance."
        )
    if missing := unavailable(ctx, DataCategory.PROCEDURES):
        return missing
    since = ctx.on - timedelta(days=params["lookback_days"])
    priors = [
        p
        for p in prior_procedures(ctx, params["prior"], per_region=False)
        if p.performed >= since
    ]
    if not priors:
        return Finding(
            State.MET,
            "No earlier blind epidural injection on record; a first blind injection is "
            "allowed.",
        )
    last = priors[-1]
    relief = relief_after(
        last,
        read_scores(ctx, params["pain_codes"], scale_max=10),
        pre_days=params["pre_days"],
        post_from_days=0,
        post_to_days=params["post_to_days"],
    )
    evidence = (proc_evidence(last),) + relief.evidence()
    threshold = params["adequate_relief_percent"]
    if relief.percent is None and not relief.reported_failure:
        return Finding(
            State.NOT_DOCUMENTED,
            f"The response to the blind epidural of {last.performed.isoformat()} is "
            "not documented (pain scores before and after are needed).",
            evidence,
        )
    if relief.percent is not None and relief.percent >= threshold:
        return Finding(
            State.MET,
            f"The blind epidural of {last.performed.isoformat()} gave "
            f"{relief.percent:.0f}% relief.",
            evidence,
        )
    shown = "no relief recorded" if relief.percent is None else f"{relief.percent:.0f}%"
    return Finding(
        State.NOT_MET,
        f"The blind epidural of {last.performed.isoformat()} gave an inadequate "
        f"response ({shown}; {threshold:g}% expected); a repeat must be image guided.",
        evidence,
    )


class ImageGuidedParams(Schema):
    guidance = fields.String(required=True)


@register_kind("image-guided", ImageGuidedParams, valuesets=("guidance",))
def image_guided(params: dict, ctx: Context) -> Finding:
    """Met when the code includes imaging guidance or a guidance code is ordered."""
    if ctx.code.image_guided:
        return Finding(State.MET, f"{ctx.code.code} includes imaging guidance.")
    for order in ctx.orders:
        if order is not ctx.order and params["guidance"].match(order.codings):
            return Finding(
                State.MET,
                "Imaging guidance is ordered with the procedure.",
                (Evidence(f"Draft order {order.text or ''}".strip(), order.reference),),
            )
    if ctx.code.image_guided is False:
        return Finding(
            State.NOT_MET, f"{ctx.code.code} is a code without imaging guidance."
        )
    return Finding(
        State.NOT_DOCUMENTED,
        f"{ctx.code.code} does not say whether imaging guidance is used and no "
        "guidance code is ordered with it.",
    )
