"""Feedback endpoint: CDS Hooks 2.0 validation, storage and duplicates."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from flask import Flask

from cds_service import feedback, storage
from cds_service.errors import register_error_handlers

CARD = "0f6c1b52-6f5e-5d3e-9c0e-2b1b3c4d5e6f"
URL = "/cds-services/pain-management-order-sign/feedback"


@pytest.fixture
def feedback_client(store):
    """The feedback blueprint on a bare app writing to the parametrised store."""
    app = Flask(__name__)
    register_error_handlers(app)
    storage.init_app(app, store=store)
    app.register_blueprint(feedback.blueprint)
    return app.test_client()


def accepted(card=CARD, when="2026-12-03T18:20:05Z"):
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": "7d3bd1f0-1c1e-5c57-9a0e-41c4cf6b0d1a"}],
        "outcomeTimestamp": when,
    }


def overridden(card=CARD, when="2026-12-03T18:21:00Z", **reason):
    return {
        "card": card,
        "outcome": "overridden",
        "overrideReason": {
            "reason": reason
            or {
                "system": "urn:pain-cds:override-reason",
                "code": "documented-elsewhere",
                "display": "Criteria are documented outside this record",
            },
            "userComment": "PT notes are in the scanned chart",
        },
        "outcomeTimestamp": when,
    }


def post(client, body):
    with client.post(URL, json=body) as response:
        return response.status_code, response.get_json()


def test_feedback_items_are_stored_as_sent(feedback_client, store):
    status, body = post(feedback_client, {"feedback": [accepted(), overridden()]})

    assert (status, body) == (200, {"received": 2, "stored": 2})
    rows = store.feedback_items()
    assert [(r["card"], r["outcome"]) for r in rows] == [
        (CARD, "accepted"),
        (CARD, "overridden"),
    ]
    assert rows[0]["accepted_suggestions"] == ["7d3bd1f0-1c1e-5c57-9a0e-41c4cf6b0d1a"]
    assert rows[0]["outcome_timestamp"] == datetime(2026, 12, 3, 18, 20, 5, tzinfo=UTC)
    assert rows[1]["override_code"] == "documented-elsewhere"
    assert rows[1]["override_display"] == "Criteria are documented outside this record"
    assert rows[1]["user_comment"] == "PT notes are in the scanned chart"
    assert rows[0]["service"] == "pain-management-order-sign"


def test_a_duplicate_is_accepted_but_stored_once(feedback_client, store):
    assert post(feedback_client, {"feedback": [accepted()]}) == (
        200,
        {"received": 1, "stored": 1},
    )
    assert post(feedback_client, {"feedback": [accepted(), accepted()]}) == (
        200,
        {"received": 2, "stored": 0},
    )
    assert len(store.feedback_items()) == 1


def test_the_same_card_may_get_feedback_again_later(feedback_client, store):
    post(feedback_client, {"feedback": [overridden(when="2026-12-03T18:00:00Z")]})
    post(feedback_client, {"feedback": [overridden(when="2026-12-03T18:30:00Z")]})
    assert len(store.feedback_items()) == 2


def test_timestamps_with_an_offset_are_stored_in_utc(feedback_client, store):
    post(feedback_client, {"feedback": [accepted(when="2026-12-03T13:20:05-05:00")]})
    assert store.feedback_items()[0]["outcome_timestamp"] == datetime(
        2026, 12, 3, 18, 20, 5, tzinfo=UTC
    )


def test_sandbox_override_reason_without_display_is_accepted(feedback_client, store):
    # The CDS Hooks sandbox sends overrideReason.reason with code and system only.
    item = overridden(system="urn:pain-cds:override-reason", code="clinical-judgement")
    assert post(feedback_client, {"feedback": [item]})[0] == 200
    assert store.feedback_items()[0]["override_display"] is None


def test_unknown_members_are_ignored(feedback_client, store):
    item = accepted() | {"extension": {"com.example.ehr": {"user": "x"}}}
    assert post(feedback_client, {"feedback": [item], "extra": 1})[0] == 200


def test_every_wrong_field_is_named(feedback_client, store):
    status, outcome = post(
        feedback_client,
        {
            "feedback": [
                {"card": "", "outcome": "ignored", "outcomeTimestamp": "yesterday"},
                {"card": CARD, "outcome": "accepted", "outcomeTimestamp": "2026-12-03"},
                {
                    "card": CARD,
                    "outcome": "overridden",
                    "overrideReason": {"reason": {"code": "x"}},
                    "outcomeTimestamp": "2026-12-03T18:00:00",
                },
            ]
        },
    )

    assert status == 400
    assert outcome["resourceType"] == "OperationOutcome"
    where = sorted(issue["expression"][0] for issue in outcome["issue"])
    assert where == [
        "feedback[0].card",
        "feedback[0].outcome",
        "feedback[0].outcomeTimestamp",
        "feedback[1].acceptedSuggestions",
        "feedback[1].outcomeTimestamp",
        "feedback[2].outcomeTimestamp",
        "feedback[2].overrideReason.reason.system",
    ]
    messages = {i["expression"][0]: i["diagnostics"] for i in outcome["issue"]}
    assert messages["feedback[0].outcome"] == (
        "feedback[0].outcome: Must be one of: accepted, overridden."
    )
    assert messages["feedback[1].acceptedSuggestions"] == (
        "feedback[1].acceptedSuggestions: required when outcome is accepted"
    )
    assert store.feedback_items() == []


@pytest.mark.parametrize(
    "body, expression, message",
    [
        ({}, "feedback", "feedback: Missing data for required field."),
        ({"feedback": []}, "feedback", "feedback: must list at least one item"),
        ({"feedback": "x"}, "feedback", "feedback: Not a valid list."),
        ([accepted()], "$", "must be a JSON object"),
    ],
)
def test_malformed_bodies_are_400(feedback_client, body, expression, message):
    status, outcome = post(feedback_client, body)
    assert status == 400
    assert outcome["issue"][0]["expression"] == [expression]
    assert outcome["issue"][0]["diagnostics"] == message


def test_non_json_body_is_415(feedback_client):
    with feedback_client.post(URL, data="card=x", content_type="text/plain") as r:
        assert r.status_code == 415
        assert r.get_json()["issue"][0]["code"] == "not-supported"


def test_invalid_json_body_is_400(feedback_client):
    with feedback_client.post(URL, data="{", content_type="application/json") as r:
        assert r.status_code == 400
        assert r.get_json()["issue"][0]["code"] == "structure"


def test_feedback_for_an_unknown_service_is_404(client):
    with client.post(
        "/cds-services/no-such-service/feedback", json={"feedback": [accepted()]}
    ) as response:
        assert response.status_code == 404


def test_feedback_through_the_service(client, app):
    with client.post(URL, json={"feedback": [accepted()]}) as response:
        assert response.status_code == 200
    assert len(app.extensions["store"].feedback_items()) == 1


def test_more_items_than_the_cap_are_refused_before_validation(feedback_client, store):
    items = [accepted(when=f"2026-12-03T18:{m:02d}:00Z") for m in range(50)] * 3

    status, outcome = post(feedback_client, {"feedback": items})

    assert status == 400
    assert outcome["issue"] == [
        {
            "severity": "error",
            "code": "too-costly",
            "diagnostics": "feedback: at most 100 items per call, not 150; "
            "send the rest in further calls",
            "expression": ["feedback"],
        }
    ]
    assert store.feedback_items() == []


def test_the_cap_is_a_setting(client, app, monkeypatch):
    from cds_service.api import EXTENSION_KEY

    state = app.extensions[EXTENSION_KEY]
    monkeypatch.setattr(state.settings, "max_feedback_items", 2)
    items = [accepted(when=f"2026-12-03T18:0{m}:00Z") for m in range(3)]
    with client.post(URL, json={"feedback": items}) as response:
        assert response.status_code == 400
        assert response.get_json()["issue"][0]["diagnostics"].startswith(
            "feedback: at most 2 items per call, not 3"
        )
    with client.post(URL, json={"feedback": items[:2]}) as response:
        assert response.get_json() == {"received": 2, "stored": 2}


def test_a_card_that_is_not_a_uuid_is_named(feedback_client, store):
    status, outcome = post(
        feedback_client,
        {"feedback": [accepted(), accepted(card="Zzyzx family 1931-07-19")]},
    )

    assert status == 400
    assert [(i["expression"], i["diagnostics"]) for i in outcome["issue"]] == [
        (
            ["feedback[1].card"],
            "feedback[1].card: must be the uuid of a card we returned",
        )
    ]
    assert store.feedback_items() == []


def test_accepted_suggestions_on_an_override_are_refused(feedback_client, store):
    item = overridden() | {"acceptedSuggestions": [{"id": CARD}]}

    status, outcome = post(feedback_client, {"feedback": [item]})

    assert status == 400
    assert [(i["expression"], i["diagnostics"]) for i in outcome["issue"]] == [
        (
            ["feedback[0].acceptedSuggestions"],
            "feedback[0].acceptedSuggestions: not allowed when outcome is overridden",
        )
    ]


def test_a_full_batch_is_stored_in_one_statement(feedback_client, store):
    import sqlalchemy as sa

    items = [accepted(when=f"2026-12-03T18:{m:02d}:00Z") for m in range(60)]
    items += [overridden(when=f"2026-12-03T19:{m:02d}:00Z") for m in range(40)]
    inserts = []

    def count(conn, cursor, statement, parameters, context, executemany):
        words = statement.split()
        if words[:2] == ["INSERT", "INTO"] and words[2].endswith("cds_feedback"):
            inserts.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        status, body = post(feedback_client, {"feedback": items})
        again = post(feedback_client, {"feedback": items[:10]})
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)

    assert (status, body) == (200, {"received": 100, "stored": 100})
    assert again == (200, {"received": 10, "stored": 0})
    assert len(inserts) == 2  # one per call, not one per item
    assert len(store.feedback_items()) == 100


def test_a_null_body_must_be_an_object(feedback_client):
    with feedback_client.post(URL, data="null", content_type="application/json") as r:
        assert r.status_code == 400
        assert r.get_json()["issue"][0]["diagnostics"] == "must be a JSON object"
