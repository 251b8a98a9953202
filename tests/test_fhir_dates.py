"""Lenient FHIR date parsing."""

from __future__ import annotations

from datetime import date

import pytest

from cds_service.fhir_dates import first_date, is_naive_datetime, parse_date


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023", date(2023, 1, 1)),
        ("2023-05", date(2023, 5, 1)),
        ("2023-05-17", date(2023, 5, 17)),
        ("2014-02-05T23:29:59-05:00", date(2014, 2, 5)),
        ("2011-06-21T00:29:59.616-04:00", date(2011, 6, 21)),
        ("2026-12-03T09:15:00", date(2026, 12, 3)),
        ("2026-12-03T09:15:00Z", date(2026, 12, 3)),
        ("2023-13", None),
        ("last spring", None),
        ("", None),
        (None, None),
        (20230517, None),
    ],
)
def test_parse_date(text, expected):
    assert parse_date(text) == expected


def test_first_date_skips_unreadable_values():
    assert first_date(None, "soon", "2020-02") == date(2020, 2, 1)


@pytest.mark.parametrize(
    ("text", "naive"),
    [("2026-12-03T09:15:00", True), ("2026-12-03T09:15", True), ("2026-12-03", False)],
)
def test_is_naive_datetime(text, naive):
    assert is_naive_datetime(text) is naive
