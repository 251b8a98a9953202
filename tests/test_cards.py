"""Cards: one per order and problem, within the CDS Hooks 2.0 and CRD card rules."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from cards import (
    CardOptions,
    build_response,
    content,
    discovery_extension,
    order_fingerprint,
)
from cds_service.model import DataCategory

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CARD_TYPES = {
    "coverage-info",
    "unsolicited-determ",
    "claim",
    "insurance",
    "limits",
    "network",
    "appropriate-use",
    "cost",
    "therapy-alternatives-opt",
    "therapy-alternatives-req",
    "clinical-reminder",
    "duplicate-therapy",
    "contraindication",
    "guideline",
    "off-guideline",
}
L33622 = (
    "https://www.cms.gov/medicare-coverage-database/view/lcd.aspx?lcdid=33622&ver=31"
    "&keyword=Pain+Management&keywordType=starts&areald=all&docType=NCA%2cCAL%2cNCD"
    "%2cMEDCAC%2cTA%2cMCD%2c6%2c3%2c5%2c1%2cF%2cP&contractOption=name"
    "&contractorName=1&sortBy=relevance&bc=1"
)
L36850 = (
    "https://www.cms.gov/medicare-coverage-database/details/lcd-details.aspx"
    "?LCDId=36850&ver=24&Date=&DocID=L36850&bc=iAAAABAAIAAA"
)


def fixture_requests() -> list[Path]:
    paths = []
    for path in sorted(FIXTURES.rglob("*.json")):
        body = json.loads(path.read_text())
        if isinstance(body, dict) and body.get("hook") in {
            "order-select",
            "order-sign",
        }:
            paths.append(path)
    return paths


def assert_no_empty_values(value, where="response"):
    """CDS Hooks 2.0: no null, "", [] or {} (the empty `cards` list excepted)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert item not in (None, "", [], {}), f"{where}.{key} is empty"
            assert_no_empty_values(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert item not in (None, "", [], {}), f"{where}[{index}] is empty"
            assert_no_empty_values(item, f"{where}[{index}]")


def assert_valid_card(card: dict) -> None:
    """Every constraint CDS Hooks 2.0 and CRD 2.2 put on a card."""
    assert_no_empty_values(card, "card")
    assert uuid.UUID(card["uuid"])  # CRD 2.2 cards carry a uuid (feedback needs it)
    summary = card["summary"]
    assert isinstance(summary, str) and 0 < len(summary) < 140, summary
    assert "\n" not in summary
    assert card["indicator"] in {"info", "warning"}  # never critical for coverage
    source = card["source"]
    assert source["label"]
    topic = source["topic"]
    assert topic["system"] == "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
    assert topic["code"] in CARD_TYPES and topic["display"]
    assert isinstance(card.get("detail", ""), str)
    for link in card.get("links", []):
        assert set(link) <= {"label", "url", "type", "appContext", "autolaunchable"}
        assert link["label"] and link["type"] == "absolute"
        assert link["url"].startswith("https://")
    if "suggestions" in card:
        assert card["selectionBehavior"] in {"at-most-one", "any"}
        for suggestion in card["suggestions"]:
            assert suggestion["label"]
            assert uuid.UUID(suggestion["uuid"])  # CRD resp-3
            for action in suggestion["actions"]:
                assert action["type"] in {"create", "update", "delete"}
                assert action["description"]
                if action["type"] in {"create", "update"}:
                    assert action["resource"]["resourceType"]
                if action["type"] == "delete":
                    assert action["resourceId"].count("/") == 1
    else:
        assert "selectionBehavior" not in card
    for reason in card.get("overrideReasons", []):
        assert reason["code"] and reason["system"] and reason["display"]


def respond(kit, determinations, hook="order-sign", options=None, **kwargs):
    orders = kwargs.pop("all_orders", [d.order for d in determinations])
    return build_response(
        determinations,
        hook=hook,
        options=options or CardOptions(),
        unavailable=kwargs.pop("unavailable", set()),
        all_orders=orders,
        patient_id=kwargs.pop("patient_id", None),
    )


# --- every card the fixtures produce ----------------------------------------------


@pytest.mark.parametrize("path", fixture_requests(), ids=lambda p: p.stem)
def test_every_fixture_card_meets_the_specification(client, path):
    body = json.loads(path.read_text())
    with client.post(f"/cds-services/pain-management-{body['hook']}", json=body) as r:
        answer = r.get_json()
    assert r.status_code == 200, answer
    assert set(answer) <= {"cards", "systemActions"}
    assert_no_empty_values({k: v for k, v in answer.items() if k != "cards"})
    uuids = [card["uuid"] for card in answer["cards"]]
    assert len(uuids) == len(set(uuids))
    # Clinicians have none of the project's reference files to look things up in.
    assert [c["uuid"] for c in answer["cards"] if "codes.md" in str(c)] == []
    for card in answer["cards"]:
        assert_valid_card(card)


def test_fixture_set_is_not_empty():
    # The spec test above is only as good as the fixtures it runs over.
    assert len(fixture_requests()) >= 20


@pytest.mark.parametrize(
    "case",
    [
        "facet_myofascial",
        "facet_pain_undocumented",
        "facet_radiculopathy",
        "blind_epidural_after_failure",
        "conditions_unavailable",
        "facet_documented",
    ],
)
def test_every_kind_of_card_meets_the_specification(kit, case):
    determination = getattr(kit, case)()
    options = CardOptions().configured({"guideline": True})
    answer = respond(
        kit, [determination], options=options, unavailable={DataCategory.CONDITIONS}
    )
    assert answer["cards"]
    for card in answer["cards"]:
        assert_valid_card(card)


# --- what each card says ------------------------------------------------------------


def test_exclusion_card_names_order_and_problem_and_offers_removal(kit):
    card = respond(kit, [kit.facet_myofascial()])["cards"][0]

    assert card["summary"] == (
        "Remove 64493 lumbar/sacral facet injection, not covered: myofascial pain, "
        "where a facet block is not indicated"
    )
    assert card["indicator"] == "warning"
    assert card["source"] == {
        "label": "EmblemHealth",
        "topic": {
            "system": "http://terminology.hl7.org/CodeSystem/cdshooks-card-type",
            "code": "off-guideline",
            "display": "Off Guideline",
        },
    }
    assert card["links"] == [
        {
            "label": "NGS LCD L36850: Facet Joint Injections, Medial Branch Blocks "
            "and Facet RF Neurotomy (Medicare)",
            "url": L36850,
            "type": "absolute",
        }
    ]
    assert card["selectionBehavior"] == "at-most-one"
    [suggestion] = card["suggestions"]
    assert (
        suggestion["label"]
        == "Remove the order for 64493 lumbar/sacral facet injection"
    )
    assert suggestion["actions"] == [
        {
            "type": "delete",
            "description": "Remove the draft order 64493 lumbar/sacral facet injection",
            "resourceId": "ServiceRequest/sr-1",
        }
    ]
    assert card["extension"] == {
        "davinci-crd.associated-resource": [{"reference": "ServiceRequest/sr-1"}]
    }
    assert all(reason["display"] for reason in card["overrideReasons"])


def test_detail_lists_every_criterion_with_state_evidence_and_section(kit):
    detail = respond(kit, [kit.facet_myofascial()])["cards"][0]["detail"]

    assert detail.startswith(
        "**64493 lumbar/sacral facet injection**: EmblemHealth Pain Management "
        "guideline, *Facet joint or medial branch block*."
    )
    assert (
        "| Pain is at least 6 on a 10-point scale and recurrent or constant. "
        "(Paravertebral joint/nerve blocks: 1. Diagnostic) | Met | Latest pain score "
        "7/10 on 2026-11-23. *Evidence:* Pain severity 0-10 (7), 2026-12-01 |"
    ) in detail
    assert (
        "| A facet joint or nerve block is not indicated for pain from myofascial "
        "pain syndrome. (Limitations 1: myofascial pain syndrome) | **Applies** | "
        "Myofascial pain syndrome (M79.18) is on the problem list. |"
    ) in detail
    assert "Applies when no spinal diagnosis is also current." in detail


def test_documentation_reminder_is_info_and_has_no_suggestions(kit):
    card = respond(kit, [kit.facet_pain_undocumented()])["cards"][0]

    assert card["summary"] == (
        "Document for 64493 lumbar/sacral facet injection: pain ≥6/10, recurrent or "
        "constant"
    )
    assert card["indicator"] == "info"
    assert card["source"]["topic"]["code"] == "appropriate-use"
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert "| **Not documented** |" in card["detail"]


def test_unmet_requirement_is_a_warning(kit):
    card = respond(kit, [kit.facet_radiculopathy()])["cards"][0]
    assert card["summary"] == (
        "Review 64493 lumbar/sacral facet injection, criteria not met: no "
        "radiculopathy or neurogenic claudication"
    )
    assert card["indicator"] == "warning"
    assert "suggestions" not in card


@pytest.mark.parametrize(
    "blind, guided",
    [("62320", "62321"), ("62322", "62323"), ("62324", "62325"), ("62326", "62327")],
)
def test_repeat_blind_epidural_suggests_the_image_guided_code(kit, blind, guided):
    determination = kit.blind_epidural_after_failure(blind)
    card = respond(kit, [determination])["cards"][0]

    assert card["summary"].startswith(f"Use {guided} (image-guided), not {blind} ")
    assert card["summary"].endswith(
        ": repeat after a failed blind epidural needs imaging"
    )
    [suggestion] = card["suggestions"]
    [action] = suggestion["actions"]
    assert action["type"] == "update"
    resource = action["resource"]
    assert resource["id"] == f"sr-{blind}"  # the same order, changed in place
    assert resource["code"]["coding"][0]["system"] == "http://www.ama-assn.org/go/cpt"
    assert resource["code"]["coding"][0]["code"] == guided
    assert suggestion["isRecommended"] is True
    assert determination.order.resource["code"]["coding"][0]["code"] == blind


def test_orders_outside_the_guideline_get_nothing(kit):
    other = kit.order("97110", order_id="pt-1")
    answer = respond(kit, [], all_orders=[other])
    assert answer == {"cards": []}


def test_all_documented_card_only_when_configuration_asks(kit):
    determination = kit.facet_documented()
    assert respond(kit, [determination])["cards"] == []

    options = CardOptions.from_request(
        {"davinci-crd.configuration": {"guideline": True}}
    )
    [card] = respond(kit, [determination], options=options)["cards"]
    assert card["summary"] == (
        "64493 lumbar/sacral facet injection: all guideline criteria documented; "
        "request PA"
    )
    assert card["indicator"] == "info"
    assert card["source"]["topic"]["code"] == "guideline"
    assert "overrideReasons" not in card


def test_card_names_the_order_when_other_drafts_exist(kit):
    determination = kit.facet_myofascial()
    other = kit.order("62323", order_id="sr-2")
    card = respond(kit, [determination], all_orders=[determination.order, other])[
        "cards"
    ][0]
    assert card["detail"].endswith(
        "This card is about the draft order 64493 lumbar/sacral facet injection "
        "(ServiceRequest/sr-1) only, not about 62323 lumbar/sacral epidural, "
        "image-guided."
    )


def test_single_order_card_does_not_talk_about_other_orders(kit):
    card = respond(kit, [kit.facet_myofascial()])["cards"][0]
    assert "This card is about" not in card["detail"]


def test_data_unavailable_card_says_what_could_not_be_retrieved(kit):
    answer = respond(
        kit,
        [kit.conditions_unavailable()],
        unavailable={DataCategory.CONDITIONS, DataCategory.PROCEDURES},
    )
    [card] = answer["cards"]
    assert card["summary"] == (
        "Coverage not fully checked for 64493 lumbar/sacral facet injection: problem "
        "list (conditions) and procedure history unavailable"
    )
    assert card["indicator"] == "info"
    assert card["source"]["topic"]["code"] == "coverage-info"
    assert (
        "- The pain is axial, without radiculopathy or neurogenic claudication. "
        "(Paravertebral joint/nerve blocks: 1. Diagnostic)"
    ) in card["detail"]


def test_unavailable_data_that_no_criterion_needed_gets_no_card(kit):
    answer = respond(kit, [kit.facet_myofascial()], unavailable={DataCategory.PATIENT})
    assert [c["source"]["topic"]["code"] for c in answer["cards"]] == ["off-guideline"]


def test_summary_stays_under_140_characters_with_long_names(kit):
    order = kit.order("99999")
    long_text = "A criterion text " * 20
    determination = kit.facet_pain_undocumented(order)
    result = replace(determination.results[0], criterion_id="unknown", text=long_text)
    determination = replace(determination, results=(result,))
    summary = respond(kit, [determination])["cards"][0]["summary"]
    assert len(summary) < 140
    assert summary.endswith("…")


def test_plan_name_is_configurable(kit):
    class Settings:
        plan_name = "Example Health Plan"
        guideline_url = "https://plan.example.org/guidelines/pain-management.pdf"

    options = CardOptions.from_request(None, Settings())
    card = respond(kit, [kit.facet_myofascial()], options=options)["cards"][0]
    assert card["source"]["label"] == "Example Health Plan"
    assert card["links"][0] == {
        "label": "Example Health Plan Pain Management guideline",
        "url": "https://plan.example.org/guidelines/pain-management.pdf",
        "type": "absolute",
    }


def test_non_facet_codes_link_the_pain_management_lcd(kit):
    card = respond(kit, [kit.blind_epidural_after_failure()])["cards"][0]
    assert [link["url"] for link in card["links"]] == [L33622]


# --- configuration (CRD deviations: dev-5, dev-6, dev-14, dev-17) -----------------


def test_discovery_declares_crd_version_and_one_option_per_card_type():
    extension = discovery_extension()
    assert extension["davinci-crd.version"] == ["2.2"]
    options = extension["davinci-crd.configuration-options"]
    for option in options:
        assert set(option) == {"code", "type", "name", "description", "default"}
    booleans = {o["code"] for o in options if o["type"] == "boolean"}
    assert booleans == {
        "coverage-info",
        "off-guideline",
        "limits",
        "appropriate-use",
        "guideline",
    }
    assert booleans <= CARD_TYPES
    assert {"code": "max-cards", "type": "integer"}.items() <= options[-1].items()


def test_discovery_endpoint_carries_the_extension(client):
    with client.get("/cds-services") as response:
        services = response.get_json()["services"]
    for service in services:
        assert service["extension"] == discovery_extension()


def test_configuration_turns_card_types_off_and_ignores_unknown_options(kit):
    options = CardOptions.from_request(
        {
            "davinci-crd.configuration": {
                "off-guideline": False,
                "unsolicited-determ": False,
                "no-such-option": 7,
            }
        }
    )
    answer = respond(
        kit,
        [
            kit.facet_myofascial(),
            kit.facet_pain_undocumented(kit.order(order_id="sr-2")),
        ],
        options=options,
    )
    # The excluded order's card is off; the reminder for the other order stays.
    assert [c["source"]["topic"]["code"] for c in answer["cards"]] == [
        "appropriate-use"
    ]
    assert len(answer["systemActions"]) == 2


@pytest.mark.parametrize(
    "configuration",
    [
        {"max-cards": "many"},
        {"max-cards": "1"},
        {"max-cards": -1},
        {"max-cards": 1.5},
        {"max-cards": True},
        {"off-guideline": "sometimes"},
        {"off-guideline": None},
        {"off-guideline": "false"},
        "not an object",
        ["coverage-info"],
    ],
)
def test_bad_configuration_values_leave_defaults(configuration):
    options = CardOptions.from_request({"davinci-crd.configuration": configuration})
    assert options == CardOptions()


def test_max_cards_keeps_warnings_first(kit):
    reminder = kit.facet_pain_undocumented(kit.order(order_id="a"))
    warning = kit.facet_myofascial(kit.order(order_id="b"))
    options = CardOptions.from_request({"davinci-crd.configuration": {"max-cards": 1}})
    [card] = respond(kit, [reminder, warning], options=options)["cards"]
    assert card["indicator"] == "warning"
    assert card["extension"]["davinci-crd.associated-resource"] == [
        {"reference": "ServiceRequest/b"}
    ]

    none = CardOptions.from_request({"davinci-crd.configuration": {"max-cards": 0}})
    assert respond(kit, [warning], options=none)["cards"] == []


def test_max_cards_as_a_string_is_ignored_and_the_default_holds(kit):
    reminder = kit.facet_pain_undocumented(kit.order(order_id="a"))
    warning = kit.facet_myofascial(kit.order(order_id="b"))
    options = CardOptions.from_request(
        {"davinci-crd.configuration": {"max-cards": "1", "off-guideline": "false"}}
    )

    answer = respond(kit, [reminder, warning], options=options)

    assert options.max_cards == 10
    assert [card["indicator"] for card in answer["cards"]] == ["warning", "info"]


def test_coverage_info_off_drops_system_actions(kit):
    options = CardOptions().configured({"coverage-info": False})
    answer = respond(kit, [kit.facet_myofascial()], options=options)
    assert "systemActions" not in answer
    assert len(answer["cards"]) == 1


# --- identity ----------------------------------------------------------------------


def test_same_unchanged_order_and_determination_give_the_same_uuids(kit):
    first = respond(kit, [kit.facet_myofascial()])["cards"][0]
    again = respond(kit, [kit.facet_myofascial()])["cards"][0]
    assert first["uuid"] == again["uuid"]
    assert first["suggestions"][0]["uuid"] == again["suggestions"][0]["uuid"]


def test_changed_order_or_determination_gives_a_new_uuid(kit):
    base = respond(kit, [kit.facet_myofascial()])["cards"][0]["uuid"]
    edited = kit.order(note=[{"text": "left L4-L5"}])
    changed_order = respond(kit, [kit.facet_myofascial(edited)])["cards"][0]["uuid"]
    changed_result = respond(kit, [kit.facet_radiculopathy()])["cards"][0]["uuid"]
    assert len({base, changed_order, changed_result}) == 3


def test_fingerprint_ignores_meta_and_our_coverage_extension(kit):
    order = kit.order()
    resource = dict(order.resource)
    resource["meta"] = {"versionId": "7", "lastUpdated": "2026-12-03T10:00:00Z"}
    resource["extension"] = [
        {
            "url": "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/"
            "ext-coverage-information",
            "extension": [{"url": "covered", "valueCode": "conditional"}],
        }
    ]
    assert order_fingerprint(resource) == order_fingerprint(order.resource)
    resource["status"] = "active"
    assert order_fingerprint(resource) != order_fingerprint(order.resource)


# --- accepted cards are not contradicted ------------------------------------------


def _accept(store, card, when="2026-12-03T18:00:00+00:00"):
    from datetime import datetime

    from cds_service.storage import FeedbackItem

    suggestion = card.get("suggestions", [{"uuid": "none"}])[0]["uuid"]
    store.add_feedback(
        "pain-management-order-sign",
        [
            FeedbackItem(
                card=card["uuid"],
                outcome="accepted",
                outcome_timestamp=datetime.fromisoformat(when),
                accepted_suggestions=(suggestion,),
            )
        ],
    )


def test_accepted_card_is_not_contradicted_for_the_same_unchanged_order(kit, store):
    options = CardOptions(memory=store)
    accepted = respond(kit, [kit.facet_myofascial()], options=options)["cards"][0]
    _accept(store, accepted)

    # Next call, same unchanged order; the record now reads as "not documented":
    # a conditional card would contradict the accepted not-covered card.
    answer = respond(kit, [kit.facet_pain_undocumented()], options=options)
    assert answer["cards"] == []
    # The coverage information still says what the payer asserts now.
    assert len(answer["systemActions"]) == 1

    # The accepted card itself does not contradict itself.
    again = respond(kit, [kit.facet_myofascial()], options=options)["cards"]
    assert [c["uuid"] for c in again] == [accepted["uuid"]]


def test_a_card_accepted_for_one_patient_does_not_silence_another(kit, store):
    # The same order word for word (no subject names the patient) for another
    # patient is another order: its card is not the accepted one, and it is shown.
    options = CardOptions(memory=store)
    first = respond(kit, [kit.facet_myofascial()], options=options, patient_id="p1")
    _accept(store, first["cards"][0])

    other = respond(
        kit, [kit.facet_pain_undocumented()], options=options, patient_id="p2"
    )
    same = respond(
        kit, [kit.facet_pain_undocumented()], options=options, patient_id="p1"
    )

    assert [card["summary"] for card in other["cards"]] == [
        "Document for 64493 lumbar/sacral facet injection: pain ≥6/10, recurrent "
        "or constant"
    ]
    assert other["cards"][0]["uuid"] != first["cards"][0]["uuid"]
    assert same["cards"] == []


def test_a_changed_order_is_judged_afresh(kit, store):
    options = CardOptions(memory=store)
    accepted = respond(kit, [kit.facet_myofascial()], options=options)["cards"][0]
    _accept(store, accepted)

    edited = kit.order(note=[{"text": "right side"}])
    answer = respond(kit, [kit.facet_pain_undocumented(edited)], options=options)
    assert [c["indicator"] for c in answer["cards"]] == ["info"]


def test_a_later_override_withdraws_the_acceptance(kit, store):
    from datetime import datetime

    from cds_service.storage import FeedbackItem

    options = CardOptions(memory=store)
    accepted = respond(kit, [kit.facet_myofascial()], options=options)["cards"][0]
    _accept(store, accepted, "2026-12-03T18:00:00+00:00")
    store.add_feedback(
        "pain-management-order-sign",
        [
            FeedbackItem(
                card=accepted["uuid"],
                outcome="overridden",
                outcome_timestamp=datetime.fromisoformat("2026-12-03T18:05:00+00:00"),
            )
        ],
    )
    answer = respond(kit, [kit.facet_pain_undocumented()], options=options)
    assert len(answer["cards"]) == 1


def test_store_outage_does_not_fail_the_response(kit):
    class BrokenMemory:
        def accepted_stances(self, fingerprints):
            raise OSError("database down")

        def remember_cards(self, cards):
            raise OSError("database down")

    answer = respond(
        kit, [kit.facet_myofascial()], options=CardOptions(memory=BrokenMemory())
    )
    assert len(answer["cards"]) == 1


def test_an_order_listed_twice_gets_one_card_and_one_action(kit):
    determination = kit.facet_myofascial()
    answer = respond(kit, [determination, determination])
    assert len(answer["cards"]) == 1
    assert len(answer["systemActions"]) == 1


def _summaries_of_every_criterion():
    """Each rule's summaries as cards word them, for its longest order label.

    The templates are those a rule of its role can appear in, with the largest
    "(+N more)" its rule set can produce.
    """
    from cards.content import criterion_phrase, criterion_to_document
    from cards.render import SUMMARY_TEMPLATES, name_criterion
    from cds_service.guideline import Guideline
    from cds_service.model import CriterionResult, Role, State

    def named(rule, state):
        result = CriterionResult(rule.id, "s", rule.text, rule.role, state, "")
        return name_criterion(result)

    summaries = {}
    for rule_set in Guideline.load().rule_sets.values():
        more = f" (+{len(rule_set.rules) - 1} more)"
        for rule in rule_set.rules:
            codes = [c for c in rule_set.codes if rule.codes is None or c in rule.codes]
            label = max((f"{c} {content.short_name(c)}" for c in codes), key=len)
            assert criterion_phrase(rule.id) or criterion_to_document(rule.id)
            kinds = {
                Role.EXCLUSION: ["exclusion"],
                Role.LIMIT: ["limit"],
                Role.REQUIREMENT: ["unmet"],
                Role.REVIEW: [],
            }[rule.role]
            texts = [
                SUMMARY_TEMPLATES[kind].format(
                    label=label, issue=named(rule, State.NOT_MET), more=more
                )
                for kind in kinds
            ]
            texts.append(
                SUMMARY_TEMPLATES["undocumented"].format(
                    label=label, issue=named(rule, State.NOT_DOCUMENTED), more=more
                )
            )
            if rule.id.startswith(content.image_guided_triggers()):
                texts.append(
                    SUMMARY_TEMPLATES["alternative"].format(
                        alternative="62321",
                        label=label,
                        issue=named(rule, State.NOT_MET),
                        more=more,
                    )
                )
            summaries.setdefault(rule.id, []).extend(texts)
    return summaries


def test_every_criterion_has_a_phrase_that_fits_its_summaries():
    import yaml

    rules_dir = Path(__file__).resolve().parent.parent / "cds_service/guideline/rules"
    rule_ids = {
        rule["id"]
        for path in rules_dir.glob("*.yaml")
        for rule in (yaml.safe_load(path.read_text()) or {}).get("rules", [])
    }
    summaries = _summaries_of_every_criterion()
    phrases = yaml.safe_load(
        (Path(content.__file__).parent / "criteria.yaml").read_text()
    )

    assert set(summaries) == rule_ids
    assert sorted(rule_ids - set(phrases["phrases"])) == []  # every rule has one
    # No phrase for a renamed rule.
    assert sorted(set(phrases["phrases"]) - rule_ids) == []
    assert sorted(set(phrases["to_document"]) - rule_ids) == []
    too_long = {
        rule_id: [(len(text), text) for text in texts if len(text) > 139]
        for rule_id, texts in summaries.items()
    }
    assert {k: v for k, v in too_long.items() if v} == {}
    assert not any("…" in text for texts in summaries.values() for text in texts)


def test_summaries_of_the_longest_labels_read_as_written():
    summaries = _summaries_of_every_criterion()

    assert (
        "Document for 64480 cervical/thoracic transforaminal epidural, added level: "
        "why a second spinal injection is needed the same day (+10 more)"
    ) in summaries["same-day-single-procedure"]
    assert summaries["acupuncture-excluded"] == [
        "Remove 97813 electroacupuncture, initial 15 minutes, not covered: "
        "acupuncture, not covered for Commercial or Medicaid (+2 more)",
        "Document for 97813 electroacupuncture, initial 15 minutes: "
        "the member's plan (acupuncture: Medicare only) (+2 more)",
    ]
    assert (
        "Document for 62325 cervical/thoracic epidural catheter, image-guided: "
        "failed oral antispasmodics for spasticity (+5 more)"
    ) in summaries["infusion-spasticity-failed-oral"]


def test_every_guideline_code_has_a_short_name_for_cards():
    from cards.content import short_name
    from cds_service.guideline import Guideline

    codes = {
        code["code"]
        for section in Guideline.load().catalogue()
        for code in section["codes"]
    }

    assert sorted(code for code in codes if short_name(code) is None) == []


@pytest.mark.parametrize(
    "fixture, order, indicator, summary",
    [
        (
            "more/acupuncture-unknown.json",
            "97813",
            "info",
            "Document for 97813 electroacupuncture, initial 15 minutes: the member's "
            "plan (acupuncture: Medicare only)",
        ),
        (
            "spine/esi-same-day-with-facet.json",
            "62323",
            "info",
            "Document for 62323 lumbar/sacral epidural, image-guided: why a second "
            "spinal injection is needed the same day",
        ),
        (
            # Limitations 5: denied unless medically necessary, so a warning.
            "more/sedation-with-facet-done-today.json",
            "99152",
            "warning",
            "Document for 99152 moderate sedation by proceduralist: why sedation or "
            "MAC is medically necessary",
        ),
    ],
)
def test_documentation_cards_say_what_to_document(
    client, fixture, order, indicator, summary
):
    from conftest import FIXTURES

    body = json.loads((FIXTURES / fixture).read_text())
    with client.post("/cds-services/pain-management-order-sign", json=body) as r:
        answer = r.get_json()

    [card] = [
        c for c in answer["cards"] if c["summary"].startswith(f"Document for {order}")
    ]
    assert (card["indicator"], card["summary"]) == (indicator, summary)
    reasons = [
        item["valueCodeableConcept"]["text"]
        for action in answer["systemActions"]
        if action["resource"]["id"].endswith(order)
        for extension in action["resource"]["extension"]
        for item in extension["extension"]
        if item["url"] == "reason"
    ]
    assert reasons == ["Not documented: " + summary.split(": ", 1)[1]]


def test_sedation_with_an_epidural_is_conditional_not_denied(client):
    from conftest import FIXTURES

    body = json.loads((FIXTURES / "more/sedation-with-epidural.json").read_text())
    with client.post("/cds-services/pain-management-order-sign", json=body) as r:
        [card] = [c for c in r.get_json()["cards"] if "01992" in c["summary"]]

    assert card["indicator"] == "warning"
    assert card["summary"] == (
        "Document for 01992 anaesthesia for nerve block, prone: why sedation or MAC "
        "is medically necessary"
    )
    assert "Modifier 59 does not override this" in card["detail"]
    assert "**Not documented**" in card["detail"]
    assert [s["label"] for s in card.get("suggestions", [])] == []


def test_a_long_list_of_unavailable_data_is_summarised_whole(kit):
    from cards.render import data_card

    card = data_card(
        [kit.conditions_unavailable()], set(DataCategory), ["f"], CardOptions()
    )

    assert card["summary"] == (
        "Coverage not fully checked for 64493 lumbar/sacral facet injection: "
        "patient data unavailable"
    )
    assert "insurance coverage" in card["detail"]


def test_readings_on_cards_keep_the_reasoning_without_file_citations():
    from cards.render import clinical_reading

    assert clinical_reading(
        "Patients often carry both diagnoses and the text gives no tie-breaker "
        "(codes.md 7 item 17). The exclusion applies when"
    ) == (
        "Patients often carry both diagnoses and the text gives no tie-breaker. "
        "The exclusion applies when"
    )
    assert (
        clinical_reading(
            "at least 3 (codes.md 7 item 10: no look-back is stated; 90 days is read "
            "as current)."
        )
        == "at least 3 (no look-back is stated; 90 days is read as current)."
    )
    assert (
        clinical_reading(
            "(partial and full duals cannot be told apart, codes.md 7 item 25) and"
        )
        == "(partial and full duals cannot be told apart) and"
    )
    assert (
        clinical_reading(
            "never assumed Commercial. codes.md 7 item 8: several Medicare contractors"
        )
        == "never assumed Commercial. Several Medicare contractors"
    )
