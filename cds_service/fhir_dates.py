"""Lenient FHIR date parsing: partial dates, date-times with or without a zone."""

from __future__ import annotations

import re
from datetime import date, datetime

from dateutil import parser as dateutil_parser

# FHIR date / dateTime: YYYY, YYYY-MM, YYYY-MM-DD, optionally followed by a time.
_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")
# A date-time whose time has no zone ("2023-05-01T10:00:00"), which FHIR forbids but
# EHR exports send; read as written.
_NAIVE_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")


def parse_date(value: object) -> date | None:
    """The calendar date a FHIR date or dateTime names, or None if unreadable.

    A partial date stands for its first day ("2023" -> 2023-01-01, "2023-05" ->
    2023-05-01). A date-time keeps the calendar date it was recorded in, whatever its
    zone, because clinical dates are read as the clinician wrote them.
    """
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()

    partial = _PARTIAL.match(text)
    if partial:
        year, month, day = partial.groups()
        try:
            return date(int(year), int(month or 1), int(day or 1))
        except ValueError:
            return None

    try:
        return dateutil_parser.isoparse(text).date()
    except (ValueError, OverflowError):
        return None


def is_naive_datetime(value: object) -> bool:
    """True for a date-time string with a time but no zone."""
    return isinstance(value, str) and bool(_NAIVE_DATETIME.match(value.strip()))


def first_date(*values: object) -> date | None:
    """The first of `values` that parses as a date."""
    for value in values:
        parsed = parse_date(value)
        if parsed is not None:
            return parsed
    return None
