"""Determinations of the spine sections (epidural, transforaminal, facet, SI), pure."""

import pytest
from facts import ON, cond, failing, med, obs, order, pain, proc, record

from cds_service.model import DataCategory, Outcome, State


def naproxen(ago=120, **kw):
    return med("naproxen", "Naproxen sodium 220 MG Oral Tablet", ago, **kw)


def esi_patient(**overrides):
    """Meets every epidural steroid criterion unless a part is overridden."""
    parts = dict(
        conditions=[cond("radic", "icd10cm:M54.16")],
        observations=[pain("pain", 6, 10), obs("odi", "97909-6", 30, 10)],
        medications=[naproxen()],
        procedures=[],
    )
    parts.update(overrides)
    return record(**parts)


def decide(guideline, rec, *orders):
    return guideline.evaluate(rec, list(orders), ON)


# --- interlaminar / caudal epidural ---------------------------------------------------


def test_epidural_all_criteria_met_is_covered(guideline):
    (d,) = decide(guideline, esi_patient(), order("62323"))
    assert d.outcome is Outcome.COVERED
    assert d.rule_set == "epidural-interlaminar"
    assert [r.criterion_id for r in d.results] == [
        "esi-indication",
        "esi-pain-score",
        "esi-functional-impairment",
        "esi-conservative-therapy",
        "myofascial-source-epidural",
        "same-day-single-procedure",
    ]


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([cond("a", "snomed:128196005")], {}),  # SNOMED-only lumbar radiculopathy
        ([cond("a", "icd10cm:M5416")], {}),  # ICD-10-CM without the dot
        ([cond("a", "icd10cm: m51.36 ")], {}),  # degenerative disc: discogenic
        ([cond("a", "icd10cm:M48.062")], {}),  # neurogenic claudication
        # No coded condition at all: the myofascial exclusion is not documented
        # either, since its absence cannot be read from an empty problem list.
        (
            [],
            {
                "esi-indication": "not-documented",
                "myofascial-source-epidural": "not-documented",
            },
        ),
        (
            [cond("a", text="Lumbar radiculopathy")],
            {
                "esi-indication": "not-documented",
                "myofascial-source-epidural": "not-documented",
            },
        ),
        (
            [cond("a", "icd10cm:M54.16", clinical="resolved")],
            {"esi-indication": "not-documented"},
        ),
        (
            [cond("a", "icd10cm:M54.16", verification="entered-in-error")],
            {"esi-indication": "not-documented"},
        ),
        (
            [cond("a", "icd10cm:M54.16", verification="refuted")],
            {"esi-indication": "not-documented"},
        ),
        (
            [cond("a", "snomed:202753007"), cond("b", "icd10cm:M54.50")],
            {"esi-indication": "not-met"},
        ),  # annular tear only
    ],
)
def test_epidural_indication_codings(guideline, conditions, expected):
    (d,) = decide(guideline, esi_patient(conditions=conditions), order("62322"))
    assert failing(d) == expected
    assert d.outcome is (Outcome.COVERED if not expected else Outcome.CONDITIONAL)


def test_text_only_condition_is_named_in_the_explanation(guideline):
    rec = esi_patient(conditions=[cond("a", text="Lumbar radiculopathy")])
    (d,) = decide(guideline, rec, order("62322"))
    indication, myofascial = d.failing
    assert indication.explanation.endswith(
        "1 condition(s) recorded as text only could not be assessed."
    )
    assert myofascial.explanation == (
        "The record holds no coded conditions, so the absence of myofascial pain "
        "syndrome cannot be confirmed. 1 condition(s) recorded as text only could "
        "not be assessed."
    )


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        (
            [pain("p", 2, 5), obs("odi", "97909-6", 30, 10)],
            {"esi-pain-score": "not-met"},
        ),
        (
            [pain("p", 7, 200), obs("odi", "97909-6", 30, 10)],
            {"esi-pain-score": "not-documented"},
        ),
        (
            [pain("p", 7, 5), obs("odi", "97909-6", 12, 10)],
            {"esi-functional-impairment": "not-met"},
        ),
        ([pain("p", 7, 5)], {"esi-functional-impairment": "not-documented"}),
        ([pain("p", 7, 5), obs("peg", "91146-1", 5, 3)], {}),
        ([pain("p", 7, 5), obs("ndi", "82237-9", 16, 3)], {}),
    ],
)
def test_epidural_pain_and_function(guideline, observations, expected):
    (d,) = decide(guideline, esi_patient(observations=observations), order("62323"))
    assert failing(d) == expected


def test_epidural_conservative_therapy_too_short_is_not_met(guideline):
    rec = esi_patient(medications=[naproxen(ago=20)])
    (d,) = decide(guideline, rec, order("62323"))
    assert failing(d) == {"esi-conservative-therapy": "not-met"}
    assert d.outcome is Outcome.CONDITIONAL
    (r,) = d.failing
    assert r.explanation.startswith(
        "Conservative therapy began 2026-11-13, only 20 days before 2026-12-03; at "
        "least 42 days are required. No exception applies:"
    )


def test_epidural_conservative_therapy_absent_is_not_documented(guideline):
    (d,) = decide(guideline, esi_patient(medications=[]), order("62323"))
    assert failing(d) == {"esi-conservative-therapy": "not-documented"}


def test_physical_therapy_sessions_count_as_conservative_therapy(guideline):
    rec = esi_patient(medications=[], procedures=[proc("pt", "229064008", 60)])
    (d,) = decide(guideline, rec, order("62323"))
    assert failing(d) == {}


@pytest.mark.parametrize(
    ("extra", "waiver"),
    [
        (
            {"observations": [pain("p", 6, 5), obs("odi", "97909-6", 45, 3)]},
            "significant functional loss",
        ),
        (
            {"observations": [pain("p", 8, 5), obs("odi", "97909-6", 30, 3)]},
            "severe pain unresponsive to medical management",
        ),
        (
            {"conditions": [cond("r", "icd10cm:M54.16"), cond("ckd", "icd10cm:N18.5")]},
            "inability to tolerate conservative therapy because of comorbidities",
        ),
        (
            {
                "procedures": [proc("esi", "62323", 300)],
                "observations": [
                    pain("pre", 8, 301),
                    pain("post", 2, 299),
                    pain("p", 6, 5),
                    obs("odi", "97909-6", 30, 3),
                ],
            },
            "prior successful epidural steroid injection",
        ),
    ],
)
def test_epidural_conservative_therapy_exceptions(guideline, extra, waiver):
    rec = esi_patient(medications=[naproxen(ago=10)], **extra)
    (d,) = decide(guideline, rec, order("62323"))
    assert failing(d) == {}
    therapy = next(r for r in d.results if r.criterion_id == "esi-conservative-therapy")
    assert therapy.explanation.startswith(f"Exception applies: {waiver}.")


def test_myofascial_pain_alone_excludes_epidural(guideline):
    rec = esi_patient(
        conditions=[cond("mps", "icd10cm:M79.18"), cond("lbp", "icd10cm:M54.50")]
    )
    (d,) = decide(guideline, rec, order("62323"))
    assert d.outcome is Outcome.NOT_COVERED
    assert failing(d) == {
        "esi-indication": "not-documented",
        "myofascial-source-epidural": "not-met",
    }


def test_myofascial_pain_with_radiculopathy_is_not_excluded(guideline):
    rec = esi_patient(
        conditions=[cond("mps", "icd10cm:M79.18"), cond("r", "icd10cm:M54.17")]
    )
    (d,) = decide(guideline, rec, order("62323"))
    assert d.outcome is Outcome.COVERED


def test_repeat_blind_epidural_after_poor_response_needs_imaging(guideline):
    procedures = [proc("blind", "62322", 100)]
    observations = [
        pain("pre", 8, 101),
        pain("post", 7, 100),
        pain("now", 7, 5),
        obs("odi", "97909-6", 30, 5),
    ]
    rec = esi_patient(procedures=procedures, observations=observations)
    (blind,) = decide(guideline, rec, order("62322"))
    assert failing(blind) == {"esi-repeat-blind-needs-imaging": "not-met"}
    (guided,) = decide(guideline, rec, order("62323"))
    assert failing(guided) == {}


def test_repeat_blind_epidural_response_unknown_is_not_documented(guideline):
    rec = esi_patient(procedures=[proc("blind", "62322", 100)])
    (d,) = decide(guideline, rec, order("62322"))
    assert failing(d) == {"esi-repeat-blind-needs-imaging": "not-documented"}


def test_repeat_blind_epidural_after_good_response_is_met(guideline):
    procedures = [proc("blind", "62322", 100)]
    observations = [
        pain("pre", 8, 101),
        pain("post", 3, 100),
        pain("now", 7, 5),
        obs("odi", "97909-6", 30, 5),
    ]
    rec = esi_patient(procedures=procedures, observations=observations)
    (d,) = decide(guideline, rec, order("62322"))
    assert failing(d) == {}


def test_unavailable_data_makes_the_epidural_indeterminate(guideline):
    rec = esi_patient(observations=[], unavailable={DataCategory.OBSERVATIONS})
    (d,) = decide(guideline, rec, order("62323"))
    assert d.outcome is Outcome.INDETERMINATE
    assert failing(d) == {
        "esi-pain-score": "not-documented",
        "esi-functional-impairment": "not-documented",
    }
    assert all(r.data_unavailable for r in d.failing)


# --- transforaminal -------------------------------------------------------------------


def test_transforaminal_add_on_needs_its_primary(guideline):
    rec = esi_patient()
    alone = decide(guideline, rec, order("64484"))
    assert failing(alone[0]) == {"tfesi-add-on-primary": "not-met"}
    both = decide(guideline, rec, order("64483"), order("64484"))
    assert [d.outcome for d in both] == [Outcome.COVERED, Outcome.COVERED]


def test_transforaminal_herpes_zoster_radiculitis_is_an_indication(guideline):
    rec = esi_patient(conditions=[cond("hz", "snomed:424941009")])
    (d,) = decide(guideline, rec, order("64479"))
    assert d.outcome is Outcome.COVERED


# --- facet blocks ---------------------------------------------------------------------


def facet_patient(**overrides):
    parts = dict(
        conditions=[cond("clbp", "snomed:278860009")],
        observations=[pain("pain", 7, 10), obs("odi", "97909-6", 30, 10)],
        medications=[naproxen(ago=120)],
        procedures=[],
    )
    parts.update(overrides)
    return record(**parts)


def test_facet_diagnostic_block_all_met(guideline):
    (d,) = decide(guideline, facet_patient(), order("64493"))
    assert d.outcome is Outcome.COVERED
    assert {r.criterion_id for r in d.results} == {
        "facet-dx-conservative-therapy",
        "facet-dx-axial-pain",
        "facet-dx-no-radiculopathy",
        "facet-dx-other-sources-ruled-out",
        "facet-dx-pain-score",
        "facet-dx-functional-limitation",
        "myofascial-source-facet",
        "same-day-single-procedure",
        "image-guidance-required",
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"medications": [naproxen(ago=60)]},
            {"facet-dx-conservative-therapy": "not-met"},
        ),
        ({"medications": []}, {"facet-dx-conservative-therapy": "not-documented"}),
        (
            {
                "conditions": [
                    cond("clbp", "snomed:278860009"),
                    cond("r", "icd10cm:M54.16"),
                ]
            },
            {"facet-dx-no-radiculopathy": "not-met"},
        ),
        (
            {"conditions": []},
            {
                "facet-dx-axial-pain": "not-documented",
                "facet-dx-no-radiculopathy": "not-documented",
                "facet-dx-other-sources-ruled-out": "not-documented",
                "myofascial-source-facet": "not-documented",
            },
        ),
        (
            {
                "conditions": [
                    cond("clbp", "snomed:278860009"),
                    cond("fx", "icd10cm:S32.010A"),
                ]
            },
            {"facet-dx-other-sources-ruled-out": "not-met"},
        ),
        (
            {
                "conditions": [
                    cond("clbp", "snomed:278860009"),
                    cond("fx", "icd10cm:S32.010A", clinical="resolved"),
                ]
            },
            {},
        ),
        (
            {"observations": [pain("p", 5, 3), obs("odi", "97909-6", 30, 3)]},
            {"facet-dx-pain-score": "not-met"},
        ),
        (
            {"observations": [pain("p", 7, 3)]},
            {"facet-dx-functional-limitation": "not-documented"},
        ),
    ],
)
def test_facet_diagnostic_criteria(guideline, overrides, expected):
    (d,) = decide(guideline, facet_patient(**overrides), order("64493"))
    assert failing(d) == expected


def test_facet_add_ons_need_every_earlier_level(guideline):
    rec = facet_patient()
    dets = decide(guideline, rec, order("64493"), order("64495"))
    assert failing(dets[1]) == {"facet-add-on-primary": "not-met"}
    dets = decide(guideline, rec, order("64493"), order("64494"), order("64495"))
    assert [d.outcome for d in dets] == [Outcome.COVERED] * 3


def therapeutic_history(
    first=200, second=170, relief=(8, 1), six_weeks=3, first_relief=(8, 1)
):
    """Two lumbar diagnostic blocks with the given pre/post scores of each."""
    pre, post = relief
    return dict(
        procedures=[proc("b1", "64493", first), proc("b2", "64493", second)],
        observations=[
            pain("pre1", first_relief[0], first + 1),
            pain("post1", first_relief[1], first),
            pain("pre", pre, second + 1),
            pain("post", post, second),
            pain("late", six_weeks, second - 50),
            pain("now", 7, 5),
        ],
    )


def test_facet_therapeutic_block_with_lasting_relief_is_covered(guideline):
    (d,) = decide(guideline, facet_patient(**therapeutic_history()), order("64493"))
    assert d.outcome is Outcome.COVERED
    assert [r.criterion_id for r in d.results] == [
        "facet-tx-frequency",
        "facet-tx-prior-relief",
        "myofascial-source-facet",
        "same-day-single-procedure",
        "image-guidance-required",
    ]


def test_facet_therapeutic_block_within_two_months_is_not_covered(guideline):
    history = therapeutic_history(first=80, second=40)
    (d,) = decide(
        guideline,
        facet_patient(**history),
        order("64494", selected=False),
        order("64493"),
    )
    assert d.outcome is Outcome.NOT_COVERED
    assert failing(d) == {"facet-tx-frequency": "not-met"}


def test_facet_frequency_counts_regions_apart(guideline):
    history = therapeutic_history(first=80, second=40)
    history["procedures"].append(proc("c1", "64490", 30))
    (d,) = decide(guideline, facet_patient(**history), order("64490"))
    # Only one cervical session on record: still the diagnostic phase there.
    assert "facet-dx-pain-score" in {r.criterion_id for r in d.results}


@pytest.mark.parametrize(
    ("relief", "six_weeks", "expected"),
    [
        ((8, 3), 3, {"facet-tx-prior-relief": "not-met"}),  # 62% initial relief
        ((8, 1), 6, {"facet-tx-prior-relief": "not-met"}),  # 25% at six weeks
    ],
)
def test_facet_therapeutic_relief_thresholds(guideline, relief, six_weeks, expected):
    history = therapeutic_history(relief=relief, six_weeks=six_weeks)
    (d,) = decide(guideline, facet_patient(**history), order("64493"))
    assert failing(d) == expected
    assert d.outcome is Outcome.CONDITIONAL


def test_facet_therapeutic_relief_needs_both_diagnostic_blocks(guideline):
    """A combined response from two blocks: the first block's 0% relief fails it
    although the latest block gave 88%."""
    history = therapeutic_history(first_relief=(8, 8))
    (d,) = decide(guideline, facet_patient(**history), order("64493"))
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {"facet-tx-prior-relief": "not-met"}
    (result,) = [r for r in d.results if r.criterion_id == "facet-tx-prior-relief"]
    assert result.explanation == (
        "Insufficient relief: initial relief after the 2026-05-17 procedure 0% "
        "(at least 80% required)."
    )
    # Only one block's initial scores on record: the other is not documented.
    history["observations"] = history["observations"][2:]
    (d,) = decide(guideline, facet_patient(**history), order("64493"))
    assert failing(d) == {"facet-tx-prior-relief": "not-documented"}


def test_facet_therapeutic_relief_without_scores_is_not_documented(guideline):
    history = therapeutic_history()
    history["observations"] = [pain("now", 7, 5)]
    (d,) = decide(guideline, facet_patient(**history), order("64493"))
    assert failing(d) == {"facet-tx-prior-relief": "not-documented"}


def test_myofascial_pain_excludes_facet_block_without_spondylosis(guideline):
    rec = facet_patient(
        conditions=[cond("clbp", "snomed:278860009"), cond("mps", "snomed:24693007")]
    )
    (d,) = decide(guideline, rec, order("64493"))
    assert d.outcome is Outcome.NOT_COVERED
    assert failing(d) == {"myofascial-source-facet": "not-met"}


# --- denervation ----------------------------------------------------------------------


def test_denervation_goes_to_manual_review(guideline):
    history = therapeutic_history(relief=(8, 1))
    history["observations"] += [pain("pre1", 8, 201), pain("post1", 1, 200)]
    (d,) = decide(guideline, facet_patient(**history), order("64635"))
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {"denervation-rfa-guideline": "not-documented"}
    assert d.manual_review.startswith("Facet denervation is judged by the separate")


def test_denervation_without_two_positive_blocks_is_not_documented(guideline):
    (d,) = decide(guideline, facet_patient(), order("64633"))
    assert failing(d) == {
        "denervation-prior-diagnostic-blocks": "not-documented",
        "denervation-rfa-guideline": "not-documented",
    }


def test_64625_is_not_covered(guideline):
    (d,) = decide(guideline, facet_patient(), order("64625"))
    assert d.outcome is Outcome.NOT_COVERED
    assert failing(d) == {"denervation-pulsed-rf-not-covered": "not-met"}


# --- sacroiliac -----------------------------------------------------------------------


def si_patient(**overrides):
    parts = dict(
        conditions=[cond("si", "icd10cm:M46.1")],
        observations=[pain("pain", 7, 10)],
        medications=[naproxen(ago=30)],
        procedures=[],
    )
    parts.update(overrides)
    return record(**parts)


def test_first_si_injection_is_covered(guideline):
    (d,) = decide(guideline, si_patient(), order("27096"))
    assert d.outcome is Outcome.COVERED
    assert [r.criterion_id for r in d.results] == [
        "si-indication",
        "si-conservative-therapy",
        "si-no-repeat-after-failure",
        "myofascial-source-sacroiliac",
        "same-day-single-procedure",
        "image-guidance-required",
    ]


@pytest.mark.parametrize(
    ("pre", "post", "outcome", "expected"),
    [
        (8, 1, Outcome.COVERED, {}),
        (8, 3, Outcome.CONDITIONAL, {"si-prior-positive-block": "not-met"}),
        (
            8,
            6,
            Outcome.NOT_COVERED,
            {
                "si-prior-positive-block": "not-met",
                "si-no-repeat-after-failure": "not-met",
            },
        ),
    ],
)
def test_si_repeat_depends_on_prior_relief(guideline, pre, post, outcome, expected):
    rec = si_patient(
        procedures=[proc("si1", "27096", 60)],
        observations=[pain("pre", pre, 61), pain("post", post, 60), pain("now", 7, 3)],
    )
    (d,) = decide(guideline, rec, order("G0260"), order("77003", selected=False))
    assert d.outcome is outcome
    assert failing(d) == expected


def test_si_injection_recorded_as_no_relief_stops_further_injections(guideline):
    rec = si_patient(procedures=[proc("si1", "27096", 60, outcome="No relief")])
    (d,) = decide(guideline, rec, order("27096"))
    assert d.outcome is Outcome.NOT_COVERED
    assert failing(d) == {
        "si-prior-positive-block": "not-met",
        "si-no-repeat-after-failure": "not-met",
    }


def test_g0260_without_guidance_is_not_documented(guideline):
    (d,) = decide(guideline, si_patient(), order("G0260"))
    assert failing(d) == {"image-guidance-required": "not-documented"}


def test_si_without_diagnosis_or_therapy(guideline):
    rec = si_patient(conditions=[cond("lbp", "icd10cm:M54.50")], medications=[])
    (d,) = decide(guideline, rec, order("64451"))
    assert failing(d) == {
        "si-indication": "not-documented",
        "si-conservative-therapy": "not-documented",
    }


# --- same day -------------------------------------------------------------------------


def test_epidural_and_facet_on_the_same_day_are_pending_documentation(guideline):
    rec = esi_patient(
        conditions=[cond("r", "icd10cm:M54.16"), cond("s", "icd10cm:M47.816")]
    )
    dets = decide(guideline, rec, order("62323"), order("64493"))
    assert failing(dets[0]) == {"same-day-single-procedure": "not-documented"}
    assert dets[0].outcome is Outcome.CONDITIONAL


def test_same_day_counts_procedures_already_done_that_day(guideline):
    rec = esi_patient(procedures=[proc("tf", "64483", 0)])
    (d,) = decide(guideline, rec, order("62323"))
    assert failing(d) == {"same-day-single-procedure": "not-documented"}


def test_same_day_anticoagulant_exception(guideline):
    meds = [naproxen(), med("apx", "apixaban 5 MG Oral Tablet", 300)]
    rec = esi_patient(medications=meds)
    dets = decide(guideline, rec, order("62323"), order("64483"))
    assert [failing(d) for d in dets] == [{}, {}]


def test_same_day_facet_and_si_after_positive_blocks(guideline):
    rec = record(
        conditions=[cond("clbp", "snomed:278860009"), cond("si", "icd10cm:M46.1")],
        observations=[
            pain("f-pre", 8, 201),
            pain("f-post", 1, 200),
            pain("f-late", 3, 150),
            pain("s-pre", 8, 101),
            pain("s-post", 1, 100),
            pain("now", 7, 5),
            obs("odi", "97909-6", 30, 5),
        ],
        medications=[naproxen(ago=300)],
        procedures=[
            proc("f1", "64493", 230),
            proc("f2", "64493", 200),
            proc("s1", "27096", 100),
        ],
    )
    dets = decide(guideline, rec, order("64493"), order("27096"))
    same_day = [
        next(r for r in d.results if r.criterion_id == "same-day-single-procedure")
        for d in dets
    ]
    assert [r.state for r in same_day] == [State.MET, State.MET]


def test_short_therapy_with_medications_unavailable_is_not_documented(guideline):
    rec = esi_patient(
        medications=[],
        procedures=[proc("pt", "97110", 20)],
        unavailable={DataCategory.MEDICATIONS},
    )
    (d,) = decide(guideline, rec, order("62323"))
    assert d.outcome is Outcome.INDETERMINATE
    (r,) = d.failing
    assert (r.criterion_id, r.state, r.data_unavailable) == (
        "esi-conservative-therapy",
        State.NOT_DOCUMENTED,
        True,
    )


def test_facet_blocks_older_than_two_years_restart_the_diagnostic_phase(guideline):
    history = therapeutic_history(first=900, second=800)
    history["observations"].append(obs("odi", "97909-6", 30, 5))
    (d,) = decide(guideline, facet_patient(**history), order("64493"))
    assert d.outcome is Outcome.COVERED
    assert "facet-dx-pain-score" in {r.criterion_id for r in d.results}


# --- spine region of the diagnosis against the region of the order ------------------


def result(determination, criterion_id):
    (found,) = [r for r in determination.results if r.criterion_id == criterion_id]
    return found


def test_cervical_facet_with_only_low_back_pain_is_not_documented(guideline):
    (d,) = decide(guideline, facet_patient(), order("64490"))
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {"facet-dx-axial-pain": "not-documented"}
    assert result(d, "facet-dx-axial-pain").explanation.startswith(
        "278860009 (278860009) since "
    )
    assert result(d, "facet-dx-axial-pain").explanation.endswith(
        "is on record, but the order is for the cervical/thoracic spine."
    )


def test_cervical_facet_with_chronic_neck_pain_is_covered(guideline):
    rec = facet_patient(conditions=[cond("neck", "snomed:1121000119107")])
    (d,) = decide(guideline, rec, order("64490"))
    assert d.outcome is Outcome.COVERED


def test_lumbar_facet_with_only_a_cervical_radiculopathy_is_covered(guideline):
    rec = facet_patient(
        conditions=[cond("clbp", "snomed:278860009"), cond("r", "icd10cm:M54.12")]
    )
    (d,) = decide(guideline, rec, order("64493"))
    assert d.outcome is Outcome.COVERED
    assert result(d, "facet-dx-no-radiculopathy").state is State.MET
    # The same radiculopathy bars a cervical block (and low back pain is no neck pain).
    (d,) = decide(guideline, rec, order("64490"))
    assert failing(d) == {
        "facet-dx-axial-pain": "not-documented",
        "facet-dx-no-radiculopathy": "not-met",
    }


def test_thoracolumbar_radiculopathy_bars_facet_blocks_of_either_region(guideline):
    rec = facet_patient(
        conditions=[cond("sp", "icd10cm:M47.812"), cond("r", "icd10cm:M54.15")]
    )
    (d,) = decide(guideline, rec, order("64490"))
    assert failing(d) == {"facet-dx-no-radiculopathy": "not-met"}


def test_fracture_of_the_other_region_does_not_rule_out_the_facet(guideline):
    rec = facet_patient(
        conditions=[cond("clbp", "snomed:278860009"), cond("fx", "icd10cm:S12.000A")]
    )
    (d,) = decide(guideline, rec, order("64493"))
    assert d.outcome is Outcome.COVERED
    (d,) = decide(guideline, rec, order("64490"))
    assert failing(d) == {
        "facet-dx-axial-pain": "not-documented",
        "facet-dx-other-sources-ruled-out": "not-met",
    }


@pytest.mark.parametrize(
    ("code", "order_code", "region"),
    [
        ("icd10cm:M54.16", "62321", "cervical/thoracic spine"),
        ("icd10cm:M54.16", "64479", "cervical/thoracic spine"),
        ("icd10cm:M54.12", "64483", "lumbar/sacral spine"),
        ("icd10cm:M54.12", "62323", "lumbar/sacral spine"),
        ("snomed:128196005", "62320", "cervical/thoracic spine"),
    ],
)
def test_epidural_with_a_diagnosis_of_the_other_region_is_not_documented(
    guideline, code, order_code, region
):
    rec = esi_patient(conditions=[cond("r", code, onset=None)])
    (d,) = decide(guideline, rec, order(order_code))
    assert d.outcome is Outcome.CONDITIONAL
    assert failing(d) == {"esi-indication": "not-documented"}
    label = code.split(":")[1]
    assert result(d, "esi-indication").explanation == (
        f"{label} ({label}) is on record, but the order is for the {region}."
    )


@pytest.mark.parametrize(
    ("code", "order_code"),
    [
        ("icd10cm:M54.12", "62321"),
        ("icd10cm:M54.12", "64479"),
        ("icd10cm:M50.121", "64479"),
        ("icd10cm:M54.16", "64483"),
        ("icd10cm:M54.15", "62321"),  # thoracolumbar: either region
        ("icd10cm:M54.15", "64483"),
        ("icd10cm:M96.1", "62321"),  # post-laminectomy names no region
    ],
)
def test_epidural_with_a_diagnosis_of_its_region_is_covered(
    guideline, code, order_code
):
    rec = esi_patient(conditions=[cond("r", code)])
    (d,) = decide(guideline, rec, order(order_code))
    assert d.outcome is Outcome.COVERED
