"""Lenient reading of real FHIR resources into the facts the guideline reads."""

from __future__ import annotations

import copy
import logging
from datetime import date

import pytest
from conftest import realdata

from cds_service.model import CodeSystem, Coding, DataCategory
from cds_service.record import UNAVAILABLE, build_record, observation_value

EDWARD = (
    "synthea-r4__edward499_clbp_subset_patient-conditions-procedures-meds-painscores"
    ".json"
)
RANDOLPH = "synthea-r4-2019__smart-generated-sample_chronic-pain_subset.json"


def everything(coding: Coding) -> bool:
    return True


def as_searchset(bundle: dict, resource_type: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": e["resource"]}
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == resource_type
        ],
    }


def test_synthea_patient_read_into_facts():
    bundle = realdata(EDWARD)
    values = {
        DataCategory.PATIENT: as_searchset(bundle, "Patient")["entry"][0]["resource"],
        DataCategory.CONDITIONS: as_searchset(bundle, "Condition"),
        DataCategory.PROCEDURES: as_searchset(bundle, "Procedure"),
        DataCategory.OBSERVATIONS: as_searchset(bundle, "Observation"),
        DataCategory.MEDICATIONS: (as_searchset(bundle, "MedicationRequest"), None),
        DataCategory.COVERAGE: None,
    }

    record = build_record(values, everything)

    assert record.patient_id == "0b575c00-26a1-6156-8ff8-369e3071bb77"
    assert (len(record.conditions), len(record.procedures)) == (12, 19)
    assert (len(record.observations), len(record.medications)) == (10, 53)
    assert record.retrieved == set(DataCategory)
    back_pain = next(c for c in record.conditions if c.text.startswith("Chronic low"))
    assert back_pain.reference == "Condition/b6ad9d27-95ec-6887-4ce3-4c2a5a9e1985"
    assert back_pain.codings == (
        Coding(CodeSystem.SNOMED, "278860009", "Chronic low back pain (finding)"),
    )
    assert back_pain.clinical_status == "active"
    assert back_pain.verification_status == "confirmed"
    # Recorded at 23:29 in UTC-5: the calendar date as recorded, not the UTC one.
    assert back_pain.onset == date(2014, 2, 5)
    therapy = [p for p in record.procedures if p.codings[0].code == "229064008"]
    assert [p.performed for p in therapy][:2] == [date(2014, 2, 8), date(2014, 2, 12)]
    assert therapy[0].performed_end == date(2014, 2, 9)
    assert therapy[0].status == "completed"
    scores = [(o.effective, o.value, o.unit) for o in record.observations][:3]
    assert scores == [
        (date(2011, 6, 21), 1.0, "{score}"),
        (date(2012, 6, 26), 1.0, "{score}"),
        (date(2013, 7, 2), 3.0, "{score}"),
    ]
    lisinopril = record.medications[0]
    assert (lisinopril.text, lisinopril.status, lisinopril.start) == (
        "lisinopril 10 MG Oral Tablet",
        "stopped",
        date(1985, 1, 21),
    )


def test_fractional_synthea_pain_scores_kept():
    bundle = realdata(RANDOLPH)

    record = build_record(
        {DataCategory.OBSERVATIONS: as_searchset(bundle, "Observation")}, everything
    )

    assert record.observations[0].value == pytest.approx(2.0090770497582584)
    assert record.observations[0].effective == date(1996, 6, 27)


def test_irrelevant_resources_are_skipped_before_validation():
    bundle = realdata(EDWARD)
    relevant = {"278860009", "72514-3"}

    record = build_record(
        {
            DataCategory.CONDITIONS: as_searchset(bundle, "Condition"),
            DataCategory.OBSERVATIONS: as_searchset(bundle, "Observation"),
            DataCategory.MEDICATIONS: as_searchset(bundle, "MedicationRequest"),
        },
        lambda coding: coding.code in relevant,
    )

    assert [c.text for c in record.conditions] == ["Chronic low back pain (finding)"]
    assert len(record.observations) == 10
    assert record.medications == []


def test_sandbox_quirks_are_repaired():
    order = realdata("cds-hooks-sandbox__rx-view_order-select_captured.json")
    request = copy.deepcopy(order["context"]["draftOrders"]["entry"][0]["resource"])
    request["authoredOn"] = "2026-12-03T09:15:00"  # no time zone
    request["futureElement"] = {"x": 1}

    record = build_record({DataCategory.MEDICATIONS: request}, everything)

    (medication,) = record.medications
    assert medication.reference == "MedicationRequest/request-123"
    assert medication.text == "Acetaminophen 80 MG Chewable Tablet [Tylenol]"
    assert medication.start == date(2026, 12, 3)
    # The caller's resource is not altered by the repairs.
    assert (
        request["reasonCode"]
        == order["context"]["draftOrders"]["entry"][0]["resource"]["reasonCode"]
    )


def test_invalid_entry_skipped_and_logged_by_id_only(caplog):
    bundle = realdata(EDWARD)
    conditions = as_searchset(bundle, "Condition")
    broken = conditions["entry"][0]["resource"]
    broken["onsetDateTime"] = "last spring"

    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        record = build_record({DataCategory.CONDITIONS: conditions}, everything)

    assert len(record.conditions) == 11
    # A relevant resource left out makes the problem list incomplete.
    assert record.unavailable == {DataCategory.CONDITIONS}
    assert record.retrieved == set()
    assert caplog.messages == [
        f"skipped invalid Condition/{broken['id']}: 1 validation error(s), "
        "first at onsetDateTime",
        "conditions treated as unavailable: an invalid Condition was skipped",
    ]


def test_partial_dates_and_bundle_without_type():
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "code": {
            "coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.16"}
            ]
        },
        "subject": {"reference": "Patient/1"},
        "onsetDateTime": "2023",
        "recordedDate": "2023-05",
    }
    bundle = {"resourceType": "Bundle", "entry": [{"resource": condition}]}

    record = build_record({DataCategory.CONDITIONS: bundle}, everything)

    (fact,) = record.conditions
    assert (fact.onset, fact.recorded) == (date(2023, 1, 1), date(2023, 5, 1))
    assert fact.codings == (Coding(CodeSystem.ICD10CM, "M54.16"),)
    assert fact.clinical_status is None


def score(**value) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
        **value,
    }


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        (score(valueInteger=7), (7.0, None, None)),
        (
            score(valueQuantity={"value": 6.5, "unit": "/10"}),
            (6.5, "/10", None),
        ),
        (
            score(
                valueCodeableConcept={
                    "coding": [{"system": "http://loinc.org", "code": "LA10139-6"}],
                    "text": "7",
                }
            ),
            (7.0, None, "7"),
        ),
        (score(valueString="7/10"), (7.0, None, "7/10")),
        (score(valueString="8 out of 10"), (8.0, None, "8 out of 10")),
        (score(valueString="severe"), (None, None, "severe")),
        (score(), (None, None, None)),
    ],
)
def test_pain_score_values(element, expected):
    assert observation_value(element) == expected


def test_peg_panel_scored_as_mean_of_its_items():
    def item(code, value):
        return {
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueInteger": value,
        }

    peg = {
        "resourceType": "Observation",
        "id": "peg-1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "91147-9"}]},
        "effectiveDateTime": "2026-11-01T10:00:00",
        "component": [item("75893-8", 7), item("91145-3", 6), item("91146-1", 8)],
    }

    (fact,) = build_record({DataCategory.OBSERVATIONS: peg}, everything).observations

    assert fact.value == 7.0
    assert fact.effective == date(2026, 11, 1)
    assert [(c[0][0].code, c[1]) for c in fact.components] == [
        ("75893-8", 7.0),
        ("91145-3", 6.0),
        ("91146-1", 8.0),
    ]


def test_same_resource_in_two_keys_counted_once():
    condition = realdata(EDWARD)["entry"][1]["resource"]

    record = build_record(
        {DataCategory.CONDITIONS: condition, DataCategory.PROCEDURES: condition},
        everything,
    )

    assert len(record.conditions) == 1


def test_unavailable_and_error_outcomes():
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception"}],
    }
    note = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational"}],
    }

    record = build_record(
        {
            DataCategory.CONDITIONS: UNAVAILABLE,
            DataCategory.PROCEDURES: outcome,
            DataCategory.OBSERVATIONS: note,
            DataCategory.MEDICATIONS: (None, UNAVAILABLE),
            DataCategory.COVERAGE: {"resourceType": "Bundle", "type": "searchset"},
        },
        everything,
    )

    assert record.unavailable == {
        DataCategory.CONDITIONS,
        DataCategory.PROCEDURES,
        DataCategory.MEDICATIONS,
    }
    assert record.retrieved == {DataCategory.OBSERVATIONS, DataCategory.COVERAGE}


def test_coverage_always_kept():
    coverage = {
        "resourceType": "Coverage",
        "id": "cov-1",
        "status": "active",
        "type": {"coding": [{"system": "https://nahdo.org/sopt", "code": "111"}]},
        "beneficiary": {"reference": "Patient/1"},
        "payor": [{"display": "EmblemHealth"}],
        "class": {
            "type": {"coding": [{"code": "plan"}]},
            "value": "VIP-ESS",
            "name": "VIP Essential (HMO)",
        },
        "period": {"start": "2026-01-01"},
    }

    record = build_record({DataCategory.COVERAGE: coverage}, lambda c: False)

    (fact,) = record.coverages
    assert fact.type_codings == (Coding(CodeSystem.SOP, "111"),)
    assert fact.plan_names == ("VIP-ESS", "VIP Essential (HMO)")
    assert fact.payor_names == ("EmblemHealth",)
    assert (fact.status, fact.period_start, fact.period_end) == (
        "active",
        date(2026, 1, 1),
        None,
    )


def test_whole_synthea_bundle_under_one_key_names_its_patient(guideline):
    resources = [entry["resource"] for entry in realdata(EDWARD)["entry"]]

    record = build_record({DataCategory.CONDITIONS: resources}, guideline.is_relevant)

    assert record.patient_id == "0b575c00-26a1-6156-8ff8-369e3071bb77"


def test_resources_about_another_patient_are_left_out(caplog):
    def score(n, subject):
        resource = {
            "resourceType": "Observation",
            "id": f"nrs-{n}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
            "effectiveDateTime": "2026-11-20",
            "valueInteger": n,
        }
        if subject is not None:
            resource["subject"] = {"reference": subject}
        return {"resource": resource}

    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            score(1, "Patient/p1"),
            score(2, "Patient/p2"),
            score(3, "https://ehr.example/fhir/Patient/p3/_history/2"),
            score(4, "https://ehr.example/fhir/Patient/p1"),
            score(5, "urn:uuid:3f0c5a4e-1f0e-4c7e-8d4b-2b1f1e0c9a77"),
            score(6, None),
        ],
    }

    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        record = build_record(
            {DataCategory.OBSERVATIONS: bundle}, everything, patient_id="p1"
        )

    assert [o.value for o in record.observations] == [1.0, 4.0, 5.0, 6.0]
    assert record.unavailable == set()
    assert caplog.messages == ["left out 2 resource(s) about another patient"]


def test_a_resource_changed_since_it_validated_is_checked_again(caplog):
    # Resources that validated unchanged are remembered by digest only, so an
    # order-select repeated with the same prefetch skips the costly model check;
    # the same resource with different content is never taken for it.
    bundle = realdata(EDWARD)
    conditions = as_searchset(bundle, "Condition")
    first = build_record(
        {DataCategory.CONDITIONS: copy.deepcopy(conditions)}, everything
    )
    again = build_record(
        {DataCategory.CONDITIONS: copy.deepcopy(conditions)}, everything
    )
    changed = copy.deepcopy(conditions)
    broken = changed["entry"][0]["resource"]
    broken["onsetDateTime"] = "last spring"

    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        after = build_record({DataCategory.CONDITIONS: changed}, everything)

    assert again.conditions == first.conditions
    assert len(first.conditions) == 12
    assert len(after.conditions) == 11
    assert caplog.messages[0] == (
        f"skipped invalid Condition/{broken['id']}: 1 validation error(s), "
        "first at onsetDateTime"
    )


def test_relevance_of_a_coding_is_asked_once_across_calls():
    # The guideline keeps the answers from call to call: a second call with the
    # same history asks nothing, and only codings (never resources) are keys.
    bundle = realdata(EDWARD)
    values = {DataCategory.OBSERVATIONS: as_searchset(bundle, "Observation")}
    asked = []

    def is_relevant(coding: Coding) -> bool:
        asked.append(coding.code)
        return coding.code == "72514-3"

    answers: dict = {}
    first = build_record(copy.deepcopy(values), is_relevant, answers=answers)
    distinct = len(asked)
    again = build_record(copy.deepcopy(values), is_relevant, answers=answers)

    assert distinct == len(set(asked)) == len(answers) > 0
    assert len(asked) == distinct  # nothing asked the second time
    assert [o.value for o in again.observations] == [
        o.value for o in first.observations
    ]
    assert all(len(key) == 3 and isinstance(key[1], str) for key in answers)


def test_a_coding_with_text_no_vocabulary_has_is_asked_but_not_kept():
    # Kept answers are bounded in size: a made-up display of a megabyte per call
    # must not pile up in the process from call to call.
    def heart_rate(display: str) -> dict:
        coding = {"system": "http://loinc.org", "code": "8867-4", "display": display}
        return {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [coding]},
        }

    asked = []
    answers: dict = {}
    for display in ("x" * 10**6, "Heart rate"):
        build_record(
            {DataCategory.OBSERVATIONS: heart_rate(display)},
            lambda coding: asked.append(len(coding.display)) or False,
            answers=answers,
        )

    assert asked == [10**6, len("Heart rate")]
    assert answers == {("http://loinc.org", "8867-4", "Heart rate"): False}


def test_a_coding_of_the_wrong_type_is_validated_not_passed_over(caplog):
    # A system that is not a string names nothing the screen can look up; the
    # resource is validated, fails, and the conditions count as incomplete rather
    # than as a record without the condition (which would let an exclusion pass).
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "code": {"coding": [{"system": 1, "code": "M79.18"}]},
    }

    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        record = build_record({DataCategory.CONDITIONS: condition}, lambda c: False)

    assert record.conditions == []
    assert record.unavailable == {DataCategory.CONDITIONS}
    assert caplog.messages == [
        "skipped invalid Condition/c1: 2 validation error(s), first at "
        "code.coding.0.system",
        "conditions treated as unavailable: an invalid Condition was skipped",
    ]


@pytest.mark.parametrize(
    "bundle",
    [
        {"resourceType": "Bundle", "entry": "x"},
        {"resourceType": "Bundle", "entry": [{"resource": 1}]},
        {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": 1}}]},
    ],
)
def test_bundle_entries_that_are_not_resources_leave_the_category_unknown(
    bundle, caplog
):
    with caplog.at_level(logging.WARNING, logger="cds_service.record"):
        record = build_record({DataCategory.CONDITIONS: bundle}, lambda c: True)

    assert record.unavailable == {DataCategory.CONDITIONS}
    assert record.retrieved == set()
    assert record.conditions == []
    assert caplog.messages == ["prefetch value holds entries that are not resources"]
