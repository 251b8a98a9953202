"""Tests for code-system normalisation and value-set matching."""

import pytest

from cds_service.guideline.valuesets import normalize_code, normalize_system


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://www.ama-assn.org/go/cpt", "cpt"),
        ("urn:oid:2.16.840.1.113883.6.12", "cpt"),
        ("https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "hcpcs"),
        ("urn:oid:2.16.840.1.113883.6.285", "hcpcs"),
        ("http://hl7.org/fhir/sid/icd-10-cm", "icd10cm"),
        ("urn:oid:2.16.840.1.113883.6.90", "icd10cm"),
        ("http://snomed.info/sct", "snomed"),
        ("http://loinc.org", "loinc"),
        ("http://loinc.org/", "loinc"),
        ("http://www.nlm.nih.gov/research/umls/rxnorm", "rxnorm"),
        ("https://nahdo.org/sopt", "sop"),
        ("urn:oid:2.16.840.1.113883.3.221.5", "sop"),
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "actcode"),
        ("  HTTP://SNOMED.INFO/SCT  ", "snomed"),
        ("icd10cm", "icd10cm"),
    ],
)
def test_normalize_system_maps_every_known_uri(uri, expected):
    assert normalize_system(uri) == expected


@pytest.mark.parametrize("uri", [None, "", "http://example.org/local", "urn:oid:1.2.3"])
def test_normalize_system_returns_none_for_unknown(uri):
    assert normalize_system(uri) is None


def test_normalize_code_strips_icd_dot_case_and_spaces():
    assert normalize_code("icd10cm", " m54.16 ") == "M5416"
    assert normalize_code("snomed", " 278860009 ") == "278860009"
