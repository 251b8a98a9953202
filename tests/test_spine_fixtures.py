"""The spine fixtures (fixtures/spine), judged via the record builder and over HTTP."""

import json
from datetime import date
from pathlib import Path

import pytest
import requests
from conftest import EVALUATION_DATE

from cds_service.model import Outcome
from cds_service.prefetch import QUERIES
from cds_service.record import UNAVAILABLE, build_record

SPINE = Path(__file__).resolve().parent.parent / "fixtures" / "spine"
MANIFEST = json.loads((SPINE / "manifest.json").read_text())["requests"]
# The rest of the guideline has its own fixtures (tests/test_fixtures_more.py).
SPINE_RULE_FILES = {
    "epidural-interlaminar.yaml",
    "epidural-transforaminal.yaml",
    "facet-block.yaml",
    "facet-denervation.yaml",
    "sacroiliac.yaml",
    "spine-limitations.yaml",
}
COVERAGE_INFORMATION = (
    "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
)


def _ids(case):
    return case["file"].removesuffix(".json")


def _orders(body):
    from cds_service.orders import orders_from_bundle

    context = body["context"]
    return orders_from_bundle(context["draftOrders"], context["selections"])


def _record(body, guideline):
    parts = {}
    for key, value in body["prefetch"].items():
        category = QUERIES[key][0]
        if isinstance(value, dict) and value.get("resourceType") == "OperationOutcome":
            value = UNAVAILABLE
        parts.setdefault(category, []).append(value)
    values = {c: v[0] if len(v) == 1 else tuple(v) for c, v in parts.items()}
    return build_record(
        values, guideline.is_relevant, patient_id=body["context"]["patientId"]
    )


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


@pytest.mark.parametrize("case", MANIFEST, ids=_ids)
def test_fixture_through_the_record_builder(case, guideline):
    body = json.loads((SPINE / case["file"]).read_text())
    record = _record(body, guideline)
    dets = guideline.evaluate(
        record, _orders(body), date.fromisoformat(EVALUATION_DATE)
    )
    (det,) = [d for d in dets if d.billing_code.code == case["order"]]
    assert det.outcome is Outcome(case["outcome"])
    assert {r.criterion_id: r.state.value for r in det.failing} == case["failing"]


def _covered_value(response: dict, order_id: str) -> str | None:
    for action in response.get("systemActions", []):
        resource = action.get("resource") or {}
        if resource.get("id") != order_id:
            continue
        for ext in resource.get("extension", []):
            if ext.get("url") == COVERAGE_INFORMATION:
                for sub in ext["extension"]:
                    if sub["url"] == "covered":
                        return sub["valueCode"]
    return None


def _unmet_from_card(response: dict, order_ref: str, guideline) -> dict[str, str]:
    """Criterion id -> state read from the criteria table of the order's card."""
    by_row = {}
    for entry in guideline.catalogue():
        for rule in entry["rules"]:
            label = " ".join(f"{rule['text']} ({rule['section']})".split())
            by_row[label] = rule["id"]
    states = {"**Not met**": "not-met", "**Not documented**": "not-documented"}
    found = {}
    for card in response.get("cards", []):
        refs = card.get("extension", {}).get("davinci-crd.associated-resource", [])
        if not refs:
            # The data card lists criteria that could not be checked as bullets.
            for line in card.get("detail", "").splitlines():
                if line.startswith("- ") and line[2:] in by_row:
                    found[by_row[line[2:]]] = "not-documented"
            continue
        if order_ref not in [r.get("reference") for r in refs]:
            continue
        for line in card.get("detail", "").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 3 and cells[0] in by_row:
                for label, state in states.items():
                    if cells[1].startswith(label):
                        found[by_row[cells[0]]] = state
    return found


@pytest.mark.parametrize("case", MANIFEST, ids=_ids)
def test_fixture_over_http(case, live_server, guideline):
    body = json.loads((SPINE / case["file"]).read_text())
    reply = requests.post(
        f"{live_server.url}/cds-services/pain-management-order-sign",
        json=body,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    response = reply.json()
    order_id = f"{body['context']['patientId']}-order-{case['order']}"
    assert _covered_value(response, order_id) == case["outcome"]
    unmet = _unmet_from_card(response, f"ServiceRequest/{order_id}", guideline)
    assert unmet == case["failing"]
