"""The `pain-cds` command: `serve` as a real subprocess, and `evaluate` offline."""

from __future__ import annotations

import json
import time

import pytest
import requests
from conftest import REALDATA, ServeProcess, realdata

from cds_service.cli import main

SANDBOX_SELECT = REALDATA / "cds-hooks-sandbox__rx-view_order-select_captured.json"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`pain-cds serve` on a free loopback port, as an operator would start it."""
    workdir = tmp_path_factory.mktemp("serve")
    env = {
        "PAIN_CDS_DATABASE_URL": f"sqlite:///{workdir / 'audit.sqlite'}",
        "PAIN_CDS_WORKERS": "1",
    }
    server = ServeProcess(env, workdir / "serve.log", "--no-auth")
    server.wait_ready()
    yield server.url, server
    server.terminate()


def test_serve_answers_discovery(served):
    url, _ = served
    response = requests.get(f"{url}/cds-services", timeout=5)

    assert response.status_code == 200
    assert [s["id"] for s in response.json()["services"]] == [
        "pain-management-order-select",
        "pain-management-order-sign",
    ]
    assert response.headers["Server"].startswith("gunicorn")


def test_serve_answers_both_hooks(served):
    url, server = served
    select = requests.post(
        f"{url}/cds-services/pain-management-order-select",
        json=realdata(SANDBOX_SELECT.name),
        timeout=10,
    )
    sign_body = realdata("crd-test-kit__order_select_hook_request.json")
    sign_body["hook"] = "order-sign"
    # The fixture's orders are for Patient/1288992, its context for `example`.
    sign_body["context"]["patientId"] = "1288992"
    sign = requests.post(
        f"{url}/cds-services/pain-management-order-sign", json=sign_body, timeout=10
    )

    assert (select.status_code, select.json()["cards"]) == (200, [])
    assert (sign.status_code, sign.json()["cards"]) == (200, [])
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.log.splitlines() if line[:1] == "{"]
    calls = [line for line in lines if line.get("message") == "hook call"]
    assert [(c["hookInstance"], c["hook"], c["status"]) for c in calls[-2:]] == [
        ("e56ff0db-9093-4c49-bb7e-8c7b345d9bcf", "order-select", 200),
        ("d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "order-sign", 200),
    ]
    text = server.log
    assert "SAMPLE_TOKEN" not in text
    assert "Testpatient" not in text and "1970-01-01" not in text


def test_serve_answers_cors_preflight(served):
    url, _ = served
    response = requests.options(
        f"{url}/cds-services/pain-management-order-sign",
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=5,
    )

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == (
        "https://sandbox.cds-hooks.org"
    )
    assert response.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type"
    )


def test_evaluate_prints_readable_answer(capsys):
    status = main(["evaluate", str(SANDBOX_SELECT)])

    assert status == 0
    assert capsys.readouterr().out == "0 card(s)\n"


def test_evaluate_json_prints_the_response_body(capsys):
    status = main(["evaluate", str(SANDBOX_SELECT), "--json", "--on", "2026-12-03"])

    assert status == 0
    assert json.loads(capsys.readouterr().out) == {"cards": []}


def test_evaluate_refuses_a_hook_not_served(capsys):
    path = REALDATA / "cds-hooks-docs__spec_request-patient-view-fhirauth.json"

    status = main(["evaluate", str(path)])

    assert status == 2
    assert capsys.readouterr().err == (
        "pain-cds: hook 'patient-view' is not served (only order-select, order-sign)\n"
    )


def test_evaluate_reports_a_bad_request(tmp_path, capsys):
    body = realdata(SANDBOX_SELECT.name)
    del body["context"]["patientId"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))

    status = main(["evaluate", str(path)])

    assert status == 1
    assert capsys.readouterr().out == (
        "HTTP 400\n  - context.patientId: Missing data for required field.\n"
    )


def test_evaluate_refuses_json_nested_too_deeply(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)

    status = main(["evaluate", str(path)])

    assert status == 2
    assert capsys.readouterr().err == (
        f"pain-cds: cannot read {path}: JSON nested too deeply\n"
    )


def test_evaluate_names_a_missing_hook(tmp_path, capsys):
    body = realdata(SANDBOX_SELECT.name)
    del body["hook"]
    path = tmp_path / "no-hook.json"
    path.write_text(json.dumps(body))

    status = main(["evaluate", str(path)])

    assert status == 2
    assert capsys.readouterr().err == (
        f"pain-cds: the request in {path} has no `hook` "
        "(expected one of order-select, order-sign)\n"
    )


def test_report_on_a_missing_database_is_one_line(capsys):
    status = main(["report", "--database-url", "sqlite:////nonexistent/x.db"])

    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "pain-cds: cannot read the database sqlite:////nonexistent/x.db: "
        "unable to open database file\n"
    )


def test_report_error_hides_the_database_password(capsys):
    url = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/test"

    status = main(["report", "--database-url", url])

    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "pain-cds: cannot read the database "
        "postgresql+psycopg://postgres:***@127.0.0.1:1/test: "
    )
    assert "s3cret-pw" not in err and len(err.splitlines()) == 1


def test_report_help_says_the_default_database_is_relative(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "[PAIN_CDS_DATABASE_URL; default sqlite:///pain-cds.sqlite, relative to the "
        "current directory]" in help_text
    )
