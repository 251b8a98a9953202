"""Determinations to CDS Hooks cards: one card per order and problem, never noise."""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cards import content
from cards.identity import card_uuid, determination_key, suggestion_uuid
from cards.options import CARD_TYPE_DISPLAY, CARD_TYPE_SYSTEM, CardOptions
from cds_service.model import (
    CriterionResult,
    DataCategory,
    Determination,
    Order,
    Outcome,
    Role,
    State,
)

logger = logging.getLogger(__name__)

SUMMARY_LIMIT = 139  # CDS Hooks: summary "<140 characters"


@dataclass(frozen=True)
class Problem:
    """The one thing a card about an order says, chosen by `decisive_problem`."""

    kind: str  # exclusion, limit, unmet, undocumented, review, documented
    card_type: str  # CRD response type, also the configuration option that gates it
    indicator: str
    priority: int  # lower first when max-cards cuts the list
    results: tuple[CriterionResult, ...]


# CRD cards.html resp-1/resp-2: indicator from the clinician's point of view; an
# unmet or excluded service is at most a warning, documentation reminders are info,
# and `critical` is never used for coverage.
_KINDS = {
    "exclusion": ("off-guideline", "warning", 0),
    "limit": ("limits", "warning", 1),
    "unmet": ("off-guideline", "warning", 2),
    "undocumented": ("appropriate-use", "info", 4),
    "review": ("appropriate-use", "info", 5),
    "documented": ("guideline", "info", 6),
}
DATA_CARD_PRIORITY = 3

_STATE_LABELS = {
    State.MET: "Met",
    State.NOT_MET: "**Not met**",
    State.NOT_DOCUMENTED: "**Not documented**",
}
# Exclusions are worded as what the guideline excludes ("Prolotherapy is not
# medically necessary"), so "Met" would read as if the exclusion held.
_EXCLUSION_LABELS = {
    State.MET: "Does not apply",
    State.NOT_MET: "**Applies**",
    State.NOT_DOCUMENTED: "**Not documented**",
}

CATEGORY_LABELS = {
    DataCategory.PATIENT: "patient demographics",
    DataCategory.CONDITIONS: "problem list (conditions)",
    DataCategory.PROCEDURES: "procedure history",
    DataCategory.OBSERVATIONS: "pain scores and other observations",
    DataCategory.MEDICATIONS: "medication history",
    DataCategory.COVERAGE: "insurance coverage",
}


def decisive_problem(determination: Determination) -> Problem | None:
    """The most decisive problem of an order, or "documented" when there is none.

    Only one card is made per order: an excluded order gets the exclusion card
    (whose detail still lists every criterion), not a second card asking for
    documentation that cannot change the answer. Criteria that are "not
    documented" only because data could not be retrieved belong to the
    data-unavailable card, not to a documentation reminder.
    """
    all_failing = determination.failing  # a property that builds a new tuple
    failing = [
        r for r in all_failing if not r.data_unavailable and r.role is not Role.REVIEW
    ]
    not_met = [r for r in failing if r.state is State.NOT_MET]
    groups = (
        ("exclusion", [r for r in not_met if r.role is Role.EXCLUSION]),
        ("limit", [r for r in not_met if r.role is Role.LIMIT]),
        ("unmet", [r for r in not_met if r.role is Role.REQUIREMENT]),
        ("undocumented", [r for r in failing if r.state is State.NOT_DOCUMENTED]),
    )
    for kind, results in groups:
        if results:
            return _problem(kind, results)
    review = [
        r for r in all_failing if r.role is Role.REVIEW and not r.data_unavailable
    ]
    if determination.manual_review or review:
        return _problem("review", review)
    if determination.outcome is Outcome.COVERED and not all_failing:
        return _DOCUMENTED
    return None


def _problem(kind: str, results: Iterable[CriterionResult]) -> Problem:
    card_type, indicator, priority = _KINDS[kind]
    results = tuple(results)
    if kind == "undocumented" and any(
        content.denied_unless_documented(r.criterion_id) for r in results
    ):
        # Without the documentation the service is denied: a warning, ranked
        # with the other warnings when max-cards cuts the list.
        indicator, priority = "warning", _KINDS["unmet"][2]
    return Problem(kind, card_type, indicator, priority, results)


# The same for every fully documented order (most calls): made once.
_DOCUMENTED = _problem("documented", ())


def order_card(
    determination: Determination,
    problem: Problem,
    fingerprint: str,
    options: CardOptions,
    all_orders: list[Order],
    key: str | None = None,
) -> dict:
    """The card for one order and its decisive problem.

    `key` is the determination's `determination_key`, when the caller has it.
    """
    key = key or determination_key(determination)
    uuid = card_uuid(problem.kind, fingerprint, key)
    label = content.order_label(determination.order, determination.billing_code)
    alternative = _image_guided_alternative(determination, problem)

    card = {
        "uuid": uuid,
        "summary": _summary(problem, label, determination, options, alternative),
        "indicator": problem.indicator,
        "detail": _detail(determination, problem, label, options, all_orders),
        "source": _source(options, problem.card_type),
        "links": _links(determination, options),
        # CRD dev-25: say which order the card is about, for EHRs that group cards.
        "extension": {
            "davinci-crd.associated-resource": [
                {"reference": determination.order.reference}
            ]
        },
    }
    suggestions = _suggestions(determination, problem, uuid, label, alternative)
    if suggestions:
        card["suggestions"] = suggestions
        # The alternatives (replace, remove) exclude each other.
        card["selectionBehavior"] = "at-most-one"
    if problem.kind != "documented":
        card["overrideReasons"] = content.override_reasons()
    return prune(card)


def data_card(
    determinations: list[Determination],
    unavailable: set[DataCategory],
    fingerprints: list[str],
    options: CardOptions,
) -> dict | None:
    """One card naming the data that could not be retrieved, when it mattered.

    It matters for an order whose criteria it left unchecked, and for an order
    left without coverage information because the Coverage could not be had.
    """
    if not unavailable:
        return None
    coverage_lost = DataCategory.COVERAGE in unavailable
    unchecked = [d for d in determinations if _data_unchecked(d)]
    affected = [
        d
        for d in determinations
        if _data_unchecked(d) or (coverage_lost and d.coverage is None)
    ]
    if not affected:
        return None

    categories = [c for c in DataCategory if c in unavailable]
    what = _join([CATEGORY_LABELS[c] for c in categories])
    labels = [content.order_label(d.order, d.billing_code) for d in affected]
    if len(labels) == 1:
        orders = labels[0]
    else:
        orders = f"{len(labels)} orders"
    summary = f"Coverage not fully checked for {orders}: {what} unavailable"
    if len(summary) > SUMMARY_LIMIT:
        # The detail names every category; the summary must stay a whole sentence.
        summary = f"Coverage not fully checked for {orders}: patient data unavailable"

    consequence = (
        "these criteria could not be checked and coverage is **indeterminate**"
        if unchecked
        else "no coverage information could be recorded on the order"
    )
    lines = [
        f"The {what} could not be retrieved from the EHR's FHIR server, so "
        f"{consequence}. "
        "Calling again once the EHR is reachable may give a complete answer.",
        "",
    ]
    for determination, label in zip(affected, labels, strict=True):
        lines.append(f"**{_escape(label)}** ({_escape(determination.rule_set_title)})")
        lines.append("")
        for result in determination.results:
            if result.data_unavailable:
                lines.append(f"- {_escape(result.text)} ({_escape(result.section)})")
        if coverage_lost and determination.coverage is None:
            lines.append(
                "- No coverage information is recorded on the order: the "
                "patient's insurance coverage could not be retrieved."
            )
        lines.append("")
    key = sorted(c.value for c in categories) + sorted(fingerprints)
    return prune(
        {
            "uuid": card_uuid("data-unavailable", *key),
            "summary": summary,
            "indicator": "info",
            "detail": "\n".join(lines).strip(),
            "source": _source(options, "coverage-info"),
        }
    )


def _data_unchecked(determination: Determination) -> bool:
    return determination.outcome is Outcome.INDETERMINATE or any(
        r.data_unavailable for r in determination.results
    )


# --- summary -----------------------------------------------------------------------


# One sentence per problem kind; `issue` is the criterion's phrase (what to
# document, for "undocumented"), `more` a " (+N more)" count of further problems.
SUMMARY_TEMPLATES = {
    "alternative": "Use {alternative} (image-guided), not {label}: {issue}{more}",
    "exclusion": "Remove {label}, not covered: {issue}{more}",
    "limit": "Reconsider {label}, over a plan limit: {issue}{more}",
    "unmet": "Review {label}, criteria not met: {issue}{more}",
    "undocumented": "Document for {label}: {issue}{more}",
    "review": "Send records with the PA request for {label}: manual review",
    "documented": "{label}: all guideline criteria documented; request PA",
}


def _summary(
    problem: Problem,
    label: str,
    determination: Determination,
    options: CardOptions,
    alternative: str | None,
) -> str:
    """One actionable sentence naming the order and the problem (<140 characters).

    The phrases of cards/criteria.yaml are written to fit (a test checks it);
    should one not, the order's short name goes before any words of the phrase.
    """
    issue, more = _issue(problem.results) if problem.results else ("", "")
    template = SUMMARY_TEMPLATES[problem.kind]
    if alternative and problem.kind in {"exclusion", "limit", "unmet"}:
        template = SUMMARY_TEMPLATES["alternative"]
    code = determination.billing_code.code
    for name, suffix in ((label, more), (code, more), (code, "")):
        summary = template.format(
            alternative=alternative, label=name, issue=issue, more=suffix
        )
        if len(summary) <= SUMMARY_LIMIT:
            return summary
    logger.warning(
        "card summary shortened: criterion phrase too long",
        extra={"criterion": problem.results[0].criterion_id},
    )
    prefix = template.split("{issue}")[0].format(alternative=alternative, label=code)
    return _fit(prefix, issue)


def _issue(results: tuple[CriterionResult, ...]) -> tuple[str, str]:
    """The first problem's phrase and, when there are more, a "(+N more)" suffix."""
    more = len(results) - 1
    return name_criterion(results[0]), f" (+{more} more)" if more else ""


def name_criterion(result: CriterionResult) -> str:
    """The criterion's short phrase, or its own text as a lower-case clause.

    A criterion that is not documented is named by what to document, where the
    phrase for it when unmet ("one spinal injection procedure per day") would
    not say that.
    """
    if result.state is State.NOT_DOCUMENTED:
        phrase = content.criterion_to_document(result.criterion_id)
        if phrase:
            return phrase
    phrase = content.criterion_phrase(result.criterion_id)
    if phrase:
        return phrase
    text = " ".join(result.text.split()).rstrip(".")
    first_word = text.split(" ", 1)[0]
    # "Pain rated ..." reads as "pain rated ..." after a colon; "G0068 ..." or
    # "PNS ..." keep their capitals.
    if first_word.isalpha() and first_word[1:].islower():
        text = text[0].lower() + text[1:]
    return text


def _fit(prefix: str, issue: str, suffix: str = "") -> str:
    """prefix + issue + suffix, the issue shortened at a word boundary to fit."""
    if len(prefix) > SUMMARY_LIMIT - 30:
        prefix = prefix[: SUMMARY_LIMIT - 32].rstrip() + "…: "
    room = SUMMARY_LIMIT - len(prefix) - len(suffix)
    if len(issue) > room:
        cut = issue[: room - 1]
        if " " in cut:
            cut = cut[: cut.rindex(" ")]
        issue = cut.rstrip(" ,;:") + "…"
    return prefix + issue + suffix


# --- detail ------------------------------------------------------------------------

_LEADS = {
    "exclusion": "**Not covered.** The guideline excludes this service here; the "
    "exclusion marked *Applies* below says why.",
    "limit": "**Not covered.** The order goes beyond a limit the guideline sets; "
    "the criteria marked *Not met* below say which.",
    "unmet": "**Criteria not met.** Prior authorization is likely to be denied "
    "unless the record shows otherwise; see the criteria marked *Not met*.",
    "undocumented": "**Documentation needed.** The criteria marked *Not documented* "
    "are not in the record; document them before requesting prior authorization.",
    "review": "**Manual review.** The plan reviews this order case by case; send "
    "the clinical records with the prior authorization request.",
    "documented": "**All criteria documented.** Prior authorization is still "
    "required; send the documentation below with the request.",
}


def _detail(
    determination: Determination,
    problem: Problem,
    label: str,
    options: CardOptions,
    all_orders: list[Order],
) -> str:
    lines = [
        f"**{_escape(label)}**: {_escape(options.plan_name)} Pain Management "
        f"guideline, *{_escape(determination.rule_set_title)}*.",
        "",
        _LEADS[problem.kind],
    ]
    if determination.manual_review:
        lines += ["", f"Manual review: {_escape(determination.manual_review)}"]
    alternative = _image_guided_alternative(determination, problem)
    if alternative:
        lines += [
            "",
            f"After a failed or inadequate blind epidural, the guideline expects the "
            f"next one under fluoroscopy: order {alternative} "
            f"({_escape(content.short_name(alternative) or 'image-guided')}) "
            "instead.",
        ]
    lines += ["", "| Criterion | Status | Why |", "|---|---|---|"]
    for result in determination.results:
        lines.append(_row(result))
    readings = [r for r in problem.results if r.reading]
    if readings:
        lines += [""]
        lines += [_how_the_plan_reads(r.text, r.reading) for r in readings]
    others = [o for o in all_orders if o.reference != determination.order.reference]
    if others:
        # CRD dev-24: a card about only some of the orders names them.
        names = _join([_escape(content.order_label(o)) for o in others])
        lines += [
            "",
            f"This card is about the draft order {_escape(label)} "
            f"({_escape(determination.order.reference)}) only, not about {names}.",
        ]
    return "\n".join(lines)


# Criterion texts, sections and readings come from the rule files, never from the
# request: these hold guideline text only, a hundred or so entries, each escaped
# once rather than on every call.
@functools.lru_cache(maxsize=512)
def _criterion_cell(text: str, section: str) -> str:
    return _escape(f"{text} ({section})")


@functools.lru_cache(maxsize=512)
def _how_the_plan_reads(text: str, reading: str) -> str:
    return (
        f"*How the plan reads \u201c{_escape(text)}\u201d:* "
        f"{_escape(clinical_reading(reading))}"
    )


def _row(result: CriterionResult) -> str:
    labels = _EXCLUSION_LABELS if result.role is Role.EXCLUSION else _STATE_LABELS
    status = labels[result.state]
    if result.data_unavailable:
        status = "**Not documented** (data could not be retrieved)"
    pieces = []
    for evidence in result.evidence:
        piece = evidence.description
        if evidence.value and not _mentions(piece, evidence.value):
            piece += f" ({evidence.value})"
        if evidence.date:
            piece += f", {evidence.date.isoformat()}"
        pieces.append(piece)
    why = _escape(result.explanation or "")
    if pieces:
        why = f"{why} *Evidence:* {_escape('; '.join(pieces))}".strip()
    criterion = _criterion_cell(result.text, result.section)
    return f"| {criterion} | {status} | {why or '-'} |"


def _mentions(description: str, value: str) -> bool:
    """Whether `description` already states `value` (a pain score of 1 is not
    stated by a display that reads "0-10 verbal numeric rating")."""
    if len(value) > 3:
        return value in description
    return f"({value})" in description or description.endswith(f" {value}")


def _escape(text: str) -> str:
    """Keep EHR-supplied text from breaking the table or injecting HTML."""
    return (
        " ".join(str(text).split())
        .replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --- source, links, suggestions -----------------------------------------------------


def _source(options: CardOptions, card_type: str) -> dict:
    # CRD resp-4/resp-5: the insurer's name as on the member card, and a topic.
    return {
        "label": options.plan_name,
        "topic": {
            "system": CARD_TYPE_SYSTEM,
            "code": card_type,
            "display": CARD_TYPE_DISPLAY[card_type],
        },
    }


def _links(determination: Determination, options: CardOptions) -> list[dict]:
    links = []
    if options.guideline_url:
        links.append(
            {
                "label": f"{options.plan_name} Pain Management guideline",
                "url": options.guideline_url,
                "type": "absolute",
            }
        )
    for document in content.documents_for(determination.billing_code.code):
        links.append({"label": document.label, "url": document.url, "type": "absolute"})
    return links


def _image_guided_alternative(
    determination: Determination, problem: Problem
) -> str | None:
    alternative = content.image_guided_alternative(determination.billing_code.code)
    if alternative is None or problem.kind not in {"exclusion", "limit", "unmet"}:
        return None
    triggers = content.image_guided_triggers()
    if any(r.criterion_id.startswith(triggers) for r in problem.results):
        return alternative
    return None


def _suggestions(
    determination: Determination,
    problem: Problem,
    uuid: str,
    label: str,
    alternative: str | None,
) -> list[dict]:
    order = determination.order
    suggestions = []
    if alternative:
        suggestions.append(
            {
                "label": f"Order {alternative} "
                f"({content.short_name(alternative) or 'image-guided'}) instead",
                "uuid": suggestion_uuid(uuid, "image-guided"),
                "isRecommended": True,
                "actions": [
                    {
                        "type": "update",
                        "description": f"Change the draft order {label} to "
                        f"{alternative}, the same injection under imaging guidance",
                        "resource": _with_code(order, alternative),
                    }
                ],
            }
        )
    if problem.kind in {"exclusion", "limit"}:
        suggestions.append(
            {
                "label": f"Remove the order for {label}",
                "uuid": suggestion_uuid(uuid, "remove"),
                "isRecommended": not alternative,
                "actions": [
                    {
                        "type": "delete",
                        "description": f"Remove the draft order {label}",
                        "resourceId": order.reference,
                    }
                ],
            }
        )
    return suggestions


def _with_code(order: Order, code: str) -> dict:
    resource = copy.deepcopy(order.resource)
    name = content.short_name(code)
    coding = {"system": content.SYSTEM_URIS["cpt"], "code": code}
    if name:
        coding["display"] = name
    resource["code"] = {"coding": [coding], "text": f"{code} {name}" if name else code}
    return resource


_EMPTY = (None, "", [], {})


def prune(value):
    """Drop None and empty values: CDS Hooks forbids null, "", [] and {}."""
    # Only containers recurse: a card holds dozens of strings (more with an order
    # echoed in a suggestion), and a call per string doubled the cost.
    if isinstance(value, dict):
        pruned = {}
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                item = prune(item)
            if item not in _EMPTY:
                pruned[key] = item
        return pruned
    if isinstance(value, list):
        kept = []
        for item in value:
            if isinstance(item, (dict, list)):
                item = prune(item)
            if item not in _EMPTY:
                kept.append(item)
        return kept
    return value


# Readings cite the project's list of the guideline's ambiguities ("codes.md 7 item
# 17") so a plan reviewer can trace them; a clinician has no such file, so cards keep
# the reasoning and drop the citation.
_CITATION = r"codes\.md \d+(?:\.\d+)?(?: items? \d+(?:(?:, | and )\d+)*)?"
_CITATIONS = (
    (re.compile(r"\(" + _CITATION + r": "), "("),
    (re.compile(r"\s*\(" + _CITATION + r"[^()]*\)"), ""),
    (re.compile(r"[,;]\s*" + _CITATION + r"\)"), ")"),
    (re.compile(r"\s*" + _CITATION + r": (\w)"), lambda m: " " + m[1].upper()),
)


def clinical_reading(reading: str) -> str:
    """`reading` without citations of the project's internal reference files."""
    for pattern, replacement in _CITATIONS:
        reading = pattern.sub(replacement, reading)
    return reading
