"""Helpers of the fixture-driven tests: a fixture request judged in-process or read
back from the service's HTTP answer."""

import requests

from cds_service.orders import orders_from_bundle
from cds_service.prefetch import QUERIES
from cds_service.record import UNAVAILABLE, build_record

COVERAGE_INFORMATION = (
    "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
)
# The rule files of the spine fixtures (fixtures/spine); fixtures/more has the rest.
SPINE_RULE_FILES = {
    "epidural-interlaminar.yaml",
    "epidural-transforaminal.yaml",
    "facet-block.yaml",
    "facet-denervation.yaml",
    "sacroiliac.yaml",
    "spine-limitations.yaml",
}


def case_id(case):
    return case["file"].removesuffix(".json")


def orders_of(body):
    context = body["context"]
    return orders_from_bundle(context["draftOrders"], context["selections"])


def record_of(body, guideline):
    """The PatientRecord the service builds from the request's prefetch."""
    parts = {}
    for key, value in body["prefetch"].items():
        category = QUERIES[key][0]
        if isinstance(value, dict) and value.get("resourceType") == "OperationOutcome":
            value = UNAVAILABLE
        parts.setdefault(category, []).append(value)
    values = {c: v[0] if len(v) == 1 else tuple(v) for c, v in parts.items()}
    return build_record(
        values, guideline.is_relevant, patient_id=body["context"]["patientId"]
    )


def post_order_sign(live_server, body):
    """The service's HTTP answer to an order-sign request."""
    return requests.post(
        f"{live_server.url}/cds-services/pain-management-order-sign",
        json=body,
        timeout=30,
    )


def covered_value(response: dict, order_id: str) -> str | None:
    """The `covered` code of the order's CRD coverage information."""
    for action in response.get("systemActions", []):
        resource = action.get("resource") or {}
        if resource.get("id") != order_id:
            continue
        for extension in resource.get("extension", []):
            if extension.get("url") == COVERAGE_INFORMATION:
                for sub in extension["extension"]:
                    if sub["url"] == "covered":
                        return sub["valueCode"]
    return None


def unmet_rows(response: dict, order_ref: str, guideline) -> dict[str, str]:
    """Criterion id -> state, read from the criteria table of the order's card and
    from the bullets of the data card (criteria that could not be checked)."""
    by_row = {}
    for entry in guideline.catalogue():
        for rule in entry["rules"]:
            by_row[" ".join(f"{rule['text']} ({rule['section']})".split())] = rule["id"]
    # An exclusion that holds is shown as "Applies" (its criterion is not met).
    labels = {
        "**Not met**": "not-met",
        "**Applies**": "not-met",
        "**Not documented**": "not-documented",
    }
    found = {}
    for card in response.get("cards", []):
        refs = card.get("extension", {}).get("davinci-crd.associated-resource", [])
        lines = card.get("detail", "").splitlines()
        if not refs:
            for line in lines:
                if line.startswith("- ") and line[2:] in by_row:
                    found[by_row[line[2:]]] = "not-documented"
            continue
        if order_ref not in [r.get("reference") for r in refs]:
            continue
        for line in lines:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 3 and cells[0] in by_row:
                for label, state in labels.items():
                    if cells[1].startswith(label):
                        found[by_row[cells[0]]] = state
    return found
