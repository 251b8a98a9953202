"""`pain-cds load-fixtures`: fixture patients sent to a loopback FHIR server as PUTs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cds_service.load_fixtures import (
    FixtureError,
    LoadError,
    LoadResult,
    collect,
    fixture_files,
    load,
)

REALDATA = Path(__file__).resolve().parent / "realdata"
EDWARD = "synthea-r4__edward499_clbp_subset_" + (
    "patient-conditions-procedures-meds-painscores.json"
)
RANDOLPH = "synthea-r4-2019__smart-generated-sample_chronic-pain_subset.json"
EDWARD_ID = "0b575c00-26a1-6156-8ff8-369e3071bb77"
REPO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _realdata_dir() -> Path:
    assert (REALDATA / EDWARD).is_file(), "tests/realdata lost the synthea patient"
    return REALDATA


class FhirStandIn:
    """A FHIR server on loopback that stores transaction PUTs and records requests."""

    def __init__(self) -> None:
        self.resources: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.metadata_failures = 0  # answer /metadata with 503 this many times
        self.refuse: str | None = None  # "Type/id" answered with a 400
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                stand_in.requests.append({"method": "GET", "path": self.path})
                if self.path != "/fhir/metadata":
                    return self._send(404, {"resourceType": "OperationOutcome"})
                if stand_in.metadata_failures > 0:
                    stand_in.metadata_failures -= 1
                    return self._send(503, {"resourceType": "OperationOutcome"})
                return self._send(
                    200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(
                    {
                        "method": "POST",
                        "path": self.path,
                        "content_type": self.headers["Content-Type"],
                        "body": body,
                    }
                )
                self._send(*stand_in.transact(body))

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def transact(self, bundle: dict) -> tuple[int, dict]:
        with self.lock:
            urls = [entry["request"]["url"] for entry in bundle["entry"]]
            if self.refuse in urls:
                return 400, {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "error",
                            "code": "processing",
                            "diagnostics": f"{self.refuse}: invalid reference",
                        }
                    ],
                }
            statuses = []
            for entry in bundle["entry"]:
                url, resource = entry["request"]["url"], entry["resource"]
                assert entry["request"]["method"] == "PUT"
                assert url == f"{resource['resourceType']}/{resource['id']}"
                statuses.append("200 OK" if url in self.resources else "201 Created")
                self.resources[url] = resource
            return 200, {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [{"response": {"status": status}} for status in statuses],
            }

    def put_urls(self) -> list[list[str]]:
        return [
            [entry["request"]["url"] for entry in request["body"]["entry"]]
            for request in self.requests
            if request["method"] == "POST"
        ]


@pytest.fixture
def fhir_server() -> Iterator[FhirStandIn]:
    stand_in = FhirStandIn()
    stand_in.thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def _entries(bundle_file: Path) -> list[dict]:
    return [entry["resource"] for entry in json.loads(bundle_file.read_text())["entry"]]


@pytest.fixture
def fixtures_dir(tmp_path: Path) -> Path:
    """Two synthetic patients: a Synthea transaction Bundle and a hook request."""
    realdata = _realdata_dir()
    shutil.copy(realdata / EDWARD, tmp_path / "edward.json")
    randolph = _entries(realdata / RANDOLPH)
    patient = next(r for r in randolph if r["resourceType"] == "Patient")

    def searchset(kind: str) -> dict:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"fullUrl": f"urn:uuid:{r['id']}", "resource": r}
                for r in randolph
                if r["resourceType"] == kind
            ],
        }

    hook_request = {
        "hook": "order-sign",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {
            "patientId": patient["id"],
            "draftOrders": {
                "resourceType": "Bundle",
                "entry": [
                    {"resource": {"resourceType": "ServiceRequest", "id": "draft-1"}}
                ],
            },
        },
        "prefetch": {
            "patient": patient,
            "conditions": searchset("Condition"),
            "procedures": searchset("Procedure"),
            "observations": searchset("Observation"),
            "medications": searchset("MedicationRequest"),
            # A Coverage without an id, referring to its patient by urn:uuid.
            "coverage": {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "Coverage",
                            "status": "active",
                            "beneficiary": {"reference": f"urn:uuid:{patient['id']}"},
                            "payor": [{"display": "EmblemHealth"}],
                        }
                    },
                    {"resource": {"resourceType": "OperationOutcome", "issue": []}},
                ],
            },
        },
    }
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "randolph-order-sign.json").write_text(
        json.dumps(hook_request)
    )
    (tmp_path / "README.md").write_text("not a fixture")
    return tmp_path


def _expected_urls(resources: list[dict]) -> list[str]:
    patients = [
        f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient"
    ]
    others = sorted(
        f"{r['resourceType']}/{r['id']}"
        for r in resources
        if r["resourceType"] != "Patient"
    )
    return patients + others


def test_load_puts_every_resource_at_its_own_url(fhir_server, fixtures_dir):
    realdata = _realdata_dir()
    result = load(fhir_server.url, fixtures_dir, progress=False)

    randolph = _entries(realdata / RANDOLPH)
    randolph_id = next(r["id"] for r in randolph if r["resourceType"] == "Patient")
    coverage_urls = [
        url for url in fhir_server.resources if url.startswith("Coverage/")
    ]
    assert len(coverage_urls) == 1
    by_patient = {
        EDWARD_ID: _expected_urls(_entries(realdata / EDWARD)),
        randolph_id: _expected_urls(
            randolph + [{"resourceType": "Coverage", "id": coverage_urls[0][9:]}]
        ),
    }
    # One transaction per patient, in patient-id order, Patient entry first.
    assert fhir_server.put_urls() == [by_patient[k] for k in sorted(by_patient)]
    assert fhir_server.put_urls()[0][0] == f"Patient/{EDWARD_ID}"
    assert len(fhir_server.put_urls()[0]) == 95
    assert len(fhir_server.put_urls()[1]) == 29
    assert result == LoadResult(patients=2, resources=124, created=124, updated=0)

    posts = [r for r in fhir_server.requests if r["method"] == "POST"]
    assert [p["path"] for p in posts] == ["/fhir", "/fhir"]
    assert {p["content_type"] for p in posts} == {"application/fhir+json"}
    assert {p["body"]["type"] for p in posts} == {"transaction"}
    entry = posts[0]["body"]["entry"][0]
    assert entry["fullUrl"] == f"{fhir_server.url}/Patient/{EDWARD_ID}"
    # Draft orders are not on the EHR's server; OperationOutcomes are not data.
    assert "ServiceRequest/draft-1" not in fhir_server.resources
    assert not any(url.startswith("OperationOutcome/") for url in fhir_server.resources)


def test_references_point_at_the_loaded_resources(fhir_server, fixtures_dir):
    load(fhir_server.url, fixtures_dir, progress=False)
    condition = fhir_server.resources["Condition/734f02e6-121e-7795-3360-4d30a48bf88f"]
    assert condition["subject"] == {"reference": f"Patient/{EDWARD_ID}"}
    # Its Encounter is not in the subset: an unresolvable urn:uuid is left out.
    assert "encounter" not in condition
    coverage = next(
        r for url, r in fhir_server.resources.items() if url.startswith("Coverage/")
    )
    assert coverage["beneficiary"]["reference"].startswith("Patient/")
    assert coverage["beneficiary"]["reference"] in fhir_server.resources
    references = json.dumps(list(fhir_server.resources.values()))
    assert "urn:uuid:" not in references


def test_loading_twice_updates_the_same_resources(fhir_server, fixtures_dir):
    first = load(fhir_server.url, fixtures_dir, progress=False)
    stored = json.loads(json.dumps(fhir_server.resources))
    second = load(fhir_server.url, fixtures_dir, progress=False)

    assert first == LoadResult(patients=2, resources=124, created=124, updated=0)
    assert second == LoadResult(patients=2, resources=124, created=0, updated=124)
    puts = fhir_server.put_urls()
    assert puts[2:] == puts[:2]  # the same PUT urls, including the derived Coverage id
    assert fhir_server.resources == stored


def test_waits_for_a_server_that_is_still_starting(fhir_server, fixtures_dir):
    fhir_server.metadata_failures = 2
    result = load(fhir_server.url, fixtures_dir, wait=10, progress=False)
    assert result.created == 124
    metadata_calls = [r for r in fhir_server.requests if r["method"] == "GET"]
    assert len(metadata_calls) == 3


def test_gives_up_waiting_with_the_last_answer(fhir_server, fixtures_dir):
    fhir_server.metadata_failures = 1000
    with pytest.raises(LoadError) as error:
        load(fhir_server.url, fixtures_dir, wait=0.5, progress=False)
    assert str(error.value) == (
        f"FHIR server {fhir_server.url} did not answer /metadata within 0.5 s "
        "(last: HTTP 503)"
    )
    assert fhir_server.put_urls() == []


def test_a_refused_transaction_names_the_server_and_its_diagnostics(
    fhir_server, fixtures_dir
):
    fhir_server.refuse = f"Patient/{EDWARD_ID}"
    with pytest.raises(LoadError) as error:
        load(fhir_server.url, fixtures_dir, progress=False)
    assert str(error.value) == (
        f"FHIR server {fhir_server.url} refused a transaction: HTTP 400: "
        f"Patient/{EDWARD_ID}: invalid reference"
    )


def test_unreachable_server_is_a_load_error(fixtures_dir):
    with pytest.raises(LoadError, match=r"^FHIR server http://127\.0\.0\.1:9/fhir "):
        load("http://127.0.0.1:9/fhir", fixtures_dir, progress=False, retries=0)


def test_a_broken_fixture_file_is_named(tmp_path):
    (tmp_path / "broken.json").write_text('{"prefetch": ')
    with pytest.raises(FixtureError) as error:
        collect(fixture_files(tmp_path))
    assert error.value.path == tmp_path / "broken.json"
    assert str(error.value).startswith(f"{tmp_path / 'broken.json'}: not JSON (")


def test_missing_fixtures_directory(tmp_path):
    with pytest.raises(FixtureError, match="no such directory"):
        fixture_files(tmp_path / "nowhere")


def test_the_project_fixtures_load_every_prefetched_patient(fhir_server):
    files = fixture_files(REPO_FIXTURES)
    patients = set()
    for path in files:
        document = json.loads(path.read_text())
        patient = (document.get("prefetch") or {}).get("patient")
        if isinstance(patient, dict):
            patients.add(f"Patient/{patient['id']}")
    if not patients:
        pytest.skip("fixtures/ holds no hook request with a prefetched Patient yet")
    result = load(fhir_server.url, REPO_FIXTURES, progress=False)
    assert patients <= set(fhir_server.resources)
    assert result.resources == len(fhir_server.resources)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "load-fixtures", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_command_loads_and_reloads_with_a_progress_bar(fhir_server, fixtures_dir):
    args = ["--fhir-server", fhir_server.url + "/", "--fixtures", str(fixtures_dir)]
    first = _cli(*args, "--progress")
    second = _cli(*args, "--no-progress")

    assert (first.returncode, second.returncode) == (0, 0)
    assert first.stdout == (
        f"Loaded 124 resources of 2 patients into {fhir_server.url} "
        "(124 created, 0 updated)\n"
    )
    assert second.stdout == (
        f"Loaded 124 resources of 2 patients into {fhir_server.url} "
        "(0 created, 124 updated)\n"
    )
    assert "2/2 [" in first.stderr  # tqdm's bar, one step per patient
    assert second.stderr == ""
    assert len(fhir_server.resources) == 124


def test_command_reports_an_unreachable_server(fixtures_dir):
    done = _cli(
        "--fhir-server",
        "http://127.0.0.1:9/fhir",
        "--fixtures",
        str(fixtures_dir),
        "--wait",
        "0.2",
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(
        "pain-cds load-fixtures: FHIR server http://127.0.0.1:9/fhir did not answer "
        "/metadata within 0.2 s (last: ConnectionError)"
    )
