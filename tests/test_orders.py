"""Draft orders read from context.draftOrders, as real clients send them."""

from __future__ import annotations

from datetime import date

from conftest import realdata

from cds_service.model import CodeSystem, Coding
from cds_service.orders import orders_from_bundle


def draft_orders(name: str) -> dict:
    return realdata(name)["context"]["draftOrders"]


def test_order_select_judges_selections_only():
    context = realdata("cds-hooks-docs__order-select_example-r4.json")["context"]
    context["selections"] = ["MedicationRequest/smart-MedicationRequest-103"]
    context["draftOrders"]["entry"].append(
        {
            "resource": {
                "resourceType": "ServiceRequest",
                "id": "esi",
                "code": {
                    "coding": [
                        {"system": "http://www.ama-assn.org/go/cpt", "code": "62323"}
                    ]
                },
            }
        }
    )

    orders = orders_from_bundle(context["draftOrders"], context["selections"])

    # The NutritionOrder carries nothing the guideline reads and is passed over.
    assert [(o.reference, o.selected) for o in orders] == [
        ("MedicationRequest/smart-MedicationRequest-103", True),
        ("ServiceRequest/esi", False),
    ]
    assert orders[0].codings == (
        Coding(
            CodeSystem.RXNORM,
            "617993",
            "Amoxicillin 120 MG/ML / clavulanate potassium 8.58 MG/ML Oral Suspension",
        ),
    )


def test_stu3_procedure_request_and_medication_request():
    bundle = draft_orders("cds-hooks-docs__order-select_example-stu3.json")
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "ProcedureRequest",
                "id": "facet",
                "authoredOn": "2026-11-30",
                "code": {
                    "coding": [
                        {"system": "urn:oid:2.16.840.1.113883.6.12", "code": "64493"},
                        {"system": "http://snomed.info/sct", "code": "386761002"},
                    ],
                    "text": "Lumbar facet injection",
                },
            }
        }
    )

    orders = orders_from_bundle(bundle)

    assert [o.resource_type for o in orders] == [
        "MedicationRequest",
        "ProcedureRequest",
    ]
    facet = orders[1]
    assert facet.codings == (
        Coding(CodeSystem.CPT, "64493"),
        Coding(CodeSystem.SNOMED, "386761002"),
    )
    assert (facet.text, facet.authored, facet.selected) == (
        "Lumbar facet injection",
        date(2026, 11, 30),
        True,
    )


def test_device_request_hcpcs_code_normalised():
    bundle = draft_orders(
        "davinci-crd-ri__r4-ordersign_requestWithHydratedPrefetchBundle.json"
    )

    (order,) = orders_from_bundle(bundle)

    assert order.reference == "DeviceRequest/24439"
    assert order.codings == (Coding(CodeSystem.HCPCS, "E0424"),)
    assert order.text == "Stationary Compressed Gaseous Oxygen System, Rental"
    assert order.authored == date(2018, 8, 8)


def test_sandbox_empty_coding_and_single_entry_object():
    bundle = {
        "resourceType": "Bundle",
        "entry": {
            "resource": {
                "resourceType": "ServiceRequest",
                "id": "example-request-id",
                "status": "draft",
                "intent": "plan",
                "code": {"coding": [{}]},
            }
        },
    }

    (order,) = orders_from_bundle(bundle, ["ServiceRequest/example-request-id"])

    assert (order.reference, order.codings, order.selected) == (
        "ServiceRequest/example-request-id",
        (),
        True,
    )


def test_unknown_system_kept_as_uri_and_order_without_id_numbered():
    bundle = {
        "resourceType": "Bundle",
        "entry": [
            {"resource": {"resourceType": "NutritionOrder", "id": "diet"}},
            {
                "resource": {
                    "resourceType": "ServiceRequest",
                    "code": {"coding": [{"system": "urn:local", "code": " X1 "}]},
                }
            },
            {"fullUrl": "urn:uuid:no-resource"},
        ],
    }

    (order,) = orders_from_bundle(bundle)

    assert order.reference == "ServiceRequest/#1"
    assert order.codings == (Coding("urn:local", "X1"),)
