"""Criterion objects, the registry of criterion kinds and what evaluators share."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property
from typing import TYPE_CHECKING

from marshmallow import Schema

from cds_service.guideline.valuesets import match_any
from cds_service.model import (
    ConditionFact,
    DataCategory,
    Evidence,
    MedicationFact,
    ObservationFact,
    Order,
    PatientRecord,
    ProcedureFact,
    Role,
    State,
)

if TYPE_CHECKING:
    from cds_service.guideline.engine import Guideline
    from cds_service.guideline.schema import ProcedureCode
    from cds_service.guideline.valuesets import ValueSet

logger = logging.getLogger(__name__)


# What the `not` kind makes of a state: met and not met swap; not documented
# stays, since the absence of data proves neither.
NEGATED = {State.MET: State.NOT_MET, State.NOT_MET: State.MET}


@dataclass(frozen=True)
class Criterion:
    """One rule as read from a rule file, with value sets already resolved."""

    id: str
    section: str
    text: str
    role: Role
    kind: str
    params: dict
    raw_params: dict
    # The kind's evaluator, looked up once when the rule is loaded.
    evaluator: Evaluator = field(compare=False, repr=False)
    reading: str | None = None
    codes: frozenset[str] | None = None  # only these codes of the section, if set
    sections: tuple[str, ...] = ()  # for rules shared across sections
    applies_when: Criterion | None = None
    applies_unless: Criterion | None = None
    effective_from: date | None = None
    effective_until: date | None = None
    file: str = ""

    def in_effect(self, on: date) -> bool:
        if self.effective_from and on < self.effective_from:
            return False
        return not (self.effective_until and on > self.effective_until)

    @cached_property
    def gate(self) -> tuple[Criterion, State]:
        """This criterion as a gate (applies_when, applies_unless): the criterion to
        evaluate and the state in which the gate holds.

        Only a gate's state is read, so a `not` gate asks its inner criterion for
        the state that NEGATED turns into met, and no negated finding is built.
        """
        if self.kind == "not":
            (inner,) = self.params["criteria"]
            return inner, State.NOT_MET
        return self, State.MET


@dataclass(frozen=True)
class Finding:
    """What an evaluator concluded about one criterion."""

    state: State
    explanation: str
    evidence: tuple[Evidence, ...] = ()
    data_unavailable: bool = False


@dataclass(frozen=True)
class Context:
    """Everything an evaluator may read; nothing else (no clock, no I/O)."""

    record: PatientRecord
    order: Order
    code: ProcedureCode
    orders: tuple[Order, ...]
    on: date
    guideline: Guideline
    # Shared by every order of one evaluate() call (same record, same date), so
    # criteria reading the same scores or conditions compute them once.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def evaluate(self, criterion: Criterion) -> Finding:
        """Evaluate a nested criterion (waiver, applies_when) in this context."""
        return criterion.evaluator(criterion.params, self)


Evaluator = Callable[[dict, Context], Finding]


@dataclass(frozen=True)
class KindSpec:
    name: str
    schema: type[Schema]
    evaluate: Evaluator
    valueset_params: tuple[str, ...] = ()  # params holding value-set ids
    criteria_params: tuple[str, ...] = ()  # params holding nested criteria
    data: tuple[DataCategory, ...] = ()  # categories the kind reads


_KINDS: dict[str, KindSpec] = {}


def register_kind(
    name: str,
    schema: type[Schema],
    *,
    valuesets: Iterable[str] = (),
    criteria: Iterable[str] = (),
    data: Iterable[DataCategory] = (),
):
    """Decorator registering an evaluator under a kind name used in rule files."""

    def decorator(func: Evaluator) -> Evaluator:
        if name in _KINDS:
            raise ValueError(f"criterion kind {name!r} registered twice")
        _KINDS[name] = KindSpec(
            name, schema, func, tuple(valuesets), tuple(criteria), tuple(data)
        )
        return func

    return decorator


def kind_spec(name: str) -> KindSpec | None:
    return _KINDS.get(name)


def kind_names() -> list[str]:
    return sorted(_KINDS)


# --- shared helpers for evaluators ----------------------------------------------------

INACTIVE_CLINICAL = frozenset({"inactive", "remission", "resolved"})
INVALID_VERIFICATION = frozenset({"refuted", "entered-in-error"})
INVALID_PROCEDURE = frozenset(
    {"not-done", "entered-in-error", "preparation", "on-hold"}
)
INVALID_OBSERVATION = frozenset({"entered-in-error", "cancelled"})
INVALID_MEDICATION = frozenset(
    {"entered-in-error", "cancelled", "draft", "not-taken", "intended"}
)


def unavailable(ctx: Context, *categories: DataCategory) -> Finding | None:
    """A not-documented finding when any category could not be retrieved."""
    if not ctx.record.unavailable:  # the usual case, asked by most criteria
        return None
    missing = [c.value for c in categories if c in ctx.record.unavailable]
    if not missing:
        return None
    return Finding(
        State.NOT_DOCUMENTED,
        f"The patient's {' and '.join(missing)} could not be retrieved from the EHR.",
        data_unavailable=True,
    )


def holds_coded_conditions(ctx: Context) -> bool:
    """Does the record hold any coded condition at all?

    Without one, "no X on record" says nothing about the patient (the client may
    simply have sent no problem list), so a criterion met by the absence of a
    condition is not documented rather than met.
    """
    # The record builder counts coded conditions before it drops irrelevant ones;
    # records built otherwise only have their facts to go by.
    if ctx.record.received_coded.get(DataCategory.CONDITIONS):
        return True
    return any(c.codings for c in ctx.record.conditions)


def condition_ignored_because(cond: ConditionFact, on: date) -> str | None:
    """Why a condition cannot count as current on `on`, or None if it can."""
    if cond.verification_status in INVALID_VERIFICATION:
        return cond.verification_status
    if cond.clinical_status in INACTIVE_CLINICAL:
        return cond.clinical_status
    if cond.abatement and cond.abatement <= on:
        return f"abated {cond.abatement.isoformat()}"
    if cond.first_evidence and cond.first_evidence > on:
        return f"onset after {on.isoformat()}"
    return None


@dataclass
class ConditionMatches:
    current: list[ConditionFact] = field(default_factory=list)
    ignored: list[tuple[ConditionFact, str]] = field(default_factory=list)


def match_conditions(ctx: Context, valuesets: Iterable[ValueSet]) -> ConditionMatches:
    """Conditions coded in any of the value sets, split into current and ignored."""
    valuesets = tuple(valuesets)
    key = ("conditions", *[vs.id for vs in valuesets])
    if key in ctx.cache:
        return ctx.cache[key]
    result = ConditionMatches()
    for cond in ctx.record.conditions:
        if not match_any(valuesets, cond.codings):
            continue
        reason = condition_ignored_because(cond, ctx.on)
        if reason:
            result.ignored.append((cond, reason))
        else:
            result.current.append(cond)
    ctx.cache[key] = result
    return result


REGION_NAMES = {
    "cervical-thoracic": "cervical/thoracic spine",
    "lumbosacral": "lumbar/sacral spine",
}


def split_by_region(
    ctx: Context, conditions: Iterable[ConditionFact], valuesets: Iterable[ValueSet]
) -> tuple[list[ConditionFact], list[ConditionFact]]:
    """Conditions that may concern the order's spine region, and those that cannot.

    A condition is in another region only when every coding matching the value
    sets names a region and none is the order's; untagged codes (unspecified or
    thoracolumbar site) match either region. Orders without a spine region
    (sacroiliac, peripheral) keep every condition.
    """
    region = ctx.code.region
    conditions = list(conditions)
    if region not in REGION_NAMES:
        return conditions, []
    valuesets = tuple(valuesets)
    same, other = [], []
    for cond in conditions:
        regions = {
            vs.region_of(c) for c in cond.codings for vs in valuesets if vs.contains(c)
        }
        if not regions or None in regions or region in regions:
            same.append(cond)
        else:
            other.append(cond)
    return same, other


def condition_label(cond: ConditionFact) -> str:
    if cond.text:
        return cond.text
    for coding in cond.codings:
        if coding.display:
            return coding.display
    return cond.codings[0].code if cond.codings else cond.reference


def condition_evidence(cond: ConditionFact, note: str | None = None) -> Evidence:
    codes = ", ".join(c.code for c in cond.codings)
    return Evidence(
        description=condition_label(cond) + (f" ({note})" if note else ""),
        reference=cond.reference,
        date=cond.first_evidence,
        value=codes or None,
    )


def ignored_note(ignored: list[tuple[ConditionFact, str]]) -> str:
    if not ignored:
        return ""
    parts = [f"{condition_label(c)} ({why})" for c, why in ignored]
    return " Not counted: " + "; ".join(parts) + "."


def usable_procedures(ctx: Context) -> list[ProcedureFact]:
    return [p for p in ctx.record.procedures if p.status not in INVALID_PROCEDURE]


def usable_observations(ctx: Context) -> list[ObservationFact]:
    return [o for o in ctx.record.observations if o.status not in INVALID_OBSERVATION]


def usable_medications(ctx: Context) -> list[MedicationFact]:
    return [m for m in ctx.record.medications if m.status not in INVALID_MEDICATION]


def days_between(start: date, end: date) -> int:
    return (end - start).days
