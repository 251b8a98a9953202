"""Shared fixtures: the app, a test client, a live server and a loopback FHIR stub."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
# The public example requests and synthetic patients of shared/realdata, kept verbatim
# in tests/realdata (SOURCES.md there names each origin) so a lone clone tests alike.
REALDATA = Path(os.environ.get("PAIN_CDS_REALDATA", ROOT / "tests" / "realdata"))
FIXTURES = ROOT / "fixtures"
# Every test judges as of this date, so that ages of diagnoses and therapies are
# fixed; the service itself uses today's UTC date.
EVALUATION_DATE = "2026-12-03"


class QuietHTTPServer(ThreadingHTTPServer):
    """A stub server that stays quiet when a client leaves before its answer.

    Tests of timeouts make the client give up on a delayed answer; the handler's
    write then fails, and socketserver would print the traceback to stderr in
    the middle of whichever test runs next.
    """

    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def realdata(name: str):
    return json.loads((REALDATA / name).read_text())


@pytest.fixture(scope="session")
def guideline():
    from cds_service.guideline import Guideline

    return Guideline.load()


@pytest.fixture
def settings(tmp_path):
    from cds_service.config import Settings

    return Settings(
        auth=False,
        database_url=f"sqlite:///{tmp_path / 'audit.sqlite'}",
        evaluation_date=EVALUATION_DATE,
        fhir_timeout=1.0,
        fhir_deadline=2.0,
    )


@pytest.fixture
def app(settings, guideline):
    from cds_service import create_app

    return create_app(settings, guideline=guideline)


@pytest.fixture
def client(app):
    return app.test_client()


@dataclass
class LiveServer:
    url: str
    app: object


@pytest.fixture(scope="session")
def live_server(guideline, tmp_path_factory):
    """The app on a real threaded WSGI server on a free loopback port."""
    from cds_service import create_app
    from cds_service.config import Settings

    database = tmp_path_factory.mktemp("live") / "audit.sqlite"
    settings = Settings(
        auth=False,
        database_url=f"sqlite:///{database}",
        evaluation_date=EVALUATION_DATE,
        fhir_timeout=1.0,
        fhir_deadline=2.0,
    )
    app = create_app(settings, guideline=guideline)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield LiveServer(url=f"http://127.0.0.1:{server.server_port}", app=app)
    server.shutdown()
    thread.join(timeout=5)


# --- a programmable FHIR server on loopback ------------------------------------------


@dataclass
class StubReply:
    status: int = 200
    body: object = None
    delay: float = 0.0
    headers: dict = field(default_factory=dict)


@dataclass
class StubCall:
    method: str
    path: str
    query: str
    headers: dict


class FhirStub:
    """A loopback FHIR server whose answers tests program.

    `reply("Condition", body=...)` answers `GET {url}/Condition?anything`; a route
    with a query (`"Condition?page=2"`) is matched before the bare path. Unknown
    routes get 404 with an OperationOutcome. Every call is kept in `calls`.
    """

    def __init__(self):
        self.routes: dict[str, list[StubReply]] = {}
        self.calls: list[StubCall] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                stub._answer(self)

            def log_message(self, *args):
                pass

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.url = self.base + "/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, route: str, body=None, status=200, delay=0.0, headers=None):
        """Program the answer to `GET /fhir/{route}`; repeated calls queue answers."""
        with self._lock:
            self.routes.setdefault(route, []).append(
                StubReply(status, body, delay, headers or {})
            )

    def bundle(self, route: str, resources: list[dict], next_route: str | None = None):
        """Program a searchset page holding `resources`, linking to `next_route`."""
        body = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": resource} for resource in resources],
        }
        if next_route:
            body["link"] = [{"relation": "next", "url": f"{self.url}/{next_route}"}]
        self.reply(route, body=body)

    def calls_to(self, resource_type: str) -> list[StubCall]:
        return [c for c in self.calls if c.path == f"/fhir/{resource_type}"]

    def reset(self):
        with self._lock:
            self.routes.clear()
            self.calls.clear()

    def _answer(self, handler: BaseHTTPRequestHandler):
        parts = urlsplit(handler.path)
        with self._lock:
            self.calls.append(
                StubCall("GET", parts.path, parts.query, dict(handler.headers))
            )
            route = parts.path.removeprefix("/fhir/")
            queue = None
            for key in (f"{route}?{parts.query}", route):
                if self.routes.get(key):
                    queue = self.routes[key]
                    break
            if queue is None:
                reply = StubReply(404, _outcome(f"no route for {route}"))
            else:
                # The last programmed answer repeats; earlier ones are used once.
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if reply.delay:
            time.sleep(reply.delay)
        payload = json.dumps(reply.body).encode() if reply.body is not None else b""
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", "application/fhir+json")
            handler.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service gave up waiting (deadline tests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _outcome(text: str) -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": text}],
    }


@pytest.fixture(scope="session")
def _fhir_stub_server():
    stub = FhirStub()
    yield stub
    stub.close()


@pytest.fixture
def fhir_stub(_fhir_stub_server):
    """A loopback FHIR server, emptied for each test (see `FhirStub`)."""
    _fhir_stub_server.reset()
    yield _fhir_stub_server
    _fhir_stub_server.reset()


# --- realistic hook requests for the hostile-input, fuzz and fault tests --------------

SYNTHETIC_SPINE_PATIENT = (
    "synthea-r4__edward499_clbp_subset_patient-conditions-procedures-meds-painscores"
    ".json"
)
_PREFETCH_KEY_OF_TYPE = {
    "Patient": "patient",
    "Condition": "conditions",
    "Procedure": "procedures",
    "Observation": "observations",
    "MedicationRequest": "medicationRequests",
}


def spine_request(fhir_server: str, cpt: str = "62323") -> dict:
    """An order-sign call for an epidural (CPT `cpt`) on the synthetic back-pain
    patient of realdata, its record split into prefetch keys as an EHR would send.
    """
    body = realdata("cds-hooks-sandbox__rx-sign_order-sign_captured.json")
    patient = realdata(SYNTHETIC_SPINE_PATIENT)
    resources = [entry["resource"] for entry in patient["entry"]]
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    prefetch: dict = {key: _searchset([]) for key in _PREFETCH_KEY_OF_TYPE.values()}
    for resource in resources:
        key = _PREFETCH_KEY_OF_TYPE[resource["resourceType"]]
        if key == "patient":
            prefetch[key] = resource
        else:
            prefetch[key]["entry"].append({"resource": resource})
    prefetch["medicationStatements"] = None
    prefetch["coverage"] = None
    order = {
        "resourceType": "ServiceRequest",
        "id": "epidural-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": EVALUATION_DATE,
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": cpt}]},
    }
    body.update(
        hookInstance=str(uuid.uuid4()),
        fhirServer=fhir_server,
        prefetch=prefetch,
    )
    body["context"].update(
        patientId=patient_id,
        draftOrders={"resourceType": "Bundle", "entry": [{"resource": order}]},
    )
    return body


def slow_conditions_request(fhir_stub, delay: float) -> dict:
    """`spine_request` without prefetched conditions, which the stub EHR answers
    (with none) after `delay` seconds."""
    fhir_stub.reply("Condition", body=_searchset([]), delay=delay)
    body = spine_request(fhir_stub.url)
    del body["prefetch"]["conditions"]
    return body


def _searchset(entries: list) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


# --- `pain-cds serve` as a real process (deployment tests) ---------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`pain-cds serve` on gunicorn, on a free loopback port, configured by `env`.

    Only the given PAIN_CDS_* variables reach it (none leak in from the developer's
    shell); its log (stdout and stderr) is kept in `log_path`.
    """

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        clean = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("PAIN_CDS_") and key != "PROMETHEUS_MULTIPROC_DIR"
        }
        clean.update(env)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cds_service.cli", "serve", "--port", str(self.port)]
            + list(args),
            env=clean,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"serve exited {code}:\n{self.log}")
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve not ready within {timeout} s:\n{self.log}")

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def serve_process(tmp_path):
    """Start `pain-cds serve` processes; any still running are killed afterwards."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str], *args: str) -> ServeProcess:
        server = ServeProcess(env, tmp_path / f"serve-{len(started)}.log", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


# --- the store on SQLite and, when PAIN_CDS_TEST_DATABASE_URL is set, PostgreSQL ------

_STORE_BACKENDS = ["sqlite"]
if os.environ.get("PAIN_CDS_TEST_DATABASE_URL"):
    _STORE_BACKENDS.append("postgres")


@pytest.fixture(params=_STORE_BACKENDS)
def store(request, tmp_path):
    """A fresh `cds_service.storage.Store` with its schema created.

    SQLite: a real file in tmp_path. PostgreSQL: a schema of its own, dropped at the
    end, so parallel runs on one database never see each other's rows.
    """
    from cds_service.storage import Store

    if request.param == "sqlite":
        store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    else:
        if not request.node.get_closest_marker("postgres"):
            request.applymarker(pytest.mark.postgres)
        schema = f"test_{uuid.uuid4().hex[:12]}"
        store = Store(os.environ["PAIN_CDS_TEST_DATABASE_URL"], schema=schema)
    store.create_schema()
    yield store
    if request.param != "sqlite":
        store.drop_schema()
    store.dispose()


# --- hand-made determinations for the cards tests ------------------------------------


class DeterminationKit:
    """Realistic Determinations built from the model's dataclasses (no engine)."""

    def __init__(self):
        from datetime import date

        from cds_service import model

        self.m = model
        self.on = date(2026, 12, 3)
        self.coverage = model.CoverageFact(
            reference="Coverage/cov-1",
            type_codings=(model.Coding("sop", "511"),),
            status="active",
            period_start=date(2026, 1, 1),
            period_end=date(2026, 12, 31),
        )

    def order(self, code="64493", order_id="sr-1", system="cpt", **extra) -> object:
        m = self.m
        uri = {
            "cpt": "http://www.ama-assn.org/go/cpt",
            "hcpcs": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        }[system]
        resource = {
            "resourceType": "ServiceRequest",
            "id": order_id,
            "status": "draft",
            "intent": "order",
            "subject": {"reference": "Patient/pat-1"},
            "authoredOn": "2026-12-03",
            "code": {"coding": [{"system": uri, "code": code}]},
            **extra,
        }
        return m.Order(
            reference=f"ServiceRequest/{order_id}",
            resource_type="ServiceRequest",
            codings=(m.Coding(system, code),),
            resource=resource,
            authored=self.on,
        )

    def result(self, criterion_id, state, role="requirement", **kwargs):
        m = self.m
        texts = {
            "myofascial-source-facet": (
                "Limitations 1: myofascial pain syndrome",
                "A facet joint or nerve block is not indicated for pain from "
                "myofascial pain syndrome.",
            ),
            "facet-dx-pain-score": (
                "Paravertebral joint/nerve blocks: 1. Diagnostic",
                "Pain is at least 6 on a 10-point scale and recurrent or constant.",
            ),
            "facet-dx-no-radiculopathy": (
                "Paravertebral joint/nerve blocks: 1. Diagnostic",
                "The pain is axial, without radiculopathy or neurogenic claudication.",
            ),
            "esi-repeat-blind-needs-imaging": (
                "Limitations 4: blind interlaminar or caudal epidurals",
                "After a failed or inadequate response to a blind interlaminar or "
                "caudal epidural, a further epidural should be done under "
                "fluoroscopy.",
            ),
            "esi-pain-score": (
                "Limitations 4: epidural steroids",
                "Pain rated at least 3 out of 10.",
            ),
        }
        section, text = texts[criterion_id]
        return m.CriterionResult(
            criterion_id=criterion_id,
            section=section,
            text=text,
            role=m.Role(role),
            state=m.State(state),
            explanation=kwargs.pop("explanation", f"Explanation of {criterion_id}."),
            **kwargs,
        )

    def determination(self, order, results, outcome, rule_set="facet-block", **kw):
        m = self.m
        return m.Determination(
            order=order,
            billing_code=order.codings[0],
            rule_set=rule_set,
            rule_set_title=kw.pop("title", "Facet joint or medial branch block"),
            outcome=m.Outcome(outcome),
            results=tuple(results),
            evaluated_on=self.on,
            coverage=kw.pop("coverage", self.coverage),
            **kw,
        )

    # Named cases, each as the engine would report it.
    def facet_myofascial(self, order=None):
        m = self.m
        order = order or self.order("64493")
        return self.determination(
            order,
            [
                self.result(
                    "facet-dx-pain-score",
                    "met",
                    explanation="Latest pain score 7/10 on 2026-11-23.",
                    evidence=(
                        m.Evidence(
                            "Pain severity 0-10",
                            "Observation/pain-1",
                            self.on.replace(day=1),
                            "7",
                        ),
                    ),
                ),
                self.result(
                    "myofascial-source-facet",
                    "not-met",
                    role="exclusion",
                    explanation="Myofascial pain syndrome (M79.18) is on the "
                    "problem list.",
                    reading="Applies when no spinal diagnosis is also current.",
                ),
            ],
            "not-covered",
        )

    def facet_pain_undocumented(self, order=None):
        order = order or self.order("64493")
        return self.determination(
            order,
            [
                self.result("facet-dx-pain-score", "not-documented"),
                self.result("facet-dx-no-radiculopathy", "met"),
            ],
            "conditional",
        )

    def facet_documented(self, order=None):
        order = order or self.order("64493")
        return self.determination(
            order,
            [
                self.result("facet-dx-pain-score", "met"),
                self.result("facet-dx-no-radiculopathy", "met"),
            ],
            "covered",
        )

    def facet_radiculopathy(self, order=None):
        order = order or self.order("64493")
        return self.determination(
            order,
            [
                self.result("facet-dx-pain-score", "met"),
                self.result("facet-dx-no-radiculopathy", "not-met"),
            ],
            "conditional",
        )

    def blind_epidural_after_failure(self, code="62322"):
        return self.determination(
            self.order(code, order_id=f"sr-{code}"),
            [
                self.result("esi-repeat-blind-needs-imaging", "not-met"),
                self.result("esi-pain-score", "met"),
            ],
            "conditional",
            rule_set="epidural-interlaminar",
            title="Epidural injection, interlaminar or caudal",
        )

    def conditions_unavailable(self, order=None):
        order = order or self.order("64493")
        return self.determination(
            order,
            [
                self.result("facet-dx-pain-score", "met"),
                self.result(
                    "facet-dx-no-radiculopathy", "not-documented", data_unavailable=True
                ),
            ],
            "indeterminate",
        )


@pytest.fixture
def kit():
    return DeterminationKit()
