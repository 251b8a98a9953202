"""Absent, partial or another patient's data is never read as a complete record."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from conftest import FIXTURES

SIGN = "/cds-services/pain-management-order-sign"
# A 62323 epidural whose current myofascial pain syndrome excludes it.
EXCLUDED = json.loads((FIXTURES / "spine" / "esi-myofascial-excluded.json").read_text())
MYOFASCIAL_TEXT = (
    "When the low back pain comes from myofascial pain syndrome or another "
    "soft-tissue source, there is no nerve root pathology and an epidural injection "
    "would be ineffective. (Limitations 1: myofascial pain syndrome)"
)
ORDER = "62323 lumbar/sacral epidural, image-guided"


def excluded_request() -> dict:
    return copy.deepcopy(EXCLUDED)


def coverage_values(body: dict) -> dict[str, object]:
    """The coverage-information sub-extensions of the one systemAction, by url."""
    (action,) = body["systemActions"]
    (extension,) = action["resource"]["extension"]
    return {
        sub["url"]: next((v for k, v in sub.items() if k.startswith("value")), None)
        for sub in extension["extension"]
    }


def record_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cds_service.record"]


def criterion_row(card: dict, text: str) -> str:
    (row,) = [
        line for line in card["detail"].splitlines() if line.startswith(f"| {text}")
    ]
    return row


def test_the_fixture_is_not_covered_as_sent(client):
    response = client.post(SIGN, json=excluded_request())

    assert response.status_code == 200
    assert coverage_values(response.get_json())["covered"] == "not-covered"


# --- a missing datum is not documented, never met ------------------------------------


@pytest.mark.parametrize(
    "conditions",
    [None, {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}],
    ids=["null", "empty-bundle"],
)
def test_no_problem_list_leaves_the_exclusion_not_documented(client, conditions):
    body = excluded_request()
    body["prefetch"]["conditions"] = conditions

    answer = client.post(SIGN, json=body).get_json()

    (card,) = answer["cards"]
    assert card["summary"] == (
        f"Document for {ORDER}: radicular or discogenic pain (+1 more)"
    )
    assert criterion_row(card, MYOFASCIAL_TEXT) == (
        f"| {MYOFASCIAL_TEXT} | **Not documented** | The record holds no coded "
        "conditions, so the absence of myofascial pain syndrome cannot be confirmed. |"
    )
    assert coverage_values(answer)["covered"] == "conditional"


# --- partial data is unavailable data ------------------------------------------------


def test_an_invalid_relevant_condition_makes_the_problem_list_unavailable(
    client, caplog
):
    body = excluded_request()
    body["prefetch"]["conditions"]["entry"][0]["resource"]["onsetDateTime"] = "str"

    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        answer = client.post(SIGN, json=body).get_json()

    values = coverage_values(answer)
    assert values["covered"] == "indeterminate"
    assert values["reason"] == {
        "coding": [
            {
                "system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp",
                "code": "technical",
                "display": "Technical issues",
            }
        ],
        "text": "Patient data could not be retrieved: conditions",
    }
    (card,) = answer["cards"]
    assert card["summary"] == (
        f"Coverage not fully checked for {ORDER}: problem list (conditions) unavailable"
    )
    assert f"- {MYOFASCIAL_TEXT}" in card["detail"].splitlines()
    assert record_log(caplog) == [
        "skipped invalid Condition/spine-esi-myofascial-condition-4: 1 validation "
        "error(s), first at onsetDateTime",
        "conditions treated as unavailable: an invalid Condition was skipped",
    ]


def test_a_prefetch_page_on_another_server_makes_the_category_unavailable(
    client, caplog
):
    body = excluded_request()
    body["prefetch"]["conditions"]["link"] = [
        {"relation": "next", "url": "https://elsewhere.example/fhir/Condition?page=2"}
    ]

    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        answer = client.post(SIGN, json=body).get_json()

    assert coverage_values(answer)["covered"] == "indeterminate"
    assert [card["summary"] for card in answer["cards"]] == [
        f"Coverage not fully checked for {ORDER}: problem list (conditions) unavailable"
    ]
    assert record_log(caplog) == [
        "conditions treated as unavailable: its next page is not on fhirServer"
    ]


# --- another patient's data ----------------------------------------------------------


def test_a_condition_of_another_patient_is_left_out(client, caplog):
    body = excluded_request()
    condition = body["prefetch"]["conditions"]["entry"][0]["resource"]
    condition["subject"] = {"reference": "Patient/someone-else-42"}

    with caplog.at_level(logging.DEBUG):
        answer = client.post(SIGN, json=body).get_json()

    # The myofascial diagnosis was someone else's: nothing excludes the epidural.
    assert coverage_values(answer)["covered"] == "conditional"
    assert "left out 1 resource(s) about another patient" in caplog.messages
    assert "someone-else-42" not in caplog.text


def test_a_condition_whose_patient_cannot_be_compared_is_kept(client):
    body = excluded_request()
    condition = body["prefetch"]["conditions"]["entry"][0]["resource"]
    condition["subject"] = {
        "reference": "urn:uuid:8f6c1e9a-5d7b-4c1e-9d2f-0a1b2c3d4e5f"
    }

    answer = client.post(SIGN, json=body).get_json()

    assert coverage_values(answer)["covered"] == "not-covered"


# --- coverage that could not be had --------------------------------------------------


def test_coverage_that_could_not_be_had_is_named_in_a_card(client):
    body = excluded_request()
    body["prefetch"]["coverage"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception"}],
    }

    answer = client.post(SIGN, json=body).get_json()

    # No Coverage: no coverage-information action, and a card saying why.
    assert "systemActions" not in answer
    exclusion, data = [card["summary"] for card in answer["cards"]]
    assert exclusion.startswith(f"Remove {ORDER}, not covered: myofascial pain")
    assert data == (
        f"Coverage not fully checked for {ORDER}: insurance coverage unavailable"
    )
    assert answer["cards"][1]["detail"] == (
        "The insurance coverage could not be retrieved from the EHR's FHIR server, "
        "so no coverage information could be recorded on the order. Calling again "
        "once the EHR is reachable may give a complete answer.\n\n"
        f"**{ORDER}** (Epidural injection, interlaminar or caudal)\n\n"
        "- No coverage information is recorded on the order: the patient's "
        "insurance coverage could not be retrieved."
    )
