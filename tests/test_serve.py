"""`pain-cds serve` on gunicorn: graceful shutdown, JSON logs and shared metrics."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from conftest import EVALUATION_DATE, slow_conditions_request, spine_request

from cds_service import create_app
from cds_service.config import Settings
from cds_service.storage import Store

SIGN = "pain-management-order-sign"

pytestmark = pytest.mark.slow


def _env(tmp_path, **extra) -> dict[str, str]:
    env = {
        "PAIN_CDS_AUTH": "off",
        "PAIN_CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite'}",
        "PAIN_CDS_EVALUATION_DATE": EVALUATION_DATE,
        "PAIN_CDS_WORKERS": "2",
        "PAIN_CDS_FHIR_TIMEOUT": "10",
        "PAIN_CDS_FHIR_DEADLINE": "12",
        "PAIN_CDS_GRACEFUL_TIMEOUT": "20",
    }
    env.update(extra)
    return env


def test_a_call_in_flight_at_sigterm_is_answered(serve_process, fhir_stub, tmp_path):
    server = serve_process(_env(tmp_path))
    server.wait_ready()
    # The client did not prefetch conditions: the worker asks the (slow) EHR server.
    body = slow_conditions_request(fhir_stub, delay=3.0)

    answer: dict = {}

    def call() -> None:
        response = requests.post(f"{server.url}/cds-services/{SIGN}", json=body)
        answer.update(
            status=response.status_code, body=response.json(), at=time.monotonic()
        )

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 20
    while not fhir_stub.calls_to("Condition") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fhir_stub.calls_to("Condition"), "the call never reached the FHIR server"

    stopped_at = time.monotonic()
    exit_code = server.terminate()
    caller.join(timeout=30)

    assert answer["status"] == 200
    assert answer["at"] > stopped_at  # answered after the stop signal, not before
    assert exit_code == 0
    # The whole answer, as the same request gets it from the app in this process.
    fhir_stub.reply(
        "Condition", body={"resourceType": "Bundle", "type": "searchset", "entry": []}
    )
    settings = Settings.from_env(_env(tmp_path, PAIN_CDS_DATABASE_URL="sqlite://"))
    expected = (
        create_app(settings).test_client().post(f"/cds-services/{SIGN}", json=body)
    )
    assert answer["body"] == expected.get_json()
    assert answer["body"]["cards"] != []
    # The worker wrote the call's audit row before it left.
    record = Store(f"sqlite:///{tmp_path / 'serve.sqlite'}").calls()
    assert [(row["hook_instance"], row["status"]) for row in record] == [
        (body["hookInstance"], 200)
    ]

    lines = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    assert "Handling signal: term" in messages
    [call_line] = [line for line in lines if line["message"] == "hook call"]
    assert call_line["hookInstance"] == body["hookInstance"]
    assert call_line["status"] == 200
    assert call_line["duration_ms"] >= 3000
    # Stopping is not an error: the master logs nothing at ERROR or above.
    assert [line for line in lines if line["level"] in ("ERROR", "CRITICAL")] == []


def test_metrics_add_up_over_all_workers(serve_process, tmp_path):
    server = serve_process(_env(tmp_path, PAIN_CDS_WORKERS="3"))
    server.wait_ready()
    body = spine_request("http://127.0.0.1:9/fhir")
    session = requests.Session()
    for _ in range(12):
        # A new connection each time, so that the calls spread over the workers.
        response = requests.post(f"{server.url}/cds-services/{SIGN}", json=body)
        assert response.status_code == 200
    lines = session.get(f"{server.url}/metrics").text.splitlines()
    calls = [
        line
        for line in lines
        if line.startswith("pain_cds_hook_calls_total{") and f'service="{SIGN}"' in line
    ]
    assert calls == [
        f'pain_cds_hook_calls_total{{hook="order-sign",service="{SIGN}",'
        'status="200"} 12.0'
    ]
    latency = "pain_cds_hook_duration_seconds_count"
    [latency_count] = [line for line in lines if line.startswith(latency)]
    assert latency_count.endswith(" 12.0")
    assert server.terminate() == 0
