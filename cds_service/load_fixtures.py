"""Load the fixture patients into a FHIR server as idempotent transaction Bundles."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
# Ids for resources that carry none are derived from their content, so that a second
# load updates the same resource instead of creating a copy.
ID_NAMESPACE = uuid.UUID("5b0f8f3e-6f0e-4b8e-9a51-3d1c2b7e4a10")
# Where a resource names the patient it belongs to.
PATIENT_FIELDS = ("subject", "patient", "beneficiary")
NO_PATIENT = ""


class FixtureError(Exception):
    """A fixture file that cannot be read as FHIR JSON."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


class LoadError(Exception):
    """The FHIR server refused a transaction or could not be reached."""


@dataclass(frozen=True)
class LoadResult:
    patients: int
    resources: int
    created: int
    updated: int


@dataclass
class _Resource:
    key: str  # "Type/id"
    resource: dict[str, Any]
    aliases: tuple[str, ...]  # fullUrls other resources may reference it by
    source: Path


def fixture_files(fixtures_dir: Path) -> list[Path]:
    """Every JSON file under `fixtures_dir`, in a stable order."""
    if not fixtures_dir.is_dir():
        raise FixtureError(fixtures_dir, "no such directory")
    return sorted(path for path in fixtures_dir.rglob("*.json") if path.is_file())


def collect(paths: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    """Group the resources of the fixture files by patient id, references resolved.

    A hook request contributes its prefetch (draft orders stay out: they are not on the
    EHR's server until signed); a Bundle file contributes its entries. A resource seen
    in several files is loaded once.
    """
    found: dict[str, _Resource] = {}
    file_patient: dict[str, str] = {}
    for path in paths:
        for item in _resources_of_file(path):
            previous = found.get(item.key)
            if previous is not None and previous.resource != item.resource:
                logger.warning(
                    "fixture resource differs between files; the later one is loaded",
                    extra={
                        "resource": item.key,
                        "files": [str(previous.source), str(path)],
                    },
                )
            found[item.key] = item
            if item.key.startswith("Patient/"):
                file_patient.setdefault(str(path), item.key.split("/", 1)[1])

    aliases = {key: key for key in found}
    # Synthea and many EHR exports name resources `urn:uuid:<id>` across files too.
    aliases.update(
        {f"urn:uuid:{item.resource['id']}": key for key, item in found.items()}
    )
    aliases.update(
        {alias: item.key for item in found.values() for alias in item.aliases}
    )
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in found.values():
        resource = _rewrite_references(item.resource, aliases)
        patient = _patient_of(resource) or file_patient.get(
            str(item.source), NO_PATIENT
        )
        groups[patient].append(resource)
    for resources in groups.values():
        # Patient first, so a server that checks references on write finds it.
        resources.sort(key=lambda r: (r["resourceType"] != "Patient", _key(r)))
    return dict(sorted(groups.items()))


def transaction(base_url: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that PUTs each resource at `Type/id` (create or update)."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{base_url}/{_key(resource)}",
                "resource": resource,
                "request": {"method": "PUT", "url": _key(resource)},
            }
            for resource in resources
        ],
    }


def load(
    fhir_server: str,
    fixtures_dir: Path,
    *,
    wait: float = 0.0,
    timeout: float = 30.0,
    progress: bool | None = None,
    retries: int = 4,
) -> LoadResult:
    """Send every fixture patient to `fhir_server`, one transaction per patient.

    `wait` is how many seconds to wait for the server to answer `/metadata` first (a
    FHIR server in a container takes a while to start); `retries` is how often a
    transaction is re-sent after a connection error or a 429/502/503/504.
    `progress=None` shows the bar only on a terminal.
    """
    base_url = fhir_server.rstrip("/")
    groups = collect(fixture_files(fixtures_dir))
    session = _session(retries)
    if wait > 0:
        _wait_for(base_url, wait)

    created = updated = resources = 0
    bar = tqdm(groups.values(), unit="patient", disable=_hidden(progress))
    for group in bar:
        bar.set_postfix_str(f"{len(group)} resources")
        statuses = _post(session, base_url, transaction(base_url, group), timeout)
        created += sum(status.startswith("201") for status in statuses)
        updated += sum(not status.startswith("201") for status in statuses)
        resources += len(group)
    return LoadResult(
        patients=sum(1 for patient in groups if patient != NO_PATIENT),
        resources=resources,
        created=created,
        updated=updated,
    )


def _hidden(progress: bool | None) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal.
    return None if progress is None else not progress


def _session(retries: int) -> requests.Session:
    session = requests.Session()
    # Every entry is a PUT, so re-sending a whole transaction is safe: POST is retried.
    retry = Retry(
        total=retries,
        backoff_factor=0.3,
        status_forcelist=(429, 502, 503, 504),
        allowed_methods=frozenset({"GET", "POST"}),
        raise_on_status=False,
    )
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
    return session


def _wait_for(base_url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            # Plain GET: the session's retries would only stretch each probe.
            response = requests.get(
                f"{base_url}/metadata", headers={"Accept": FHIR_JSON}, timeout=5
            )
            if response.ok:
                return
            reason = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            reason = type(exc).__name__
        if time.monotonic() >= deadline:
            raise LoadError(
                f"FHIR server {base_url} did not answer /metadata within "
                f"{seconds:g} s (last: {reason})"
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _post(
    session: requests.Session, base_url: str, bundle: dict[str, Any], timeout: float
) -> list[str]:
    try:
        response = session.post(base_url, data=json.dumps(bundle), timeout=timeout)
    except requests.RequestException as exc:
        raise LoadError(f"FHIR server {base_url} unreachable: {exc}") from exc
    body = _json_or_none(response)
    if not response.ok:
        raise LoadError(
            f"FHIR server {base_url} refused a transaction: HTTP "
            f"{response.status_code}{_diagnostics(body)}"
        )
    if not isinstance(body, dict) or body.get("type") != "transaction-response":
        raise LoadError(
            f"FHIR server {base_url} answered a transaction without a "
            "transaction-response Bundle"
        )
    statuses = [
        str((entry.get("response") or {}).get("status", ""))
        for entry in body.get("entry") or []
    ]
    failed = [status for status in statuses if not status.startswith("2")]
    if failed or len(statuses) != len(bundle["entry"]):
        raise LoadError(
            f"FHIR server {base_url} did not store every entry: "
            f"{len(bundle['entry'])} sent, statuses {statuses}"
        )
    return statuses


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _diagnostics(body: Any) -> str:
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts = [
        issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        for issue in body.get("issue") or []
    ]
    return ": " + "; ".join(text for text in texts if text) if any(texts) else ""


def _resources_of_file(path: Path) -> Iterator[_Resource]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FixtureError(path, f"not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise FixtureError(path, "expected a JSON object")
    if "resourceType" in document:
        yield from _resources_of(document, None, path)
    for value in (document.get("prefetch") or {}).values():
        if isinstance(value, dict):
            yield from _resources_of(value, None, path)


def _resources_of(
    resource: dict[str, Any], full_url: str | None, path: Path
) -> Iterator[_Resource]:
    kind = resource.get("resourceType")
    if not isinstance(kind, str):
        raise FixtureError(path, "a resource without resourceType")
    if kind == "OperationOutcome":
        return
    if kind == "Bundle":
        for entry in resource.get("entry") or []:
            if isinstance(entry.get("resource"), dict):
                yield from _resources_of(entry["resource"], entry.get("fullUrl"), path)
        return
    resource = copy.deepcopy(resource)
    meta = resource.get("meta")
    if isinstance(meta, dict):
        # The server owns these; keeping them would make every load look like a change.
        for owned in ("versionId", "lastUpdated", "source"):
            meta.pop(owned, None)
        if not meta:
            del resource["meta"]
    if not resource.get("id"):
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"))
        resource["id"] = str(uuid.uuid5(ID_NAMESPACE, canonical))
    key = _key(resource)
    yield _Resource(
        key=key,
        resource=resource,
        aliases=tuple(alias for alias in (full_url,) if alias and alias != key),
        source=path,
    )


def _key(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _rewrite_references(value: Any, aliases: dict[str, str]) -> Any:
    """Turn `urn:uuid:` and absolute references into `Type/id` of loaded resources.

    A `urn:uuid:` reference to a resource the fixtures do not carry (Synthea subsets
    point at Encounters they left out) can never resolve, and a server refuses the whole
    transaction for it, so it is dropped; `None` means "drop this element".
    """
    if isinstance(value, dict):
        rewritten = {}
        for key, child in value.items():
            child = _rewrite_references(child, aliases)
            if child is not None:
                rewritten[key] = child
        reference = rewritten.get("reference")
        if isinstance(reference, str):
            target = aliases.get(reference) or aliases.get(_last_two(reference))
            if target:
                rewritten["reference"] = target
            elif reference.startswith("urn:uuid:"):
                del rewritten["reference"]
        return rewritten or None
    if isinstance(value, list):
        items = [_rewrite_references(item, aliases) for item in value]
        return [item for item in items if item is not None] or None
    return value


def _last_two(reference: str) -> str:
    # "http://ehr/fhir/Patient/1" -> "Patient/1", matched against the loaded resources.
    return "/".join(reference.rstrip("/").split("/")[-2:])


def _patient_of(resource: dict[str, Any]) -> str | None:
    if resource["resourceType"] == "Patient":
        return resource["id"]
    for name in PATIENT_FIELDS:
        field = resource.get(name)
        reference = field.get("reference") if isinstance(field, dict) else None
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


# --- `pain-cds load-fixtures` ---------------------------------------------------------


def add_command(subcommands) -> None:
    """Add `load-fixtures` to the `pain-cds` subcommands (argparse)."""
    parser = subcommands.add_parser(
        "load-fixtures",
        help="load the fixture patients into a FHIR server",
        description="PUTs every resource of the fixture patients (hook request "
        "prefetch and Bundle files) to a FHIR server, one transaction Bundle per "
        "patient. Running it again updates the same resources.",
    )
    parser.add_argument(
        "--fhir-server", required=True, metavar="URL", help="FHIR base URL"
    )
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=Path("fixtures"),
        metavar="DIR",
        help="directory of fixture JSON files (default: ./fixtures)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the server to answer /metadata first",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds per transaction",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        result = load(
            args.fhir_server,
            args.fixtures,
            wait=args.wait,
            timeout=args.timeout,
            progress=args.progress,
        )
    except (FixtureError, LoadError) as error:
        print(f"pain-cds load-fixtures: {error}", file=sys.stderr)
        return 1
    print(
        f"Loaded {result.resources} resources of {result.patients} patients into "
        f"{args.fhir_server.rstrip('/')} ({result.created} created, "
        f"{result.updated} updated)"
    )
    return 0
