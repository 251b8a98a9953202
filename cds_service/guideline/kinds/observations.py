"""Criterion kinds that read pain scores and functional measures (Observations)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta

from marshmallow import Schema, fields, validate

from cds_service.guideline.criteria import (
    Context,
    Finding,
    condition_evidence,
    match_conditions,
    register_kind,
    unavailable,
    usable_observations,
)
from cds_service.guideline.valuesets import ValueSet
from cds_service.model import DataCategory, Evidence, ObservationFact, State

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    on: date
    value: float
    reference: str
    label: str


def read_scores(
    ctx: Context, valueset: ValueSet, *, scale_max: float | None = None
) -> list[Score]:
    """Dated numeric results for the codes in `valueset`, oldest first.

    Components count too (a PEG panel carries its items as components). With
    `scale_max` (pain scores: 10), a visual analogue scale sent in millimetres is
    brought to 0-10 and values outside the scale are left out.
    """
    key = ("scores", valueset.id, scale_max)
    if key in ctx.cache:
        return ctx.cache[key]
    scores = []
    for obs in usable_observations(ctx):
        if obs.effective is None:
            continue
        if valueset.match(obs.codings) and obs.value is not None:
            value = _scaled(obs, obs.value, scale_max)
            if value is not None:
                scores.append(Score(obs.effective, value, obs.reference, _label(obs)))
        for codings, value in obs.components:
            if value is not None and valueset.match(codings):
                scaled = _scaled(obs, value, scale_max)
                if scaled is not None:
                    label = next((c.display for c in codings if c.display), "score")
                    scores.append(Score(obs.effective, scaled, obs.reference, label))
    scores.sort(key=lambda s: s.on)
    ctx.cache[key] = scores
    return scores


def _scaled(obs: ObservationFact, value: float, scale_max: float | None):
    if scale_max is None:
        return value
    if (obs.unit or "").strip().lower() == "mm":
        value = value / 10
    if 0 <= value <= scale_max:
        return value
    return None


def _label(obs: ObservationFact) -> str:
    for coding in obs.codings:
        if coding.display:
            return coding.display
    return obs.codings[0].code if obs.codings else "score"


def score_evidence(score: Score) -> Evidence:
    return Evidence(
        description=score.label,
        reference=score.reference,
        date=score.on,
        value=f"{score.value:g}",
    )


def latest(scores: list[Score], since: date, until: date) -> Score | None:
    """The most recent score in [since, until]; the higher one if a day has several."""
    window = [s for s in scores if since <= s.on <= until]
    if not window:
        return None
    last_day = window[-1].on
    return max((s for s in window if s.on == last_day), key=lambda s: s.value)


class PainScoreParams(Schema):
    codes = fields.String(required=True)
    min = fields.Float(required=True, validate=validate.Range(min=0, max=10))
    lookback_days = fields.Integer(load_default=90, validate=validate.Range(min=0))
    min_count = fields.Integer(load_default=1, validate=validate.Range(min=1))


@register_kind(
    "pain-score",
    PainScoreParams,
    valuesets=("codes",),
    data=(DataCategory.OBSERVATIONS,),
)
def pain_score(params: dict, ctx: Context) -> Finding:
    """Met when the latest pain score in the look-back reaches the threshold."""
    if missing := unavailable(ctx, DataCategory.OBSERVATIONS):
        return missing
    threshold, lookback = params["min"], params["lookback_days"]
    since = ctx.on - timedelta(days=lookback)
    scores = read_scores(ctx, params["codes"], scale_max=10)
    current = latest(scores, since, ctx.on)
    if current is None:
        older = [s for s in scores if s.on < since]
        hint = (
            f" The latest is {older[-1].value:g}/10 on {older[-1].on.isoformat()}."
            if older
            else ""
        )
        return Finding(
            State.NOT_DOCUMENTED,
            f"No 0-10 pain score in the {lookback} days before "
            f"{ctx.on.isoformat()}.{hint}",
            (score_evidence(older[-1]),) if older else (),
        )
    if current.value < threshold:
        return Finding(
            State.NOT_MET,
            f"Latest pain score {current.value:g}/10 on {current.on.isoformat()} is "
            f"below {threshold:g}/10.",
            (score_evidence(current),),
        )
    qualifying = [s for s in scores if since <= s.on <= ctx.on and s.value >= threshold]
    if len({s.on for s in qualifying}) < params["min_count"]:
        return Finding(
            State.NOT_DOCUMENTED,
            f"Pain of at least {threshold:g}/10 is recorded on "
            f"{len({s.on for s in qualifying})} day(s); {params['min_count']} needed.",
            tuple(score_evidence(s) for s in qualifying),
        )
    return Finding(
        State.MET,
        f"Latest pain score {current.value:g}/10 on {current.on.isoformat()} "
        f"(at least {threshold:g}/10 required).",
        (score_evidence(current),),
    )


class MeasureSchema(Schema):
    valueset = fields.String(required=True)
    min = fields.Float(required=True)


class FunctionalImpairmentParams(Schema):
    measures = fields.List(fields.Nested(MeasureSchema), load_default=list)
    findings = fields.List(fields.String(), load_default=None)
    lookback_days = fields.Integer(load_default=180, validate=validate.Range(min=0))


@register_kind(
    "functional-impairment",
    FunctionalImpairmentParams,
    valuesets=("measures.valueset", "findings"),
    data=(DataCategory.OBSERVATIONS, DataCategory.CONDITIONS),
)
def functional_impairment(params: dict, ctx: Context) -> Finding:
    """Met by a disability score at or above its threshold or a coded finding."""
    findings = params.get("findings")
    if findings and DataCategory.CONDITIONS not in ctx.record.unavailable:
        found = match_conditions(ctx, findings).current
        if found:
            return Finding(
                State.MET,
                "A functional limitation is recorded as a finding.",
                tuple(condition_evidence(c) for c in found),
            )
    since = ctx.on - timedelta(days=params["lookback_days"])
    measured = []
    if DataCategory.OBSERVATIONS not in ctx.record.unavailable:
        for measure in params["measures"]:
            score = latest(read_scores(ctx, measure["valueset"]), since, ctx.on)
            if score is None:
                continue
            if score.value >= measure["min"]:
                return Finding(
                    State.MET,
                    f"{measure['valueset'].title} {score.value:g} on "
                    f"{score.on.isoformat()} (at least {measure['min']:g} shows "
                    "impairment).",
                    (score_evidence(score),),
                )
            measured.append((measure, score))
    if measured:
        parts = "; ".join(
            f"{m['valueset'].title} {s.value:g} (impairment from {m['min']:g})"
            for m, s in measured
        )
        return Finding(
            State.NOT_MET,
            f"Functional measures do not show impairment: {parts}.",
            tuple(score_evidence(s) for _, s in measured),
        )
    if missing := unavailable(ctx, DataCategory.OBSERVATIONS, DataCategory.CONDITIONS):
        return missing
    return Finding(
        State.NOT_DOCUMENTED,
        f"No functional measure or finding in the {params['lookback_days']} days "
        f"before {ctx.on.isoformat()}.",
    )
