"""The fixtures of the rest of the guideline (fixtures/more), judged and over HTTP."""

import json
from datetime import date
from pathlib import Path

import pytest
from conftest import EVALUATION_DATE
from fixture_runs import (
    SPINE_RULE_FILES,
    case_id,
    covered_value,
    orders_of,
    post_order_sign,
    record_of,
    unmet_rows,
)

from cds_service.model import Outcome

MORE = Path(__file__).resolve().parent.parent / "fixtures" / "more"
MANIFEST = json.loads((MORE / "manifest.json").read_text())["requests"]
# Rules that are met in every fixture where they apply, by construction: their
# "not met" branch needs a date before the evaluation date the service is pinned to
# (tested in test_rules_more.py) or is the met row of a rule shown as a criterion.
NEVER_FAILING_OVER_HTTP = {"axon-therapy-before-effective-date"}


def _body(case):
    return json.loads((MORE / case["file"]).read_text())


def test_every_new_rule_fails_in_some_fixture(guideline):
    """Each rule beyond the spine has a fixture where it is not met or not
    documented; the met branch is in the covered fixtures and the rows shown met."""
    rules = {
        rule["id"]
        for entry in guideline.catalogue()
        for rule in entry["rules"]
        if rule["file"] not in SPINE_RULE_FILES
    }
    failing = {cid for case in MANIFEST for cid in case["failing"]}
    assert rules - failing == NEVER_FAILING_OVER_HTTP
    assert {c["outcome"] for c in MANIFEST} == {
        "covered",
        "conditional",
        "not-covered",
        "indeterminate",
    }


@pytest.mark.parametrize("case", MANIFEST, ids=case_id)
def test_fixture_through_the_record_builder(case, guideline):
    body = _body(case)
    determinations = guideline.evaluate(
        record_of(body, guideline), orders_of(body), date.fromisoformat(EVALUATION_DATE)
    )
    (judged,) = [
        d for d in determinations if d.order.reference.endswith("/" + case["order_id"])
    ]
    assert judged.billing_code.code == case["order"]
    assert judged.outcome is Outcome(case["outcome"])
    assert {r.criterion_id: r.state.value for r in judged.failing} == case["failing"]


@pytest.mark.parametrize("case", MANIFEST, ids=case_id)
def test_fixture_over_http(case, live_server, guideline):
    body = _body(case)
    reply = post_order_sign(live_server, body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert covered_value(answer, case["order_id"]) == case["outcome"]
    order_ref = f"ServiceRequest/{case['order_id']}"
    assert unmet_rows(answer, order_ref, guideline) == case["failing"]
