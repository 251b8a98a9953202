"""Value sets: code-system URIs, code normalisation and constant-time code lookup."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cds_service.model import CodeSystem, Coding

logger = logging.getLogger(__name__)

# Every URI variant listed in shared/reference/codes.md section 0, plus the OIDs some
# EHRs and C-CDA-derived data send instead. Keys are compared after lower-casing and
# stripping a trailing slash, so "http://loinc.org/" and "HTTP://LOINC.ORG" both match.
_SYSTEM_URIS: dict[str, str] = {
    # CPT
    "http://www.ama-assn.org/go/cpt": CodeSystem.CPT,
    "https://www.ama-assn.org/go/cpt": CodeSystem.CPT,
    "urn:oid:2.16.840.1.113883.6.12": CodeSystem.CPT,
    # HCPCS Level II
    "https://www.cms.gov/medicare/coding/hcpcsreleasecodesets": CodeSystem.HCPCS,
    "http://www.cms.gov/medicare/coding/hcpcsreleasecodesets": CodeSystem.HCPCS,
    "urn:oid:2.16.840.1.113883.6.285": CodeSystem.HCPCS,
    "urn:oid:2.16.840.1.113883.6.14": CodeSystem.HCPCS,
    "http://terminology.hl7.org/codesystem/hcpcs": CodeSystem.HCPCS,
    # ICD-10-CM
    "http://hl7.org/fhir/sid/icd-10-cm": CodeSystem.ICD10CM,
    "https://hl7.org/fhir/sid/icd-10-cm": CodeSystem.ICD10CM,
    "urn:oid:2.16.840.1.113883.6.90": CodeSystem.ICD10CM,
    # SNOMED CT
    "http://snomed.info/sct": CodeSystem.SNOMED,
    "https://snomed.info/sct": CodeSystem.SNOMED,
    "urn:oid:2.16.840.1.113883.6.96": CodeSystem.SNOMED,
    # LOINC
    "http://loinc.org": CodeSystem.LOINC,
    "https://loinc.org": CodeSystem.LOINC,
    "urn:oid:2.16.840.1.113883.6.1": CodeSystem.LOINC,
    # RxNorm
    "http://www.nlm.nih.gov/research/umls/rxnorm": CodeSystem.RXNORM,
    "https://www.nlm.nih.gov/research/umls/rxnorm": CodeSystem.RXNORM,
    "urn:oid:2.16.840.1.113883.6.88": CodeSystem.RXNORM,
    # Source of Payment Typology: the current NAHDO URI and the older OID
    "https://nahdo.org/sopt": CodeSystem.SOP,
    "http://nahdo.org/sopt": CodeSystem.SOP,
    "urn:oid:2.16.840.1.113883.3.221.5": CodeSystem.SOP,
    # HL7 v3 ActCode
    "http://terminology.hl7.org/codesystem/v3-actcode": CodeSystem.ACTCODE,
    "http://hl7.org/fhir/v3/actcode": CodeSystem.ACTCODE,
    "urn:oid:2.16.840.1.113883.5.4": CodeSystem.ACTCODE,
}

_ALL_SYSTEMS = frozenset(_SYSTEM_URIS.values())


def normalize_system(uri: str | None) -> str | None:
    """Map a FHIR `Coding.system` URI to a `CodeSystem` name, or None if unknown."""
    if not uri or not isinstance(uri, str):
        return None
    key = uri.strip().rstrip("/").lower()
    if key in _SYSTEM_URIS:
        return _SYSTEM_URIS[key]
    # Short names are accepted too, so value-set files and tests can say "icd10cm".
    if key in _ALL_SYSTEMS:
        return key
    return None


_ICD_CLEAN = re.compile(r"[\s.]")


_UPPER_CASE_SYSTEMS = frozenset({CodeSystem.CPT, CodeSystem.HCPCS, CodeSystem.LOINC})


def normalize_code(system: str, code: str) -> str:
    """Canonical form of a code for lookup: trimmed; ICD-10-CM upper-case, dotless."""
    code = code.strip()
    if system == CodeSystem.ICD10CM:
        # Most codes are letters and digits around one dot; the regex is for the rest.
        dotless = code.replace(".", "")
        if dotless.isalnum():
            return dotless.upper()
        return _ICD_CLEAN.sub("", code).upper()
    if system in _UPPER_CASE_SYSTEMS:
        return code.upper()
    return code


# Codes.md confidence tags: [G] guideline text, [V] checked against an authoritative
# source, [S] secondary source, [M] domain knowledge only.
CONFIDENCE_TAGS = ("G", "V", "S", "M")


@dataclass(frozen=True)
class ValueSetEntry:
    """One line of a value-set file."""

    system: str
    code: str | None
    display: str | None
    tag: str
    prefix: bool = False
    name: str | None = None  # RxNorm ingredient name matched as a word
    value: float | None = None  # numeric meaning of a LOINC answer code
    note: str | None = None
    region: str | None = None  # spine region the code names, None = any region


@dataclass
class ValueSet:
    """A named set of codes, indexed for constant-time lookup.

    ICD-10-CM entries are stored dotless and upper-case; an entry marked `prefix`
    matches every code that starts with it (ICD-10-CM categories cover their
    subcodes), which is checked by looking up each leading slice of the code.
    """

    id: str
    title: str
    entries: tuple[ValueSetEntry, ...] = ()
    source: str | None = None
    _exact: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _prefixes: dict[str, set[str]] = field(default_factory=dict, repr=False)
    # Per system: exact codes, prefixes and the lengths of the prefixes, so that
    # `contains` makes one lookup for the system and slices the code only to the
    # lengths an entry could equal.
    _lookup: dict[str, tuple[set[str], set[str], tuple[int, ...]]] = field(
        default_factory=dict, repr=False
    )
    _name_pattern: re.Pattern | None = field(default=None, repr=False)
    _values: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)
    _regions: dict[tuple[str, str, bool], str | None] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        names = []
        for entry in self.entries:
            if entry.code is not None:
                code = normalize_code(entry.system, entry.code)
                index = self._prefixes if entry.prefix else self._exact
                index.setdefault(entry.system, set()).add(code)
                if entry.value is not None:
                    self._values[(entry.system, code)] = entry.value
                self._regions[(entry.system, code, entry.prefix)] = entry.region
            if entry.name:
                names.append(re.escape(entry.name.strip().lower()))
        for system in self._exact.keys() | self._prefixes.keys():
            prefixes = self._prefixes.get(system, set())
            lengths = tuple(sorted({len(p) for p in prefixes if p}))
            self._lookup[system] = (self._exact.get(system, set()), prefixes, lengths)
        if names:
            # Product-level RxCUIs cannot be mapped to ingredients offline, so the
            # ingredient name as a whole word in the display or text also matches.
            self._name_pattern = re.compile(r"\b(?:" + "|".join(names) + r")\b", re.I)

    @property
    def systems(self) -> set[str]:
        return set(self._exact) | set(self._prefixes)

    def contains(self, coding: Coding) -> bool:
        """True when the coding's code (not its display) is in the set."""
        lookup = self._lookup.get(coding.system)
        if lookup is None:
            return False
        code = normalize_code(coding.system, coding.code or "")
        if not code:
            return False
        exact, prefixes, lengths = lookup
        if code in exact:
            return True
        for length in lengths:
            if code[:length] in prefixes:
                return True
        return False

    def matches_name(self, text: str | None) -> bool:
        return bool(text and self._name_pattern and self._name_pattern.search(text))

    def match(self, codings: Iterable[Coding], text: str | None = None) -> str | None:
        """How a coded concept matches: "code", "name" or None.

        Names are matched only for value sets that list ingredient names (RxNorm).
        """
        codings = tuple(codings)
        for coding in codings:
            if self.contains(coding):
                return "code"
        if self._name_pattern is not None:
            if self.matches_name(text) or any(
                self.matches_name(c.display) for c in codings
            ):
                return "name"
        return None

    def region_of(self, coding: Coding) -> str | None:
        """Spine region of the most specific entry matching the coding, if tagged.

        A category entry (M54.1) stays untagged while its region-specific subcodes
        (M54.12, M54.16) are tagged, so the longest match decides.
        """
        code = normalize_code(coding.system, coding.code or "")
        if (coding.system, code, False) in self._regions:
            return self._regions[(coding.system, code, False)]
        for i in range(len(code), 0, -1):
            key = (coding.system, code[:i], True)
            if key in self._regions:
                return self._regions[key]
        return None

    def value_of(self, coding: Coding) -> float | None:
        """Numeric meaning of an answer code (LA6113-0 -> 2), if the set has one."""
        code = normalize_code(coding.system, coding.code or "")
        return self._values.get((coding.system, code))


def match_any(valuesets: Iterable[ValueSet], codings: tuple[Coding, ...]) -> bool:
    """Does any of the value sets match the codings (by code, or by name)?"""
    for valueset in valuesets:
        if valueset.match(codings):
            return True
    return False
