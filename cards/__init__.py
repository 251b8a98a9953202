"""Determinations to a CDS Hooks response: cards and CRD coverage information."""

from __future__ import annotations

import logging

from cards.coverage_information import (
    CoverageInformationError,
    check_coverage_information,
    coverage_actions,
)
from cards.identity import determination_key, order_fingerprint
from cards.options import (
    CONFIGURATION_OPTIONS,
    CardMemory,
    CardOptions,
    IssuedCard,
    discovery_extension,
)
from cards.render import DATA_CARD_PRIORITY, data_card, decisive_problem, order_card
from cds_service.model import DataCategory, Determination, Order

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIGURATION_OPTIONS",
    "CardMemory",
    "CardOptions",
    "CoverageInformationError",
    "IssuedCard",
    "build_response",
    "check_coverage_information",
    "discovery_extension",
    "order_fingerprint",
]


def build_response(
    determinations: list[Determination],
    *,
    hook: str,
    options: CardOptions,
    unavailable: set[DataCategory],
    all_orders: list[Order],
    patient_id: str | None = None,
) -> dict:
    """The response body: `{"cards": [...], "systemActions": [...]}`.

    Orders without a Determination (outside the guideline) get nothing.
    """
    determinations = list(determinations)
    fingerprints = [
        order_fingerprint(d.order.resource, patient_id) for d in determinations
    ]
    # A card's uuid and the order's coverage-assertion id both hash the determination;
    # a key made for a card is reused for the assertion.
    keys: list[str | None] = [None] * len(determinations)

    candidates: list[tuple[int, dict, IssuedCard | None]] = []
    for index, determination in enumerate(determinations):
        problem = decisive_problem(determination)
        if problem is None or not options.wants(problem.card_type):
            continue
        fingerprint = fingerprints[index]
        keys[index] = key = determination_key(determination)
        card = order_card(
            determination, problem, fingerprint, options, all_orders, key=key
        )
        if any(card["uuid"] == other["uuid"] for _, other, _ in candidates):
            continue  # the same order listed twice in draftOrders: one card
        issued = IssuedCard(
            card["uuid"], fingerprint, determination.outcome.value, card["summary"]
        )
        candidates.append((problem.priority, card, issued))

    if options.wants("coverage-info"):
        card = data_card(determinations, set(unavailable), fingerprints, options)
        if card is not None:
            candidates.append((DATA_CARD_PRIORITY, card, None))

    candidates = _keep_accepted_consistent(candidates, options)
    candidates.sort(key=lambda item: item[0])  # stable: request order within a rank
    kept = candidates[: options.max_cards]
    _remember([issued for _, _, issued in kept if issued], options)

    response: dict = {"cards": [card for _, card, _ in kept]}
    if options.wants("coverage-info"):
        actions = coverage_actions(
            determinations,
            fingerprints,
            hook=hook,
            unavailable=set(unavailable),
            keys=keys,
        )
        if actions:
            response["systemActions"] = actions
    return response


def _keep_accepted_consistent(candidates, options: CardOptions):
    """Drop cards that would contradict a card the clinician accepted.

    The rule: a card stands for its determination's outcome (its "stance":
    covered, conditional, not-covered, indeterminate). Once a clinician accepts a
    card (feedback `accepted`, and no later `overridden` for it), then for as long as
    the order is unchanged (same fingerprint: the order resource minus `meta` and
    our coverage-information extension) no card about that order with a different
    stance is returned. Cards with the same stance, including the accepted card
    itself, are still returned: they do not contradict it. A changed order is a new
    decision and gets whatever card it deserves. Coverage-information systemActions
    are never withheld: they record the payer's current assertion (CRD resp-29).
    """
    memory = options.memory
    order_cards = [issued for _, _, issued in candidates if issued]
    if memory is None or not order_cards:
        return candidates
    try:
        accepted = memory.accepted_stances(
            sorted({issued.order_fingerprint for issued in order_cards})
        )
    except Exception:  # a store outage must not fail the hook call
        logger.warning("accepted-card lookup failed; cards not filtered", exc_info=True)
        return candidates

    kept = []
    for priority, card, issued in candidates:
        stances = accepted.get(issued.order_fingerprint, set()) if issued else set()
        if stances and issued.stance not in stances:
            logger.info(
                "card withheld: it would contradict an accepted card for the same "
                "unchanged order",
                extra={"card": issued.uuid, "stance": issued.stance},
            )
            continue
        kept.append((priority, card, issued))
    return kept


def _remember(issued: list[IssuedCard], options: CardOptions) -> None:
    if options.memory is None or not issued:
        return
    try:
        options.memory.remember_cards(issued)
    except Exception:
        logger.warning("issued cards not recorded", exc_info=True)
