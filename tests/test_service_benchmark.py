"""Benchmarks of the request path: the record builder and whole hook calls."""

from __future__ import annotations

from conftest import realdata, spine_request

from cds_service.model import DataCategory
from cds_service.record import build_record

SIGN = "/cds-services/pain-management-order-sign"
SELECT = "/cds-services/pain-management-order-select"
EDWARD = (
    "synthea-r4__edward499_clbp_subset_patient-conditions-procedures-meds-painscores"
    ".json"
)


def test_benchmark_build_record_synthea_patient(benchmark, guideline):
    resources = [entry["resource"] for entry in realdata(EDWARD)["entry"]]
    values = {DataCategory.CONDITIONS: resources}

    record = benchmark(build_record, values, guideline.is_relevant)

    assert record.patient_id == "0b575c00-26a1-6156-8ff8-369e3071bb77"


def test_benchmark_hook_call_outside_the_guideline(benchmark, client):
    body = realdata("cds-hooks-sandbox__rx-view_order-select_captured.json")

    response = benchmark(client.post, SELECT, json=body)

    assert response.get_json() == {"cards": []}


def test_benchmark_hook_call_epidural_with_prefetch(benchmark, client, fhir_stub):
    body = spine_request(fhir_stub.url)

    response = benchmark(client.post, SIGN, json=body)

    assert len(response.get_json()["cards"]) == 1
