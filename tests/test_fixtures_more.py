"""The fixtures of the rest of the guideline (fixtures/more), judged and over HTTP."""

import json
from datetime import date
from pathlib import Path

import pytest
import requests
from conftest import EVALUATION_DATE

from cds_service.model import Outcome
from cds_service.orders import orders_from_bundle
from cds_service.prefetch import QUERIES
from cds_service.record import UNAVAILABLE, build_record

MORE = Path(__file__).resolve().parent.parent / "fixtures" / "more"
MANIFEST = json.loads((MORE / "manifest.json").read_text())["requests"]
COVERAGE_INFORMATION = (
    "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
)
SPINE_FILES = {
    "epidural-interlaminar.yaml",
    "epidural-transforaminal.yaml",
    "facet-block.yaml",
    "facet-denervation.yaml",
    "sacroiliac.yaml",
    "spine-limitations.yaml",
}
# Rules that are met in every fixture where they apply, by construction: their
# "not met" branch needs a date before the evaluation date the service is pinned to
# (tested in test_rules_more.py) or is the met row of a rule shown as a criterion.
NEVER_FAILING_OVER_HTTP = {"axon-therapy-before-effective-date"}


def _name(case):
    return case["file"].removesuffix(".json")


def _body(case):
    return json.loads((MORE / case["file"]).read_text())


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


def test_every_new_rule_fails_in_some_fixture(guideline):
    """Each rule beyond the spine has a fixture where it is not met or not
    documented; the met branch is in the covered fixtures and the rows shown met."""
    rules = {
        rule["id"]
        for entry in guideline.catalogue()
        for rule in entry["rules"]
        if rule["file"] not in SPINE_FILES
    }
    failing = {cid for case in MANIFEST for cid in case["failing"]}
    assert rules - failing == NEVER_FAILING_OVER_HTTP
    assert {c["outcome"] for c in MANIFEST} == {
        "covered",
        "conditional",
        "not-covered",
        "indeterminate",
    }


@pytest.mark.parametrize("case", MANIFEST, ids=_name)
def test_fixture_through_the_record_builder(case, guideline):
    body = _body(case)
    context = body["context"]
    orders = orders_from_bundle(context["draftOrders"], context["selections"])
    determinations = guideline.evaluate(
        _record(body, guideline), orders, date.fromisoformat(EVALUATION_DATE)
    )
    (judged,) = [
        d for d in determinations if d.order.reference.endswith("/" + case["order_id"])
    ]
    assert judged.billing_code.code == case["order"]
    assert judged.outcome is Outcome(case["outcome"])
    assert {r.criterion_id: r.state.value for r in judged.failing} == case["failing"]


def _covered(response: dict, order_id: str) -> str | None:
    for action in response.get("systemActions", []):
        resource = action.get("resource") or {}
        if resource.get("id") != order_id:
            continue
        for extension in resource.get("extension", []):
            if extension.get("url") == COVERAGE_INFORMATION:
                for sub in extension["extension"]:
                    if sub["url"] == "covered":
                        return sub["valueCode"]
    return None


def _unmet_rows(response: dict, order_ref: str, guideline) -> dict[str, str]:
    """Criterion id -> state, read from the criteria table of the order's card and
    from the bullets of the data card (criteria that could not be checked)."""
    by_row = {}
    for entry in guideline.catalogue():
        for rule in entry["rules"]:
            by_row[" ".join(f"{rule['text']} ({rule['section']})".split())] = rule["id"]
    labels = {"**Not met**": "not-met", "**Not documented**": "not-documented"}
    found = {}
    for card in response.get("cards", []):
        refs = card.get("extension", {}).get("davinci-crd.associated-resource", [])
        lines = card.get("detail", "").splitlines()
        if not refs:
            for line in lines:
                if line.startswith("- ") and line[2:] in by_row:
                    found[by_row[line[2:]]] = "not-documented"
            continue
        if order_ref not in [r.get("reference") for r in refs]:
            continue
        for line in lines:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 3 and cells[0] in by_row:
                for label, state in labels.items():
                    if cells[1].startswith(label):
                        found[by_row[cells[0]]] = state
    return found


@pytest.mark.parametrize("case", MANIFEST, ids=_name)
def test_fixture_over_http(case, live_server, guideline):
    body = _body(case)
    reply = requests.post(
        f"{live_server.url}/cds-services/pain-management-order-sign",
        json=body,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert _covered(answer, case["order_id"]) == case["outcome"]
    order_ref = f"ServiceRequest/{case['order_id']}"
    assert _unmet_rows(answer, order_ref, guideline) == case["failing"]
