"""The rule engine: file validation, value-set lookup, criterion kinds and outcomes."""

import shutil
import textwrap
from pathlib import Path

import pytest
from facts import ON, cond, coverage, failing, med, obs, order, pain, proc, record

from cds_service.guideline import Guideline, RuleFileError
from cds_service.guideline.kinds.coverage import classify_line_of_business
from cds_service.model import Coding, DataCategory, Outcome

GUIDELINE_DIR = Path(__file__).resolve().parent.parent / "cds_service" / "guideline"


def write_rules(tmp_path, text: str, name="test.yaml") -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / name).write_text(textwrap.dedent(text))
    return rules


def load(tmp_path, text: str) -> Guideline:
    return Guideline.load(
        rules_dir=write_rules(tmp_path, text), valuesets_dir=GUIDELINE_DIR / "valuesets"
    )


SECTION = """\
id: demo
title: Demo section
section: Demo
codes:
  - {system: cpt, code: "99991", display: Demo primary, region: lumbosacral,
     image_guided: true}
  - {system: cpt, code: "99992", display: Demo add-on, region: lumbosacral,
     add_on_of: ["99991"]}
rules:
"""


def rules(body: str) -> str:
    return SECTION + textwrap.indent(textwrap.dedent(body), "  ")


# --- loading and validation -----------------------------------------------------------


def test_shipped_rule_files_load_and_cover_the_spine_codes(guideline):
    spine = [
        "62320",
        "62321",
        "62322",
        "62323",
        "64479",
        "64480",
        "64483",
        "64484",
        "64490",
        "64491",
        "64492",
        "64493",
        "64494",
        "64495",
        "64633",
        "64634",
        "64635",
        "64636",
        "64625",
        "27096",
        "64451",
    ]
    assert all(guideline.covers(Coding("cpt", c)) for c in spine)
    assert guideline.covers(Coding("hcpcs", "G0260"))
    # CPT codes sent under the HCPCS URI are still recognised.
    assert guideline.covers(Coding("hcpcs", "62323"))
    assert not guideline.covers(Coding("cpt", "99213"))
    assert not guideline.covers(Coding("snomed", "62323"))


@pytest.mark.parametrize(
    ("body", "rule", "field", "message"),
    [
        (
            "- {id: r1, text: t, kind: nope}",
            "r1",
            "kind",
            "unknown criterion kind 'nope'",
        ),
        (
            "- {id: r1, text: t, kind: pain-score, params: {codes: pain-intensity}}",
            "r1",
            "params.min",
            "Missing data for required field.",
        ),
        (
            "- {id: r1, text: t, kind: pain-score, params: {codes: nope, min: 3}}",
            "r1",
            "params.codes",
            "unknown value set 'nope'",
        ),
        (
            "- {id: r1, text: t, kind: always, role: maybe, params: {explanation: x}}",
            "r1",
            "role",
            "Must be one of: requirement, exclusion, limit, review.",
        ),
        (
            "- {id: r1, kind: always, params: {explanation: x}}",
            "r1",
            "text",
            "Missing data for required field.",
        ),
        (
            "- {id: r1, text: t, kind: always, codes: ['11111'],"
            " params: {explanation: x}}",
            "r1",
            "codes",
            "codes not in this section: ['11111']",
        ),
        (
            """\
         - id: r1
           text: t
           kind: conservative-therapy
           params:
             waivers:
               - {id: w1, text: w, kind: pain-score,
                  params: {codes: pain-intensity, min: 30}}
         """,
            "r1",
            "params.waivers[0].params.min",
            "Must be greater than or equal to 0 and less than or equal to 10.",
        ),
    ],
)
def test_broken_rule_file_names_file_rule_and_field(
    tmp_path, body, rule, field, message
):
    with pytest.raises(RuleFileError) as caught:
        load(tmp_path, rules(body))
    error = caught.value
    assert (Path(error.file).name, error.rule, error.field, error.message) == (
        "test.yaml",
        rule,
        field,
        message,
    )
    assert str(error).startswith(f"{error.file}, rule {rule!r}, field {field!r}: ")


def test_not_yaml_is_reported(tmp_path):
    with pytest.raises(RuleFileError, match="test.yaml: not valid YAML"):
        load(tmp_path, "id: [unclosed")


def test_code_in_two_sections_is_refused(tmp_path):
    rules_dir = write_rules(
        tmp_path, rules("- {id: a, text: t, kind: always, params: {explanation: x}}")
    )
    (rules_dir / "other.yaml").write_text(
        (rules_dir / "test.yaml")
        .read_text()
        .replace("id: demo", "id: other")
        .replace("id: a,", "id: b,")
    )
    with pytest.raises(RuleFileError, match="code 99991 already belongs to rule set"):
        Guideline.load(rules_dir=rules_dir, valuesets_dir=GUIDELINE_DIR / "valuesets")


def test_broken_value_set_names_file_set_and_field(tmp_path):
    vs_dir = tmp_path / "vs"
    shutil.copytree(GUIDELINE_DIR / "valuesets", vs_dir)
    (vs_dir / "zz.yaml").write_text(
        "valuesets:\n  - id: bad\n    title: Bad\n    codes:\n"
        "      - {system: http://example.org/x, code: '1', tag: V}\n"
    )
    with pytest.raises(RuleFileError) as caught:
        Guideline.load(valuesets_dir=vs_dir)
    assert (caught.value.rule, caught.value.field) == ("bad", "codes[0].system")
    assert caught.value.message == "unknown code system 'http://example.org/x'"


# --- value sets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "expected"),
    [
        (Coding("icd10cm", "M54.16"), True),
        (Coding("icd10cm", "m5416"), True),
        (Coding("icd10cm", " M54.1 "), True),
        (Coding("icd10cm", "M54.5"), False),
        (Coding("icd10cm", "M5"), False),
        (Coding("snomed", "128196005"), True),
        (Coding("snomed", "1281960051"), False),
        (Coding("loinc", "128196005"), False),
    ],
)
def test_radiculopathy_value_set_matching(guideline, coding, expected):
    assert guideline.valuesets["radiculopathy"].contains(coding) is expected


def test_medications_match_by_rxcui_or_ingredient_word(guideline):
    nsaids = guideline.valuesets["nsaids"]
    assert nsaids.match([Coding("rxnorm", "7258")]) == "code"
    assert (
        nsaids.match([Coding("rxnorm", "849574", "Naproxen sodium 220 MG Oral Tablet")])
        == "name"
    )
    assert nsaids.match([], "IBUPROFEN 600 mg tab") == "name"
    assert nsaids.match([Coding("rxnorm", "1", "Ibuprofenoid")]) is None


def test_sop_codes_match_by_prefix_except_medigap(guideline):
    commercial = guideline.valuesets["lob-commercial"]
    assert commercial.contains(Coding("sop", "512"))
    assert commercial.contains(Coding("sop", "5"))
    assert not commercial.contains(Coding("sop", "523"))
    assert guideline.valuesets["lob-medicare"].contains(Coding("sop", "111"))


def test_pain_answer_codes_carry_their_numbers(guideline):
    answers = guideline.valuesets["pain-answers"]
    assert answers.value_of(Coding("loinc", "LA10139-6")) == 7
    assert answers.value_of(Coding("loinc", "LA0000-0")) is None


def test_is_relevant_and_observation_codes(guideline):
    assert guideline.is_relevant(Coding("icd10cm", "M51.16"))
    assert guideline.is_relevant(Coding("rxnorm", "1", "Celecoxib 200 MG Oral Capsule"))
    assert guideline.is_relevant(Coding("cpt", "64493"))
    assert not guideline.is_relevant(Coding("snomed", "59621000"))  # hypertension
    codes = {c.code for c in guideline.observation_codes()}
    assert {"72514-3", "38208-5", "97909-6", "82237-9", "91146-1"} <= codes
    assert not any(c.startswith("LA") for c in codes)


def test_catalogue_lists_codes_rules_and_readings(guideline):
    catalogue = {entry["id"]: entry for entry in guideline.catalogue()}
    # The other sections of the guideline are tested in test_rules_more.py.
    assert {
        "epidural-interlaminar",
        "epidural-transforaminal",
        "facet-block",
        "facet-denervation",
        "sacroiliac",
    } <= set(catalogue)
    facet = catalogue["facet-block"]
    assert [c["code"] for c in facet["codes"]] == [
        "64490",
        "64491",
        "64492",
        "64493",
        "64494",
        "64495",
    ]
    freq = next(r for r in facet["rules"] if r["id"] == "facet-tx-frequency")
    assert freq["role"] == "limit"
    assert freq["params"] == {
        "procedures": "facet-blocks",
        "max_count": 1,
        "window_months": 2,
        "per_region": True,
    }
    assert freq["applies_when"]["kind"] == "procedure-history"
    assert freq["reading"].startswith("The double negative is read as")


# --- evaluation and outcome -----------------------------------------------------------


def test_only_selected_covered_orders_get_a_determination(guideline):
    rec = record(
        conditions=[cond("si", "icd10cm:M46.1")],
        medications=[med("n", "naproxen 500 MG", 30)],
    )
    dets = guideline.evaluate(
        rec, [order("99213"), order("27096"), order("62323", selected=False)], ON
    )
    assert [(d.billing_code.code, d.rule_set) for d in dets] == [
        ("27096", "sacroiliac")
    ]


def test_outcome_review_and_effective_dates(tmp_path):
    g = load(
        tmp_path,
        rules("""\
        - id: later
          text: applies from 2027
          effective_from: 2027-01-01
          role: exclusion
          kind: always
          params: {explanation: not yet}
        - id: review
          text: needs a reviewer
          role: review
          kind: manual-review
          params: {reason: Unlisted code.}
        """),
    )
    (d,) = g.evaluate(record(), [order("99991")], ON)
    assert (d.outcome, d.manual_review, [r.criterion_id for r in d.results]) == (
        Outcome.CONDITIONAL,
        "Unlisted code.",
        ["review"],
    )
    (d,) = g.evaluate(record(), [order("99991")], ON.replace(year=2027))
    assert d.outcome is Outcome.NOT_COVERED


def test_line_of_business_kind(tmp_path):
    g = load(
        tmp_path,
        rules("""\
        - {id: medicare-only, text: t, kind: line-of-business,
           params: {any_of: [medicare]}}
        """),
    )

    def outcome(*coverages, unavailable=()):
        (d,) = g.evaluate(
            record(coverages=coverages, unavailable=unavailable), [order("99991")], ON
        )
        return d.outcome, failing(d)

    assert outcome(coverage("c", "121")) == (Outcome.COVERED, {})
    assert outcome(coverage("c", "141")) == (Outcome.COVERED, {})  # D-SNP: dual
    assert outcome(coverage("c", "512")) == (
        Outcome.CONDITIONAL,
        {"medicare-only": "not-met"},
    )
    assert outcome(coverage("c", "7")) == (
        Outcome.CONDITIONAL,
        {"medicare-only": "not-documented"},
    )
    assert outcome(coverage("c", "121", status="cancelled")) == (
        Outcome.CONDITIONAL,
        {"medicare-only": "not-documented"},
    )
    assert outcome(unavailable={DataCategory.COVERAGE}) == (
        Outcome.INDETERMINATE,
        {"medicare-only": "not-documented"},
    )


def test_medicare_and_medicaid_coverages_make_a_dual_member(guideline):
    code_sets = {
        line: guideline.valuesets[f"lob-{line}"]
        for line in ("dual", "medicare", "medicaid", "commercial")
    }
    lines, evidence = classify_line_of_business(
        [coverage("a", "111"), coverage("b", "21")], ON, code_sets, {}
    )
    assert lines == {"dual", "medicare", "medicaid"}
    assert [e.reference for e in evidence] == ["Coverage/a", "Coverage/b"]
    lines, _ = classify_line_of_business(
        [coverage("a", None)], ON, code_sets, {"medicare": ["VIP Essential"]}
    )
    assert lines == set()


def test_frequency_limit_by_lines_counts_drafts(tmp_path):
    g = load(
        tmp_path,
        rules("""\
        - id: three-in-90
          text: at most 3 in 90 days
          role: limit
          kind: frequency-limit
          params: {procedures: facet-blocks, max_count: 3, window_days: 90,
                    per_region: false, unit: line}
        """),
    )
    rec = record(
        procedures=[
            proc("a", "64493", 10),
            proc("b", "64490", 80),
            proc("old", "64493", 100),
        ]
    )
    drafts = [order("99991"), order("64493", selected=False)]
    (d,) = g.evaluate(rec, drafts, ON)
    assert failing(d) == {}
    rec.procedures.append(proc("c", "64494", 10))
    (d,) = g.evaluate(rec, drafts, ON)
    assert failing(d) == {"three-in-90": "not-met"}
    assert d.outcome is Outcome.NOT_COVERED


def test_any_of_and_always_met(tmp_path):
    g = load(
        tmp_path,
        rules("""\
        - id: either
          text: pain or PT
          kind: any-of
          params:
            criteria:
              - {id: either-pain, text: pain, kind: pain-score,
                 params: {codes: pain-intensity, min: 5}}
              - {id: either-pt, text: PT, kind: conservative-therapy,
                 params: {procedures: [physical-therapy], min_days: 0}}
        - {id: fine, text: always fine, kind: always,
           params: {state: met, explanation: ok}}
        """),
    )
    (d,) = g.evaluate(record(observations=[pain("p", 2, 1)]), [order("99991")], ON)
    assert failing(d) == {"either": "not-documented"}
    (d,) = g.evaluate(record(observations=[pain("p", 6, 1)]), [order("99991")], ON)
    assert d.outcome is Outcome.COVERED
    (d,) = g.evaluate(record(procedures=[proc("pt", "97110", 3)]), [order("99991")], ON)
    assert d.results[0].explanation.startswith("PT: Conservative therapy since")


@pytest.mark.parametrize(
    ("value", "unit", "state"),
    [
        (7, None, "met"),
        (70, "mm", "met"),
        (20, "mm", "not-met"),
        (45, None, "not-documented"),
    ],
)
def test_pain_scores_read_vas_millimetres_and_skip_off_scale(
    tmp_path, value, unit, state
):
    g = load(
        tmp_path,
        rules("""\
        - {id: pain, text: pain, kind: pain-score,
           params: {codes: pain-intensity, min: 6}}
        """),
    )
    (d,) = g.evaluate(
        record(observations=[obs("p", "72514-3", value, 2, unit=unit)]),
        [order("99991")],
        ON,
    )
    assert d.results[0].state.value == state


def test_pain_score_ignores_entered_in_error_and_takes_the_latest(tmp_path):
    g = load(
        tmp_path,
        rules("""\
        - {id: pain, text: pain, kind: pain-score,
           params: {codes: pain-intensity, min: 6}}
        """),
    )
    observations = [
        pain("old", 8, 30),
        pain("new", 4, 3),
        obs("bad", "72514-3", 9, 1, status="entered-in-error"),
    ]
    (d,) = g.evaluate(record(observations=observations), [order("99991")], ON)
    r = d.results[0]
    assert (r.state.value, r.explanation) == (
        "not-met",
        "Latest pain score 4/10 on 2026-11-30 is below 6/10.",
    )
    assert [e.reference for e in r.evidence] == ["Observation/new"]


def test_condition_duration_and_abatement(tmp_path):
    g = load(
        tmp_path,
        rules("""\
        - {id: chronic, text: 3 months, kind: condition-present,
           params: {any_of: [axial-spine-pain], min_duration_days: 90}}
        """),
    )

    def state(*conditions):
        (d,) = g.evaluate(record(conditions=conditions), [order("99991")], ON)
        return d.results[0].state.value

    assert state(cond("a", "icd10cm:M54.50", onset=100)) == "met"
    assert state(cond("a", "icd10cm:M54.50", onset=30)) == "not-met"
    assert state(cond("a", "icd10cm:M54.50", onset=None)) == "not-documented"
    assert (
        state(cond("a", "icd10cm:M54.50", onset=200, abatement=10)) == "not-documented"
    )
    assert state(cond("a", "icd10cm:M54.50", onset=200, clinical="remission")) == (
        "not-documented"
    )


def test_add_on_primary_done_earlier_the_same_day(guideline):
    rec = record(
        conditions=[cond("c", "snomed:278860009")], procedures=[proc("p", "64493", 0)]
    )
    (d,) = guideline.evaluate(rec, [order("64494")], ON)
    add_on = next(r for r in d.results if r.criterion_id == "facet-add-on-primary")
    assert add_on.state.value == "met"
    assert [e.reference for e in add_on.evidence] == ["Procedure/p"]


def _busy_record():
    """A long-followed patient: hundreds of facts, most irrelevant to the criteria."""
    conditions = [cond(f"c{i}", f"snomed:{100000 + i}") for i in range(60)]
    conditions += [cond("r", "icd10cm:M54.16"), cond("clbp", "snomed:278860009")]
    observations = [pain(f"p{i}", i % 10, i * 3) for i in range(150)]
    observations += [obs(f"o{i}", "8867-4", 70, i) for i in range(150)]
    medications = [med(f"m{i}", f"lisinopril {i} MG", i * 5) for i in range(80)]
    medications.append(med("n", "Naproxen sodium 220 MG Oral Tablet", 120))
    procedures = [proc(f"x{i}", "430193006", i * 7) for i in range(80)]
    procedures += [proc("f1", "64493", 100), proc("f2", "64493", 70)]
    return record(conditions, observations, medications, procedures)


def test_busy_record_evaluated_for_four_orders(guideline):
    rec = _busy_record()
    orders = [order("62323"), order("64493"), order("64494"), order("27096")]
    dets = guideline.evaluate(rec, orders, ON)
    assert [d.rule_set for d in dets] == [
        "epidural-interlaminar",
        "facet-block",
        "facet-block",
        "sacroiliac",
    ]


def test_codes_no_criterion_reads_are_not_relevant(guideline):
    codings = [Coding("snomed", str(100000 + i)) for i in range(200)]
    codings += [Coding("rxnorm", "1", "lisinopril 10 MG Oral Tablet")] * 50
    assert not any(guideline.is_relevant(c) for c in codings)


def test_loading_twice_gives_the_same_rule_sets(guideline):
    assert sorted(Guideline.load().rule_sets) == sorted(guideline.rule_sets)


REGION_SECTION = """\
id: regions
title: Region demo
section: Regions
codes:
  - {system: cpt, code: "99993", display: Neck, region: cervical-thoracic}
  - {system: cpt, code: "99994", display: Low back, region: lumbosacral}
  - {system: cpt, code: "99995", display: Sacroiliac, region: sacroiliac}
rules:
  - {id: present, text: radicular pain, kind: condition-present,
     params: {any_of: [radiculopathy], same_region: true}}
  - {id: absent, text: no radicular pain, kind: condition-absent,
     params: {any_of: [radiculopathy], same_region: true}}
  - {id: anywhere, text: radicular pain in any region, kind: condition-present,
     params: {any_of: [radiculopathy]}}
"""


def states(determination) -> dict[str, str]:
    return {r.criterion_id: r.state.value for r in determination.results}


@pytest.mark.parametrize(
    ("codes", "order_code", "expected"),
    [
        (["icd10cm:M54.16"], "99994", ("met", "not-met")),
        (["icd10cm:M54.16"], "99993", ("not-documented", "met")),
        (["snomed:11049006"], "99994", ("not-documented", "met")),
        (["snomed:11049006"], "99993", ("met", "not-met")),
        # Thoracolumbar and unspecified-site codes name no region: either counts.
        (["icd10cm:M54.15"], "99993", ("met", "not-met")),
        (["icd10cm:M54.15"], "99994", ("met", "not-met")),
        (["icd10cm:M54.10"], "99993", ("met", "not-met")),
        (["icd10cm:M47.25"], "99993", ("met", "not-met")),
        # A second, untagged coding of the same condition keeps it in any region.
        (["icd10cm:M54.16", "snomed:82473003"], "99993", ("met", "not-met")),
        # An order without a spine region keeps every condition.
        (["icd10cm:M54.16"], "99995", ("met", "not-met")),
    ],
)
def test_same_region_param_of_the_condition_kinds(
    tmp_path, codes, order_code, expected
):
    g = Guideline.load(
        rules_dir=write_rules(tmp_path, REGION_SECTION),
        valuesets_dir=GUIDELINE_DIR / "valuesets",
    )
    (d,) = g.evaluate(record(conditions=[cond("r", *codes)]), [order(order_code)], ON)
    present, absent = expected
    assert states(d) == {"present": present, "absent": absent, "anywhere": "met"}


def test_other_region_conditions_are_named_in_the_explanations(tmp_path):
    g = Guideline.load(
        rules_dir=write_rules(tmp_path, REGION_SECTION),
        valuesets_dir=GUIDELINE_DIR / "valuesets",
    )
    rec = record(conditions=[cond("r", "icd10cm:M54.16", onset=None)])
    (d,) = g.evaluate(rec, [order("99993")], ON)
    present, absent, _ = d.results
    assert present.explanation == (
        "M54.16 (M54.16) is on record, but the order is for the cervical/thoracic "
        "spine."
    )
    assert [e.description for e in present.evidence] == ["M54.16 (other region)"]
    assert absent.explanation == (
        "No current radicular pain (radiculopathy, radiculitis or sciatica) on "
        "record for the cervical/thoracic spine; M54.16 (M54.16) concerns another "
        "region."
    )


@pytest.mark.parametrize(
    ("code", "region"),
    [
        ("icd10cm:M54.12", "cervical-thoracic"),
        ("icd10cm:M54.14", "cervical-thoracic"),
        ("icd10cm:M5416", "lumbosacral"),
        ("icd10cm:M54.18", "lumbosacral"),
        ("icd10cm:M54.15", None),
        ("icd10cm:M54.1", None),
        ("icd10cm:M51.17", "lumbosacral"),
        ("icd10cm:M50.121", "cervical-thoracic"),
        ("icd10cm:M47.26", "lumbosacral"),
        ("snomed:128196005", "lumbosacral"),
        ("snomed:82473003", None),
        ("snomed:99999999", None),
    ],
)
def test_value_set_region_is_the_most_specific_entry(guideline, code, region):
    system, value = code.split(":")
    valueset = guideline.valuesets["radiculopathy"]
    assert valueset.region_of(Coding(system, value)) == region
