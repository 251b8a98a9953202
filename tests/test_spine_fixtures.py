"""The spine fixtures (fixtures/spine), judged via the record builder and over HTTP."""

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

SPINE = Path(__file__).resolve().parent.parent / "fixtures" / "spine"
MANIFEST = json.loads((SPINE / "manifest.json").read_text())["requests"]


def test_manifest_covers_every_spine_criterion(guideline):
    """Each spine criterion has a fixture where it fails; met is the covered cases."""
    failing = {cid for case in MANIFEST for cid in case["failing"]}
    rule_ids = {
        rule["id"]
        for entry in guideline.catalogue()
        for rule in entry["rules"]
        if rule["file"] in SPINE_RULE_FILES
    }
    assert rule_ids <= failing | {
        "image-guidance-required",
        "same-day-single-procedure",
    }
    states = {(cid, s) for case in MANIFEST for cid, s in case["failing"].items()}
    assert ("esi-indication", "not-met") in states
    assert ("esi-indication", "not-documented") in states
    assert {c["outcome"] for c in MANIFEST} == {
        "covered",
        "conditional",
        "not-covered",
        "indeterminate",
    }


@pytest.mark.parametrize("case", MANIFEST, ids=case_id)
def test_fixture_through_the_record_builder(case, guideline):
    body = json.loads((SPINE / case["file"]).read_text())
    record = record_of(body, guideline)
    dets = guideline.evaluate(
        record, orders_of(body), date.fromisoformat(EVALUATION_DATE)
    )
    (det,) = [d for d in dets if d.billing_code.code == case["order"]]
    assert det.outcome is Outcome(case["outcome"])
    assert {r.criterion_id: r.state.value for r in det.failing} == case["failing"]


@pytest.mark.parametrize("case", MANIFEST, ids=case_id)
def test_fixture_over_http(case, live_server, guideline):
    body = json.loads((SPINE / case["file"]).read_text())
    reply = post_order_sign(live_server, body)
    assert reply.status_code == 200, reply.text
    response = reply.json()
    order_id = f"{body['context']['patientId']}-order-{case['order']}"
    assert covered_value(response, order_id) == case["outcome"]
    unmet = unmet_rows(response, f"ServiceRequest/{order_id}", guideline)
    assert unmet == case["failing"]
