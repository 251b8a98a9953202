"""`pain-cds report`: calls, determinations, feedback and latency from the record."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from cds_service.cli import main
from cds_service.report import percentile, summarise
from cds_service.storage import FeedbackItem

DAY = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def fill(store) -> None:
    calls = [
        # hook, status, duration ms, determinations
        ("order-sign", 200, 120.0, [{"code": "64493", "outcome": "not-covered"}]),
        ("order-sign", 200, 80.0, [{"code": "62323", "outcome": "conditional"}]),
        ("order-sign", 200, 640.0, [{"code": "62323", "outcome": "covered"}]),
        ("order-select", 200, 40.0, [{"code": "62323", "outcome": "conditional"}]),
        ("order-select", 200, 35.0, []),
        ("order-sign", 412, 300.0, []),
        ("order-sign", 401, 2.0, []),
        (None, 400, 1.0, []),
    ]
    for index, (hook, status, duration, determinations) in enumerate(calls):
        store.record_call(
            {
                "at": DAY.replace(minute=index),
                "hook_instance": f"d5b6a3c2-1f0e-4d9c-8b7a-6e5f4d3c2b{index:02d}",
                "service": f"pain-management-{hook or 'order-sign'}",
                "hook": hook,
                "order_codes": [d["code"] for d in determinations],
                "determinations": determinations,
                "card_summaries": [],
                "status": status,
                "duration_ms": duration,
            }
        )
    store.add_feedback(
        "pain-management-order-sign",
        [
            FeedbackItem("c1", "accepted", DAY, ("s1",)),
            FeedbackItem(
                "c2",
                "overridden",
                DAY,
                override_system="urn:pain-cds:override-reason",
                override_code="documented-elsewhere",
                override_display="Criteria are documented outside this record",
            ),
            FeedbackItem(
                "c3",
                "overridden",
                DAY,
                override_system="urn:pain-cds:override-reason",
                override_code="clinical-judgement",
            ),
            FeedbackItem("c4", "overridden", DAY),
            FeedbackItem(
                "c5",
                "overridden",
                DAY.replace(hour=10),
                override_system="urn:pain-cds:override-reason",
                override_code="documented-elsewhere",
                override_display="Criteria are documented outside this record",
            ),
        ],
    )


EXPECTED = {
    "calls": 8,
    "calls_by_hook": {
        "(unknown)": {"rejected (400)": 1},
        "order-select": {"answered": 2},
        "order-sign": {"answered": 3, "refused (401)": 1, "rejected (412)": 1},
    },
    "determinations_by_code": {
        "62323": {"conditional": 2, "covered": 1},
        "64493": {"not-covered": 1},
    },
    "feedback": {
        "accepted": 1,
        "overridden": 4,
        "override_reasons": {
            "Criteria are documented outside this record": 2,
            "Clinically necessary for this patient; will request peer-to-peer "
            "review": 1,
            "no reason given": 1,
        },
    },
    # Sorted durations: 1 2 35 40 80 120 300 640 (nearest rank).
    "duration_ms": {"p50": 40.0, "p95": 640.0},
    "within_500ms": 0.875,
}


def test_summary_of_a_known_record(store):
    fill(store)
    assert summarise(store.calls(), store.feedback_items()) == EXPECTED


def command_url(store) -> str:
    """The URL an operator would give `pain-cds report` for this store's tables.

    On PostgreSQL each test's tables live in a schema of their own; the command
    reaches them through the server's search_path, as a deployment could.
    """
    if store.dialect == "sqlite":
        return store.url
    return f"{store.url}?options=-csearch_path%3D{store.schema}"


def test_report_command_prints_json(store, capsys):
    fill(store)
    assert main(["report", "--database-url", command_url(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED


def test_report_command_prints_text(store, capsys):
    fill(store)
    main(["report", "--database-url", command_url(store)])
    assert capsys.readouterr().out.splitlines() == [
        "Hook calls: 8",
        "  (unknown): rejected (400) 1",
        "  order-select: answered 2",
        "  order-sign: answered 3, refused (401) 1, rejected (412) 1",
        "Determinations by code:",
        "  62323: conditional 2, covered 1",
        "  64493: not-covered 1",
        "Feedback: accepted 1, overridden 4",
        "  2 x Criteria are documented outside this record",
        "  1 x Clinically necessary for this patient; will request peer-to-peer review",
        "  1 x no reason given",
        "Duration: p50 40.0 ms, p95 640.0 ms; 87.5% of calls answered within 500 ms",
    ]


def test_report_window(store):
    fill(store)
    calls = store.calls(since=DAY.replace(minute=5), until=DAY.replace(minute=7))
    assert [c["hook_instance"][-2:] for c in calls] == ["05", "06"]
    # Feedback is windowed by when it was received: the store stamps it now.
    received = store.feedback_items()
    later = max(item["received_at"] for item in received) + timedelta(seconds=1)
    assert len(received) == 5
    assert store.feedback_items(since=later) == []
    assert len(store.feedback_items(until=later)) == 5


def test_report_window_flags(store, capsys):
    fill(store)
    main(
        [
            "report",
            "--database-url",
            command_url(store),
            "--json",
            "--since",
            "2026-12-04",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["calls"] == 0 and summary["duration_ms"] == {
        "p50": None,
        "p95": None,
    }
    assert summary["within_500ms"] is None


def test_empty_record(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    main(["report", "--database-url", url])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Hook calls: 0"
    assert out.splitlines()[-1] == "Duration: no calls recorded"


@pytest.mark.parametrize(
    "values, pct, expected",
    [([], 50, None), ([5.0], 95, 5.0), ([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 95, 4)],
)
def test_percentile_is_nearest_rank(values, pct, expected):
    assert percentile(values, pct) == expected


def test_hooks_we_do_not_serve_are_never_listed_by_name(store, capsys):
    store.record_call(
        {
            "hook_instance": "Zzyzx family 1931-07-19",
            "hook": "Zzyzxfamily-1931-07-19",
            "order_codes": [],
            "determinations": [],
            "card_summaries": [],
            "status": 400,
            "duration_ms": 1.0,
        }
    )
    # A row written before hooks were checked is not shown by name either.
    old_row = {"hook": "Zzyzxfamily-1931-07-19", "status": 400, "duration_ms": 1.0}
    old_row["determinations"] = []

    main(["report", "--database-url", command_url(store)])

    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["Hook calls: 1", "  unsupported: rejected (400) 1"]
    assert "Zzyzx" not in out
    assert summarise([old_row], [])["calls_by_hook"] == {
        "unsupported": {"rejected (400)": 1}
    }
