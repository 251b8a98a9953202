"""The container files: Compose validated against the Compose specification's schema."""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
import json
import re
import shlex
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import yaml

from cds_service.config import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETTING_NAMES = {PREFIX + item.name.upper() for item in fields(Settings)}


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft202012Validator:
    # check-jsonschema vendors the compose-spec schema; nothing is fetched at test time.
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _errors(validator, document) -> list[str]:
    return sorted(error.message for error in validator.iter_errors(document))


def test_compose_file_follows_the_compose_specification(compose_validator, compose):
    assert _errors(compose_validator, compose) == []


def test_the_schema_catches_a_broken_service(compose_validator, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["pain-cds"]["ports"] = 8080
    broken["services"]["postgres"]["restart_policy"] = "always"
    found = {
        ("/".join(map(str, error.absolute_path)), error.message)
        for error in compose_validator.iter_errors(broken)
    }
    # (A type error also makes the schema report the service's other keys as
    # unevaluated; only the errors at the broken places are asserted here.)
    assert ("services/pain-cds/ports", "8080 is not of type 'array'") in found
    assert (
        "services/postgres",
        "Unevaluated properties are not allowed ('restart_policy' was unexpected)",
    ) in found


def test_the_service_scales_without_colliding(compose):
    service = compose["services"]["pain-cds"]
    # `--scale` needs replicas without a fixed name or host port; the proxy publishes.
    assert "container_name" not in service
    assert "ports" not in service
    assert service["expose"] == ["8080"]
    assert compose["services"]["proxy"]["ports"] == ["${PAIN_CDS_HTTP_PORT:-8080}:8080"]
    nginx = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    assert re.search(r"server pain-cds:8080 resolve;", nginx)


def test_replicas_share_one_postgresql(compose):
    env = compose["services"]["pain-cds"]["environment"]
    assert env["PAIN_CDS_DATABASE_URL"] == (
        "postgresql+psycopg://pain_cds:${POSTGRES_PASSWORD:-pain_cds}"
        "@postgres:5432/pain_cds"
    )
    assert compose["services"]["pain-cds"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}
    }
    postgres = compose["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "pain_cds"
    assert postgres["volumes"] == ["postgres-data:/var/lib/postgresql/data"]


def test_the_fixture_job_loads_hapi(compose):
    job = compose["services"]["load-fixtures"]
    assert job["image"] == compose["services"]["pain-cds"]["image"]
    assert job["command"] == [
        "pain-cds",
        "load-fixtures",
        "--fhir-server",
        "http://hapi:8080/fhir",
        "--wait",
        "300",
    ]
    assert job["restart"] == "no"
    assert compose["services"]["hapi"]["image"].startswith("hapiproject/hapi:")


def test_stop_grace_outlasts_the_graceful_timeout(compose):
    service = compose["services"]["pain-cds"]
    graceful = service["environment"]["PAIN_CDS_GRACEFUL_TIMEOUT"]
    default = int(re.fullmatch(r"\$\{PAIN_CDS_GRACEFUL_TIMEOUT:-(\d+)\}", graceful)[1])
    assert int(service["stop_grace_period"].removesuffix("s")) > default


def test_every_pain_cds_variable_is_a_setting(compose):
    named = set()
    for service in compose["services"].values():
        named |= {key for key in service.get("environment") or {}}
    named |= set(re.findall(r"\b(PAIN_CDS_[A-Z_]+)=", DOCKERFILE.read_text()))
    named = {name for name in named if name.startswith(PREFIX)}
    assert named - SETTING_NAMES == set()
    assert "PAIN_CDS_WORKERS" in named


def test_mounted_files_exist(compose):
    for service in compose["services"].values():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), source


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_copies_only_files_in_the_build_context():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            copied += shlex.split(rest)[:-1]
    assert copied == [
        "setup.cfg",
        "pyproject.toml",
        "README.md",
        "cds_service",
        "cards",
        "fixtures",
    ]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_dockerfile_runs_the_service_as_a_non_root_user():
    instructions = _dockerfile_instructions()
    bases = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert bases == ["python:3.11-slim AS build", "python:3.11-slim"]
    user = [rest for keyword, rest in instructions if keyword == "USER"]
    assert user == ["10001:10001"]
    command = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert command == [["pain-cds", "serve"]]
    healthcheck = next(
        rest for keyword, rest in instructions if keyword == "HEALTHCHECK"
    )
    assert "/healthz" in healthcheck
