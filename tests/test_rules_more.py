"""The rest of the guideline: every code has a rule, `pain-cds rules`, edge cases."""

import json
import re
from dataclasses import replace
from datetime import date

import pytest
from conftest import ROOT
from facts import ON, cond, coverage, failing, med, order, proc, record

from cds_service.cli import main
from cds_service.model import Coding, CoverageFact, DataCategory, Outcome

# The guideline as the plan published it (PDF extraction, table garbled), kept in
# docs/ beside the rules that encode it.
GUIDELINE = ROOT / "docs" / "pain-management-guideline.md"


def guideline_codes() -> set[str]:
    """Procedure codes in the guideline text: body, revision history and the table
    garbled by PDF extraction. Links are left out: LCD ids (L36850, 33622) sit in
    their URLs."""
    text = GUIDELINE.read_text(encoding="utf-8")
    text = re.sub(r"<a\b[^>]*>.*?</a>", " ", text, flags=re.S)
    text = re.sub(r"https?://\S+", " ", text)
    return set(re.findall(r"(?<![\w.=/-])(\d{5}|\d{4}T|[A-Z]\d{4})(?![\w.])", text))


def test_every_code_in_the_guideline_has_a_rule(guideline):
    codes = guideline_codes()
    # The extraction itself: table codes, body-only codes and the OCR-garbled G0260.
    assert {"01996", "0766T", "20560", "64625", "E1399", "G0260", "J3490"} <= codes
    assert len(codes) == 56
    missing = sorted(
        c
        for c in codes
        if not guideline.covers(Coding("hcpcs" if c[0].isalpha() else "cpt", c))
    )
    assert missing == []


def test_every_rule_shows_as_its_own_row(guideline):
    """Cards name criteria by wording and section, so no two rules may share both."""
    seen = {}
    for entry in guideline.catalogue():
        for rule in entry["rules"]:
            label = (" ".join(rule["text"].split()), rule["section"])
            assert seen.setdefault(label, rule["id"]) == rule["id"], label


# --- pain-cds rules -------------------------------------------------------------------

AXON = """\
Pain Management guideline (EmblemHealth MG.MM.ME.38hC6v3), as encoded
1 section(s), 1 code(s), 2 rule(s)

Services limited by the Pain Management guideline [limitations]
===============================================================
Guideline section: Limitations for all diagnostic and therapeutic pain management
  services
Rule file: rules/limitations.yaml
Codes:
  0766T Transcutaneous magnetic stimulation by focused low-frequency electromagnetic
         pulse, peripheral nerve, initial treatment (Axon therapy)
Exclusions (not covered when not met):
  - axon-therapy-experimental (always)
      Section: Limitations 7: Axon therapy
      Guideline: Axon therapy for chronic nerve pain is experimental, investigational or
        unproven (CPT 0766T, effective 1/1/2023).
      Reading: From its effective date of 1 January 2023 (the date the request is
        judged) 0766T is denied. The sibling codes 0767T-0769T are not named and are not
        listed (codes.md 7 item 6).
      Parameters: explanation=The guideline lists Axon therapy (0766T) as experimental
        from 1 January 2023.
      Applies to: codes 0766T; from 2023-01-01
      Rule file: rules/limitations.yaml
Manual review:
  - axon-therapy-before-effective-date (manual-review)
      Section: Limitations 7: Axon therapy
      Guideline: Before 1 January 2023 the guideline says nothing about Axon therapy.
      Reading: A date of service before the effective date is not denied by this rule; a
        reviewer decides.
      Parameters: reason=Axon therapy (0766T) before the 1 January 2023 effective date
        of its exclusion.
      Applies to: codes 0766T; until 2022-12-31
      Rule file: rules/limitations.yaml
Not encoded:
  - Limitations 2: nerve blocks: If complete but only temporary relief follows the
    injections, another type of treatment should be considered.
    Why: Advice to the treating clinician; the repeat criteria of each section read the
      prior response.
  - Limitations 3: procedures on the same day: Other interventional procedures on the
    same day as facet blocks should be rare.
    Why: "Should be rare" is not a rule (codes.md 7 item 16); the one-procedure-a-day
      limit is in spine-limitations.yaml.
"""

PROLOTHERAPY = """\
Pain Management guideline (EmblemHealth MG.MM.ME.38hC6v3), as encoded
1 section(s), 1 code(s), 1 rule(s)

Services excluded by the Pain Management guideline [exclusions]
===============================================================
Guideline section: Exclusions
Rule file: rules/exclusions.yaml
Codes:
  M0076 Prolotherapy
Exclusions (not covered when not met):
  - prolotherapy-excluded (always)
      Section: Exclusions 5: prolotherapy
      Guideline: Prolotherapy is not medically necessary.
      Parameters: explanation=The guideline excludes prolotherapy.
      Applies to: codes M0076
      Rule file: rules/exclusions.yaml
"""


@pytest.mark.parametrize(
    ("code", "expected"), [("0766T", AXON), ("m0076", PROLOTHERAPY)]
)
def test_rules_command_prints_a_code_as_a_reviewer_reads_it(code, expected, capsys):
    assert main(["rules", "--code", code]) == 0
    assert capsys.readouterr().out == expected


def test_rules_command_for_dry_needling_shows_the_line_of_business_reading(capsys):
    assert main(["rules", "--code", "20561"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:10] == [
        "Pain Management guideline (EmblemHealth MG.MM.ME.38hC6v3), as encoded",
        "1 section(s), 1 code(s), 4 rule(s)",
        "",
        "Dry needling [dry-needling]",
        "===========================",
        "Guideline section: Trigger point injections for chronic pain: Limitations",
        "Rule file: rules/dry-needling.yaml",
        "Codes:",
        "  20561 Needle insertion(s) without injection(s), 3 or more muscles",
        "Criteria:",
    ]
    assert "\nExclusions (not covered when not met):\n" in out
    assert (
        "      Parameters: any_of=[medicare]; plan_names={dual: [dual eligible," in out
    )


def test_rules_command_lists_every_section_and_code(capsys, guideline):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    codes = [c["code"] for e in guideline.catalogue() for c in e["codes"]]
    rules = {r["id"] for e in guideline.catalogue() for r in e["rules"]}
    assert out.splitlines()[1] == (
        f"{len(guideline.rule_sets)} section(s), {len(codes)} code(s), "
        f"{len(rules)} rule(s)"
    )
    for code in codes:
        assert re.search(rf"^  {code} ", out, re.M), code
    # A rule shared by several sections is printed under each of them.
    assert out.count("  - series-of-injections (ordered-sessions)") == 8


def test_rules_command_json_and_unknown_code(capsys):
    assert main(["rules", "--json", "--code", "20552", "--code", "20553"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["id"] == "trigger-point"
    assert [c["code"] for c in entry["codes"]] == ["20552", "20553"]
    assert main(["rules", "--code", "99213"]) == 1
    assert capsys.readouterr().err == "pain-cds: no rule for code(s) 99213\n"


# --- cases the HTTP fixtures cannot show ----------------------------------------------


def test_axon_therapy_before_its_effective_date_goes_to_review(guideline):
    (before,) = guideline.evaluate(record(), [order("0766T")], date(2022, 12, 31))
    assert before.outcome is Outcome.CONDITIONAL
    assert failing(before) == {"axon-therapy-before-effective-date": "not-documented"}
    (after,) = guideline.evaluate(record(), [order("0766T")], date(2023, 1, 1))
    assert after.outcome is Outcome.NOT_COVERED
    assert failing(after) == {"axon-therapy-experimental": "not-met"}


def test_dry_needling_without_coverage_data_is_indeterminate(guideline):
    rec = record(unavailable=[DataCategory.COVERAGE])
    (d,) = guideline.evaluate(rec, [order("20560")], ON)
    assert d.outcome is Outcome.INDETERMINATE
    (result,) = d.results
    assert result.data_unavailable


@pytest.mark.parametrize(
    ("coverages", "expected"),
    [
        ([coverage("a", "5")], Outcome.NOT_COVERED),
        ([coverage("a", "5", status="cancelled"), coverage("b", "1")], Outcome.COVERED),
        ([coverage("a", "1"), coverage("b", "2")], Outcome.COVERED),  # dual
        ([coverage("a", "523")], Outcome.CONDITIONAL),  # Medigap alone: unknown
        ([coverage("a", None)], Outcome.CONDITIONAL),
        ([], Outcome.CONDITIONAL),
    ],
)
def test_dry_needling_line_of_business(guideline, coverages, expected):
    # A complete trigger point record, so only the line of business decides.
    rec = replace(_tpi_patient(), coverages=list(coverages))
    (d,) = guideline.evaluate(rec, [order("20560")], ON)
    assert d.outcome is expected


def test_dry_needling_for_medicare_needs_the_trigger_point_criteria(guideline):
    (d,) = guideline.evaluate(
        record(coverages=[coverage("a", "1")]), [order("20561")], ON
    )
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {
        "dry-needling-failed-pharmacologic-therapy": "not-documented",
        "dry-needling-symptoms-three-months": "not-documented",
        "dry-needling-comprehensive-plan": "not-documented",
    }
    short = replace(
        _tpi_patient(),
        conditions=[cond("m", "icd10cm:M79.18", onset=60)],
        coverages=[coverage("a", "1")],
    )
    (d,) = guideline.evaluate(short, [order("20560")], ON)
    assert failing(d) == {"dry-needling-symptoms-three-months": "not-met"}


def test_lapsed_medicare_does_not_count(guideline):
    lapsed = replace(coverage("a", "1"), period_end=date(2026, 6, 30))
    (d,) = guideline.evaluate(record(coverages=[lapsed]), [order("20560")], ON)
    assert failing(d) == {"dry-needling-line-of-business": "not-documented"}


def test_plan_name_tells_the_line_of_business_when_the_type_does_not(guideline):
    vip = CoverageFact("Coverage/v", (), "active", None, None, ("VIP Essential (HMO)",))
    (d,) = guideline.evaluate(record(coverages=[vip]), [order("97810")], ON)
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {"acupuncture-benefit-review": "not-documented"}


@pytest.mark.parametrize(
    ("coverages", "expected"),
    [
        ([coverage("a", "5")], {"acupuncture-excluded": "not-met"}),
        ([coverage("a", "2")], {"acupuncture-excluded": "not-met"}),
        ([coverage("a", "1")], {"acupuncture-benefit-review": "not-documented"}),
        ([coverage("a", "14")], {"acupuncture-benefit-review": "not-documented"}),
        ([], {"acupuncture-excluded": "not-documented"}),
    ],
)
def test_acupuncture_for_medicare_goes_to_review(guideline, coverages, expected):
    (d,) = guideline.evaluate(record(coverages=coverages), [order("97813")], ON)
    assert failing(d) == expected
    if "acupuncture-benefit-review" in expected:
        assert d.outcome is Outcome.CONDITIONAL
        assert d.manual_review == (
            "Acupuncture for a Medicare member is judged under the plan's separate "
            "Acupuncture for Chronic Lower Back Pain policy and CMS coverage, not "
            "under this guideline."
        )


def _tpi(ref="tpi", **resource):
    base = order("20552", ref)
    return replace(
        base,
        resource={
            **base.resource,
            "orderDetail": [{"text": "lidocaine 1%"}],
            **resource,
        },
    )


def _tpi_patient(*procedures):
    return record(
        conditions=[cond("m", "icd10cm:M79.18", onset=200)],
        medications=[med("n", "Naproxen 220 MG Oral Tablet", 100)],
        procedures=[proc("pt", "97110", 30), *procedures],
    )


def test_three_in_ninety_days_uses_each_draft_date(guideline):
    rec = _tpi_patient(proc("a", "20552", 60), proc("b", "20553", 85))
    later = _tpi("later", occurrenceDateTime="2026-12-20")
    today = _tpi("today")
    dets = {d.order.reference: d for d in guideline.evaluate(rec, [today, later], ON)}
    # Today: 85 and 60 days ago and today = 3. The 20 December order: the window
    # runs from 22 September, so 85 days ago falls out: 60 days ago, today, itself.
    assert "tpi-three-in-ninety-days" not in failing(dets["ServiceRequest/today"])
    assert "tpi-three-in-ninety-days" not in failing(dets["ServiceRequest/later"])
    # Two dates in one request are a series booked in advance.
    assert failing(dets["ServiceRequest/later"])["series-of-injections"] == "not-met"

    rec = _tpi_patient(proc("a", "20552", 60), proc("b", "20553", 70))
    dets = {d.order.reference: d for d in guideline.evaluate(rec, [today, later], ON)}
    assert "tpi-three-in-ninety-days" not in failing(dets["ServiceRequest/today"])
    result = next(
        r
        for r in dets["ServiceRequest/later"].results
        if r.criterion_id == "tpi-three-in-ninety-days"
    )
    assert result.state.value == "not-met"
    assert result.explanation == (
        "4 date(s) of trigger point injection from 2026-09-22 to 2026-12-20 counting "
        "this order; more than 3 in 90 days is denied."
    )


def test_routine_use_needs_every_quarter_of_the_year(guideline):
    quarters = [proc(f"t{i}", "20552", d) for i, d in enumerate((30, 120, 210))]
    (d,) = guideline.evaluate(_tpi_patient(*quarters), [_tpi()], ON)
    assert "tpi-routine-use" not in failing(d)
    quarters.append(proc("t4", "20553", 359))
    (d,) = guideline.evaluate(_tpi_patient(*quarters), [_tpi()], ON)
    assert failing(d) == {"tpi-routine-use": "not-met"}


def test_injectate_coded_in_order_detail(guideline):
    coded = _tpi(
        orderDetail=[
            {
                "coding": [
                    {
                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "code": "10759",
                        "display": "triamcinolone",
                    }
                ]
            }
        ]
    )
    (d,) = guideline.evaluate(_tpi_patient(), [coded], ON)
    assert d.outcome is Outcome.COVERED
    evidence = next(r for r in d.results if r.criterion_id == "tpi-injectate-agents")
    assert evidence.explanation == "The injectate is corticosteroid."


def test_sedation_rule_does_not_catch_daily_epidural_management(guideline):
    rec = record(conditions=[cond("ob", "icd10cm:O80", onset=1)])
    dets = guideline.evaluate(rec, [order("01996"), order("62326")], ON)
    by_code = {d.billing_code.code: d for d in dets}
    assert by_code["01996"].rule_set == "post-operative"
    assert by_code["01996"].outcome is Outcome.COVERED
    assert not any(
        r.criterion_id.startswith("sedation") for r in by_code["01996"].results
    )


def test_headache_exclusion_is_not_shown_when_it_does_not_apply(guideline):
    rec = record(conditions=[cond("n", "icd10cm:M54.2"), cond("m", "icd10cm:G43.909")])
    (d,) = guideline.evaluate(rec, [order("64490")], ON)
    ids = [r.criterion_id for r in d.results]
    assert "headache-nerve-block-excluded" not in ids
    assert "occipital-headache-medicare-only" not in ids


def test_major_trauma_must_be_recent(guideline):
    old = record(conditions=[cond("r", "icd10cm:S22.41XA", onset=90)])
    (d,) = guideline.evaluate(old, [order("01996")], ON)
    assert failing(d) == {"postop-qualifying-setting": "not-documented"}
    assert "began 2026-09-04, 90 days ago" in d.results[0].explanation


def test_obstetric_care_must_be_recent(guideline):
    old = record(conditions=[cond("o", "icd10cm:O80", onset=400)])
    (d,) = guideline.evaluate(old, [order("01996")], ON)
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {"postop-qualifying-setting": "not-documented"}
    assert "began 2025-10-29, 400 days ago" in d.results[0].explanation
    recent = record(conditions=[cond("o", "icd10cm:O80", onset=2)])
    (d,) = guideline.evaluate(recent, [order("01996")], ON)
    assert d.outcome is Outcome.COVERED
