"""CRD coverage-information systemActions: one per judged order, within CRD rules."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from cards import CardOptions, build_response, check_coverage_information
from cards.coverage_information import (
    CoverageInformationError,
    check_unique_ids,
    coverage_information,
)
from cds_service.model import DataCategory

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"


def coverage_extensions(answer: dict) -> list[dict]:
    return [
        ext
        for action in answer.get("systemActions", [])
        for ext in action["resource"].get("extension", [])
        if ext["url"] == URL
    ]


def values(extension: dict) -> dict[str, list]:
    found: dict[str, list] = {}
    for sub in extension["extension"]:
        value = next(
            v for k, v in sub.items() if k.startswith("value") or k == "extension"
        )
        found.setdefault(sub["url"], []).append(value)
    return found


def assert_crd_rules(extension: dict) -> None:
    """The CRD rules checked independently of the code under test, plus its checker."""
    v = values(extension)
    assert v["coverage"][0]["reference"].startswith("Coverage/")
    assert len(v["covered"]) == 1 and len(v["date"]) == 1
    assert date.fromisoformat(v["date"][0])
    assert v["coverage-assertion-id"][0]
    covered = v["covered"][0]
    if covered == "not-covered":
        assert "pa-needed" not in v
    if covered == "conditional":
        assert v["info-needed"]
    if "info-needed" in v:
        assert covered == "conditional" or "conditional" in v.get("pa-needed", [])
    if covered == "indeterminate":
        assert v["reason"]
    if "OTH" in v.get("info-needed", []) or "doc-purpose" in v:
        assert v["reason"]
    assert check_coverage_information(extension) == []


def fixture_answers(client) -> list[tuple[str, str, dict]]:
    answers = []
    for path in sorted(FIXTURES.rglob("*.json")):
        body = json.loads(path.read_text())
        if not isinstance(body, dict) or body.get("hook") not in {
            "order-select",
            "order-sign",
        }:
            continue
        with client.post(
            f"/cds-services/pain-management-{body['hook']}", json=body
        ) as response:
            assert response.status_code == 200, path.name
            answers.append((path.stem, body["hook"], response.get_json()))
    return answers


def test_every_fixture_coverage_information_meets_the_crd_rules(client):
    answers = fixture_answers(client)
    ids = []
    assert sum(len(coverage_extensions(a)) for _, _, a in answers) >= 20
    for name, hook, answer in answers:
        for action in answer.get("systemActions", []):
            assert action["type"] == "update" and action["description"], name
        for extension in coverage_extensions(answer):
            assert_crd_rules(extension)
            if hook == "order-select":
                # CRD hook-19: secondary hooks never ask for documentation.
                assert "doc-needed" not in values(extension), name
            ids.append(values(extension)["coverage-assertion-id"][0])
    assert len(ids) == len(set(ids))


def respond(kit, determinations, hook="order-sign", unavailable=()):
    return build_response(
        determinations,
        hook=hook,
        options=CardOptions(),
        unavailable=set(unavailable),
        all_orders=[d.order for d in determinations],
    )


def test_not_covered_has_a_reason_and_no_pa_needed(kit):
    [extension] = coverage_extensions(respond(kit, [kit.facet_myofascial()]))
    assert extension["extension"] == [
        {"url": "coverage", "valueReference": {"reference": "Coverage/cov-1"}},
        {"url": "covered", "valueCode": "not-covered"},
        {
            "url": "billingCode",
            "valueCoding": {
                "system": "http://www.ama-assn.org/go/cpt",
                "code": "64493",
            },
        },
        {
            "url": "reason",
            "valueCodeableConcept": {
                "text": "Not covered under the Pain Management guideline: myofascial "
                "pain, where a facet block is not indicated"
            },
        },
        {"url": "date", "valueDate": "2026-12-03"},
        extension["extension"][-1],
    ]
    assert extension["extension"][-1]["url"] == "coverage-assertion-id"


def test_conditional_on_order_sign_asks_for_clinical_documentation(kit):
    [extension] = coverage_extensions(respond(kit, [kit.facet_pain_undocumented()]))
    v = values(extension)
    assert v["covered"] == ["conditional"]
    assert v["pa-needed"] == ["auth-needed"]
    assert v["doc-needed"] == ["clinical"]
    assert v["doc-purpose"] == ["withpa"]
    assert v["info-needed"] == ["OTH"]
    assert v["reason"] == [
        {"text": "Not documented: pain ≥6/10, recurrent or constant"}
    ]
    assert {
        "url": "value",
        "valueString": (
            "Document in the record and send with the prior authorization request: "
            "pain ≥6/10, recurrent or constant"
        ),
    } in v["detail"][0]


def test_order_select_never_signals_documentation_need(kit):
    answer = respond(kit, [kit.facet_pain_undocumented()], hook="order-select")
    [extension] = coverage_extensions(answer)
    v = values(extension)
    assert "doc-needed" not in v and "doc-purpose" not in v
    assert v["covered"] == ["conditional"] and v["info-needed"] == ["OTH"]


def test_covered_needs_prior_authorization(kit):
    [extension] = coverage_extensions(respond(kit, [kit.facet_documented()]))
    v = values(extension)
    assert v["covered"] == ["covered"] and v["pa-needed"] == ["auth-needed"]
    assert "info-needed" not in v and "reason" not in v


def test_indeterminate_when_data_could_not_be_had_has_reason_technical(kit):
    answer = respond(
        kit, [kit.conditions_unavailable()], unavailable={DataCategory.CONDITIONS}
    )
    [extension] = coverage_extensions(answer)
    assert values(extension)["covered"] == ["indeterminate"]
    assert values(extension)["reason"] == [
        {
            "coding": [
                {"system": TEMP, "code": "technical", "display": "Technical issues"}
            ],
            "text": "Patient data could not be retrieved: conditions",
        }
    ]


def test_inactive_coverage_is_not_covered_with_no_active_coverage(kit):
    expired = replace(kit.coverage, period_end=date(2026, 6, 30))
    determination = replace(kit.facet_documented(), coverage=expired)
    [extension] = coverage_extensions(respond(kit, [determination]))
    v = values(extension)
    assert v["covered"] == ["not-covered"] and "pa-needed" not in v
    assert v["reason"][0]["coding"][0]["code"] == "no-active-coverage"


def test_no_coverage_in_the_record_means_no_system_action(kit):
    # coverage is 1..1 in the extension: without a Coverage there is nothing valid to
    # send, and plain CDS Hooks clients (the sandbox) never send one.
    determination = replace(kit.facet_myofascial(), coverage=None)
    answer = respond(kit, [determination])
    assert "systemActions" not in answer
    assert len(answer["cards"]) == 1


def test_update_echoes_the_order_and_adds_only_the_extension(kit):
    order = kit.order(
        extension=[{"url": "http://example.org/other", "valueString": "x"}]
    )
    sent = copy.deepcopy(order.resource)
    determination = kit.facet_documented(order)
    [action] = respond(kit, [determination])["systemActions"]
    resource = action["resource"]
    assert order.resource == sent  # the request's order itself is left as it came
    assert resource["id"] == "sr-1" and resource["resourceType"] == "ServiceRequest"
    without = copy.deepcopy(resource)
    without["extension"] = [e for e in without["extension"] if e["url"] != URL]
    assert without == order.resource
    assert action["description"] == (
        "Record Facet joint or medial branch block coverage information on the order "
        "64493 lumbar/sacral facet injection"
    )


def test_an_earlier_assertion_for_the_same_coverage_is_replaced(kit):
    first = respond(kit, [kit.facet_documented()])["systemActions"][0]["resource"]
    order = kit.order(extension=first["extension"])
    again = respond(kit, [kit.facet_documented(order)])["systemActions"][0]["resource"]
    assert len([e for e in again["extension"] if e["url"] == URL]) == 1


def test_assertion_ids_are_unique_per_order_and_stable_per_assertion(kit):
    a = kit.facet_documented(kit.order(order_id="a"))
    b = kit.facet_documented(kit.order(order_id="b"))
    ids = [
        values(e)["coverage-assertion-id"][0]
        for e in coverage_extensions(respond(kit, [a, b]))
    ]
    assert len(set(ids)) == 2
    again = [
        values(e)["coverage-assertion-id"][0]
        for e in coverage_extensions(respond(kit, [a, b]))
    ]
    assert again == ids


def _valid(kit) -> dict:
    return coverage_information(kit.facet_pain_undocumented(), "f", hook="order-sign")


def _edit(extension: dict, url: str, value: dict | None) -> dict:
    edited = copy.deepcopy(extension)
    subs = [s for s in edited["extension"] if s["url"] != url]
    if value is not None:
        subs.insert(1, {"url": url, **value})
    edited["extension"] = subs
    return edited


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            lambda e: _edit(
                _edit(e, "covered", {"valueCode": "not-covered"}), "info-needed", None
            ),
            "not-covered must not carry pa-needed (crd-ci-q2)",
        ),
        (
            lambda e: _edit(e, "info-needed", None),
            "a conditional assertion needs info-needed (crd-ci-q3)",
        ),
        (
            lambda e: _edit(
                _edit(e, "reason", None), "covered", {"valueCode": "indeterminate"}
            ),
            "an indeterminate assertion needs a reason (crd-ci-q9)",
        ),
        (
            lambda e: _edit(e, "reason", None),
            "info-needed OTH needs a reason (crd-ci-q6)",
        ),
        (
            lambda e: _edit(e, "covered", {"valueCode": "maybe"}),
            "covered 'maybe' is not in its value set",
        ),
        (lambda e: _edit(e, "date", None), "date must appear exactly once"),
        (lambda e: _edit(e, "coverage", None), "coverage must appear exactly once"),
        (
            lambda e: _edit(e, "pa-needed", {"valueCode": "satisfied"}),
            "satisfied-pa-id iff pa-needed is satisfied (crd-ci-q5)",
        ),
    ],
)
def test_checker_names_each_broken_rule(kit, change, problem):
    valid = _valid(kit)
    assert check_coverage_information(valid) == []
    assert problem in check_coverage_information(change(valid))


def test_duplicate_assertion_ids_are_refused(kit):
    extension = _valid(kit)
    with pytest.raises(CoverageInformationError, match="not unique"):
        check_unique_ids([extension, copy.deepcopy(extension)])
