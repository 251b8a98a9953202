"""Card types the service offers, CRD configuration options and their request values."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

logger = logging.getLogger(__name__)

CARD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
CRD_VERSIONS = ("2.2",)
DEFAULT_PLAN_NAME = "EmblemHealth"

# CRD deviations.html (dev-4, dev-5): one boolean option per card type offered, coded
# from the CRD response types, plus `max-cards`. `guideline` is off by default: a card
# saying "every criterion is documented" is useful to some EHRs and noise to most.
CONFIGURATION_OPTIONS: tuple[dict, ...] = (
    {
        "code": "coverage-info",
        "type": "boolean",
        "name": "Coverage information",
        "description": "Coverage information (covered, prior authorization, what "
        "is needed) recorded on each order as a system action, and a card when "
        "patient data needed for the check could not be retrieved",
        "default": True,
    },
    {
        "code": "off-guideline",
        "type": "boolean",
        "name": "Off guideline",
        "description": "Warns when an order is excluded by the Pain Management "
        "guideline or does not meet its criteria, with the guideline to view",
        "default": True,
    },
    {
        "code": "limits",
        "type": "boolean",
        "name": "Limits",
        "description": "Warns when an order exceeds a frequency or other limit of "
        "the Pain Management guideline",
        "default": True,
    },
    {
        "code": "appropriate-use",
        "type": "boolean",
        "name": "Documentation needed",
        "description": "Reminds which guideline criteria are not documented in the "
        "record and must be documented for prior authorization",
        "default": True,
    },
    {
        "code": "guideline",
        "type": "boolean",
        "name": "Guideline criteria documented",
        "description": "Says that every criterion of the guideline section for the "
        "order is documented, with the guideline to view",
        "default": False,
    },
    {
        "code": "max-cards",
        "type": "integer",
        "name": "Maximum cards",
        "description": "Largest number of cards returned; warnings come first",
        "default": 10,
    },
)

CARD_TYPE_DISPLAY = {
    "coverage-info": "Coverage Information",
    "off-guideline": "Off Guideline",
    "limits": "Limits",
    "appropriate-use": "Appropriate Use",
    "guideline": "Guideline",
}

_BOOLEAN_DEFAULTS = {
    option["code"]: option["default"]
    for option in CONFIGURATION_OPTIONS
    if option["type"] == "boolean"
}
_DEFAULT_MAX_CARDS = next(
    option["default"]
    for option in CONFIGURATION_OPTIONS
    if option["code"] == "max-cards"
)


@dataclass(frozen=True)
class IssuedCard:
    """What the service remembers about a card it returned, keyed by its uuid."""

    uuid: str
    order_fingerprint: str
    stance: str  # the determination outcome the card stands for
    summary: str


class CardMemory(Protocol):
    """The part of the store the cards need (`cds_service.storage.Store`)."""

    def accepted_stances(self, fingerprints: list[str]) -> dict[str, set[str]]:
        """For each order fingerprint, the stances of cards a clinician accepted."""

    def remember_cards(self, cards: list[IssuedCard]) -> None:
        """Record issued cards so that later feedback can be tied to their order."""


@dataclass(frozen=True)
class CardOptions:
    """How to render one response: caller configuration plus service settings."""

    enabled: frozenset[str] = frozenset(
        code for code, on in _BOOLEAN_DEFAULTS.items() if on
    )
    max_cards: int = _DEFAULT_MAX_CARDS
    plan_name: str = DEFAULT_PLAN_NAME
    guideline_url: str | None = None
    memory: CardMemory | None = field(default=None, compare=False)

    def wants(self, card_type: str) -> bool:
        return card_type in self.enabled

    @classmethod
    def from_request(
        cls,
        extension: Mapping | None,
        settings=None,
        memory: CardMemory | None = None,
    ) -> CardOptions:
        """Options from a hook request's `extension` and the service settings.

        CRD dev-14/15/17/6: supported options are obeyed, none is required, unknown
        ones are ignored and a value of the wrong type is ignored (the default
        holds) rather than failing the call.
        """
        if settings is None:
            options = cls(memory=memory)
        else:
            options = cls(
                plan_name=getattr(settings, "plan_name", None) or DEFAULT_PLAN_NAME,
                guideline_url=getattr(settings, "guideline_url", None) or None,
                memory=memory,
            )
        configuration = (extension or {}).get("davinci-crd.configuration")
        if configuration is None:
            return options
        if not isinstance(configuration, Mapping):
            logger.info("davinci-crd.configuration ignored: not a JSON object")
            return options
        return options.configured(configuration)

    def configured(self, configuration: Mapping) -> CardOptions:
        enabled = set(self.enabled)
        max_cards = self.max_cards
        for code, value in configuration.items():
            if code == "max-cards":
                parsed = _as_count(value)
                if parsed is None:
                    logger.info("max-cards ignored: %r is not a count", value)
                else:
                    max_cards = parsed
            elif code in _BOOLEAN_DEFAULTS:
                parsed = _as_bool(value)
                if parsed is None:
                    logger.info("%s ignored: %r is not a boolean", code, value)
                elif parsed:
                    enabled.add(code)
                else:
                    enabled.discard(code)
        return replace(self, enabled=frozenset(enabled), max_cards=max_cards)


def discovery_extension(service=None) -> dict:
    """The CRD `extension` of a discovery entry (version and configuration)."""
    return {
        "davinci-crd.version": list(CRD_VERSIONS),
        "davinci-crd.configuration-options": [dict(o) for o in CONFIGURATION_OPTIONS],
    }


def _as_bool(value: object) -> bool | None:
    # A JSON boolean only: "true" as a string is a value of the wrong type, and
    # CRD (and our README) say those are ignored, the default holding.
    return value if isinstance(value, bool) else None


def _as_count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    # JSON has one number type: 2.0 is the integer 2. A string is the wrong type.
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None
