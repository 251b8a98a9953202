"""The Guideline: loads the rule files once and turns orders into determinations."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from datetime import date
from pathlib import Path

from cds_service.guideline import kinds as _kinds_package
from cds_service.guideline.criteria import Context, Criterion, Finding, kind_spec
from cds_service.guideline.schema import (
    VALUESETS_DIR,
    ProcedureCode,
    RuleSet,
    load_rule_sets,
    load_valuesets,
)
from cds_service.guideline.valuesets import ValueSet, normalize_code
from cds_service.model import (
    CodeSystem,
    Coding,
    CriterionResult,
    Determination,
    Order,
    Outcome,
    PatientRecord,
    Role,
    State,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
PROCEDURE_SYSTEMS = (CodeSystem.CPT, CodeSystem.HCPCS)


def _import_kinds() -> None:
    # Every module in guideline/kinds registers its criterion kinds on import, so a
    # new kind needs only a new module there.
    for info in pkgutil.iter_modules(_kinds_package.__path__):
        importlib.import_module(f"{_kinds_package.__name__}.{info.name}")


class Guideline:
    """The encoded Pain Management guideline: rule sets, value sets and evaluation."""

    def __init__(self, rule_sets: dict[str, RuleSet], valuesets: dict[str, ValueSet]):
        self.rule_sets = rule_sets
        self.valuesets = valuesets
        # CPT codes are HCPCS level I and EHRs send them under either URI, so the
        # procedure index is keyed on the code alone.
        self._codes: dict[str, ProcedureCode] = {
            code: pc for rs in rule_sets.values() for code, pc in rs.codes.items()
        }
        # One index over every value set, so the record builder's per-coding
        # question is a few set lookups.
        self._relevant = ValueSet(
            id="relevant",
            title="every code a criterion reads",
            entries=tuple(e for vs in valuesets.values() for e in vs.entries),
        )
        # The record builder's answers for raw codings, kept from call to call:
        # matching a display against the ingredient names costs more than the
        # rest of the question, and the answer never changes.
        self.relevance_answers: dict = {}

    @classmethod
    def load(cls, rules_dir=None, valuesets_dir=None) -> Guideline:
        _import_kinds()
        valuesets = load_valuesets(Path(valuesets_dir or VALUESETS_DIR))
        rule_sets = load_rule_sets(Path(rules_dir or HERE / "rules"), valuesets)
        logger.info(
            "guideline loaded",
            extra={"rule_sets": len(rule_sets), "value_sets": len(valuesets)},
        )
        return cls(rule_sets, valuesets)

    # --- lookups ----------------------------------------------------------------------

    def procedure_code(self, coding: Coding) -> ProcedureCode | None:
        if coding.system not in PROCEDURE_SYSTEMS or not coding.code:
            return None
        return self._codes.get(normalize_code(coding.system, coding.code))

    def covers(self, coding: Coding) -> bool:
        return self.procedure_code(coding) is not None

    def is_relevant(self, coding: Coding) -> bool:
        """Could a criterion read a resource carrying this coding?"""
        if self.covers(coding):
            return True
        return self._relevant.match((coding,)) is not None

    def observation_codes(self) -> list[Coding]:
        """LOINC codes the criteria read from Observations (not answer codes)."""
        seen: dict[str, Coding] = {}
        for vs in self.valuesets.values():
            for entry in vs.entries:
                if (
                    entry.system == CodeSystem.LOINC
                    and entry.code
                    and not entry.code.upper().startswith("LA")
                ):
                    seen.setdefault(
                        entry.code, Coding("loinc", entry.code, entry.display)
                    )
        return sorted(seen.values(), key=lambda c: c.code)

    def catalogue(self) -> list[dict]:
        out = []
        for rs in sorted(self.rule_sets.values(), key=lambda r: r.id):
            out.append(
                {
                    "id": rs.id,
                    "title": rs.title,
                    "section": rs.section,
                    "file": rs.file,
                    "codes": [
                        {
                            "system": pc.system,
                            "code": pc.code,
                            "display": pc.display,
                            "region": pc.region,
                            "image_guided": pc.image_guided,
                            "add_on_of": list(pc.add_on_of),
                        }
                        for pc in rs.codes.values()
                    ],
                    "rules": [_describe(rule) for rule in rs.rules],
                    "not_encoded": rs.not_encoded,
                }
            )
        return out

    # --- evaluation -------------------------------------------------------------------

    def evaluate(
        self, record: PatientRecord, orders: list[Order], on: date
    ) -> list[Determination]:
        determinations = []
        all_orders = tuple(orders)
        cache: dict = {}
        for order in orders:
            if not order.selected:
                continue
            for coding in order.codings:
                code = self.procedure_code(coding)
                if code is not None:
                    determinations.append(
                        self._determine(
                            record, order, coding, code, all_orders, on, cache
                        )
                    )
                    break
        return determinations

    def _determine(self, record, order, coding, code, orders, on, cache):
        rule_set = self.rule_sets[code.rule_set]
        ctx = Context(record, order, code, orders, on, self, cache)
        results = []
        for rule in rule_set.rules:
            if not self._applies(rule, ctx):
                continue
            finding = rule.evaluator(rule.params, ctx)
            results.append(_result(rule, finding))
        outcome, review = _outcome(rule_set.rules, results)
        return Determination(
            order=order,
            billing_code=coding,
            rule_set=rule_set.id,
            rule_set_title=rule_set.title,
            outcome=outcome,
            results=tuple(results),
            evaluated_on=on,
            coverage=_active_coverage(record, on),
            manual_review=review,
        )

    def _applies(self, rule: Criterion, ctx: Context) -> bool:
        if rule.codes is not None and ctx.code.code not in rule.codes:
            return False
        if not rule.in_effect(ctx.on):
            return False
        if rule.applies_when and not _holds(rule.applies_when, ctx):
            return False
        return not (rule.applies_unless and _holds(rule.applies_unless, ctx))


def _holds(gate: Criterion, ctx: Context) -> bool:
    criterion, state = gate.gate
    return ctx.evaluate(criterion).state is state


def _result(rule: Criterion, finding: Finding) -> CriterionResult:
    # Positional, in field order: a keyword call costs a third more, once per rule.
    return CriterionResult(
        rule.id,
        rule.section,
        rule.text,
        rule.role,
        finding.state,
        finding.explanation,
        finding.evidence,
        rule.reading,
        finding.data_unavailable,
    )


def _outcome(rules: list[Criterion], results: list[CriterionResult]):
    """Combine criterion results into the coverage outcome (and review reason)."""
    by_id = {r.id: r for r in rules}
    hard = [
        r
        for r in results
        if r.role in (Role.EXCLUSION, Role.LIMIT) and r.state is State.NOT_MET
    ]
    if hard:
        return Outcome.NOT_COVERED, None
    reviews = [r for r in results if r.role is Role.REVIEW]
    if reviews:
        reason = " ".join(
            by_id[r.criterion_id].params.get("reason", r.explanation) for r in reviews
        )
        return Outcome.CONDITIONAL, reason
    gaps = [r for r in results if r.state is not State.MET]
    if not gaps:
        return Outcome.COVERED, None
    # Data that could not be retrieved might settle any criterion (even hide an
    # exclusion), so one such gap makes the whole determination indeterminate.
    if any(r.state is State.NOT_DOCUMENTED and r.data_unavailable for r in gaps):
        return Outcome.INDETERMINATE, None
    return Outcome.CONDITIONAL, None


def _active_coverage(record: PatientRecord, on: date):
    for cov in record.coverages:
        if cov.status not in (None, "active"):
            continue
        if cov.period_start and cov.period_start > on:
            continue
        if cov.period_end and cov.period_end < on:
            continue
        return cov
    return None


def _describe(rule: Criterion) -> dict:
    return {
        "id": rule.id,
        "section": rule.section,
        "text": rule.text,
        "reading": rule.reading,
        "role": rule.role.value,
        "kind": rule.kind,
        "params": rule.raw_params,
        "reads": [c.value for c in kind_spec(rule.kind).data],
        "codes": sorted(rule.codes) if rule.codes is not None else None,
        "applies_when": _describe(rule.applies_when) if rule.applies_when else None,
        "applies_unless": _describe(rule.applies_unless)
        if rule.applies_unless
        else None,
        "effective_from": rule.effective_from.isoformat()
        if rule.effective_from
        else None,
        "effective_until": (
            rule.effective_until.isoformat() if rule.effective_until else None
        ),
        "file": rule.file,
    }
