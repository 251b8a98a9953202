"""Prefetch templates, and fetching what the client did not prefetch from its server."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from urllib.parse import quote, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from cds_service import cpu
from cds_service.config import Settings
from cds_service.errors import Issue, ServiceError
from cds_service.hook_request import HookRequest
from cds_service.metrics import metrics
from cds_service.model import CodeSystem, Coding, DataCategory
from cds_service.record import UNAVAILABLE, Incomplete

logger = logging.getLogger(__name__)

_PATIENT = "{{context.patientId}}"

# Prefetch key -> (category, query). Only CDS Hooks 2.0 tokens are used: clients
# such as the sandbox leave out templates they cannot resolve (CRD FHIRPath ones).
QUERIES: dict[str, tuple[DataCategory, str]] = {
    "patient": (DataCategory.PATIENT, f"Patient/{_PATIENT}"),
    "conditions": (DataCategory.CONDITIONS, f"Condition?patient={_PATIENT}"),
    "procedures": (DataCategory.PROCEDURES, f"Procedure?patient={_PATIENT}"),
    "observations": (DataCategory.OBSERVATIONS, f"Observation?patient={_PATIENT}"),
    "medicationRequests": (
        DataCategory.MEDICATIONS,
        f"MedicationRequest?patient={_PATIENT}",
    ),
    "medicationStatements": (
        DataCategory.MEDICATIONS,
        f"MedicationStatement?patient={_PATIENT}",
    ),
    "coverage": (DataCategory.COVERAGE, f"Coverage?patient={_PATIENT}&status=active"),
}

_SYSTEM_URIS = {
    CodeSystem.LOINC: "http://loinc.org",
    CodeSystem.SNOMED: "http://snomed.info/sct",
}


def prefetch_templates(observation_codes: list[Coding]) -> dict[str, str]:
    """The discovery `prefetch` object; observations limited to the scores read."""
    templates = {key: query for key, (_, query) in QUERIES.items()}
    tokens = [
        f"{_SYSTEM_URIS[coding.system]}|{coding.code}"
        for coding in observation_codes
        if coding.system in _SYSTEM_URIS
    ]
    if tokens:
        templates["observations"] += "&code=" + ",".join(tokens)
    return templates


# The deadline of the fetch running on this worker thread, read by the retry policy.
_fetch = threading.local()


class RetryWithinDeadline(Retry):
    """urllib3's Retry that gives up once the current fetch's deadline has passed,
    so that no retry reaches the EHR after the answer has been given without it."""

    def is_exhausted(self) -> bool:
        deadline = getattr(_fetch, "deadline", None)
        late = deadline is not None and time.monotonic() >= deadline
        return late or super().is_exhausted()


class FhirFetcher:
    """Fetches missing prefetch keys from the client's FHIR server, concurrently.

    One instance lives for the life of the app: its session pools connections and
    its thread pool is shared by all calls.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session = requests.Session()
        retry = RetryWithinDeadline(
            total=2,
            connect=2,
            # A read that timed out would time out again and outlive the deadline.
            read=0,
            status=2,
            backoff_factor=0.1,
            status_forcelist=(429, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            # A Retry-After of minutes would outlive the deadline; retry early instead.
            respect_retry_after_header=False,
        )
        # Every call a worker answers at once may be fetching all its queries: a
        # smaller pool would queue one call's queries behind another's, past the
        # deadline, and judge it on data it never asked for.
        size = max(1, settings.threads) * len(QUERIES)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="fhir")

    def may_query(self, fhir_server: str) -> bool:
        """Whether `fhir_server` starts with one of the configured base URLs.

        With none configured (the embedded default, for trying the service against
        any test server) every server may be queried.
        """
        allowed = self.settings.fhir_servers
        if not allowed:
            return True
        server = _base(fhir_server)
        return any(server.startswith(_base(prefix)) for prefix in allowed)

    def gather(
        self, hook_request: HookRequest, templates: dict[str, str]
    ) -> dict[DataCategory, object]:
        """Each category's value: prefetched, fetched, None, UNAVAILABLE or
        `Incomplete` (a page that could not be had).

        Raises 412 when keys are missing and the request names no fhirServer.
        """
        prefetch = hook_request.prefetch
        missing = [key for key in templates if key not in prefetch]
        if hook_request.fhir_server and not self.may_query(hook_request.fhir_server):
            # The service would send this patient's queries (and the EHR's token)
            # wherever a caller points it: only the configured servers are asked.
            if missing:
                raise ServiceError(
                    412,
                    Issue(
                        "Prefetch is missing "
                        + ", ".join(missing)
                        + " and fhirServer is not one this service may query "
                        "(PAIN_CDS_FHIR_SERVERS)",
                        expression="fhirServer",
                    ),
                )
        if missing and not hook_request.fhir_server:
            raise ServiceError(
                412,
                Issue(
                    "Prefetch is missing "
                    + ", ".join(missing)
                    + " and the request has no fhirServer to fetch them from",
                    expression="prefetch",
                ),
            )

        # Missing keys are searched on fhirServer; a prefetched Bundle with a
        # `next` page (clients MAY page prefetch) is continued there, under the
        # same rule as the fallback: the token goes to fhirServer's origin only.
        base = (
            _base(hook_request.fhir_server)
            if hook_request.fhir_server and self.may_query(hook_request.fhir_server)
            else ""
        )
        urls: dict[str, str] = {}
        held: dict[str, object] = {}
        for key in templates:
            if key not in prefetch:
                urls[key] = urljoin(base, render(templates[key], hook_request))
                continue
            value = held[key] = prefetch[key]
            link = _next_link(value, base) if _is_bundle(value) else None
            if link is None:
                continue
            if base and urlsplit(link)[:2] == urlsplit(base)[:2]:
                urls[key] = link
            else:
                held[key] = Incomplete(value, "its next page is not on fhirServer")

        fetched = self._fetch(hook_request, urls)
        parts: dict[DataCategory, list] = {}
        for key in templates:
            category = QUERIES[key][0]
            if key not in held:
                value = fetched[key]
            elif key in fetched:
                value = _continued(held[key], fetched[key])
            else:
                value = held[key]
            parts.setdefault(category, []).append(value)
        return {
            category: values[0] if len(values) == 1 else tuple(values)
            for category, values in parts.items()
        }

    def fetch(self, hook_request: HookRequest, templates: dict[str, str]) -> dict:
        """Run the `templates` against fhirServer; a failed key is UNAVAILABLE."""
        if not templates:
            return {}
        base = _base(hook_request.fhir_server)
        return self._fetch(
            hook_request,
            {
                key: urljoin(base, render(template, hook_request))
                for key, template in templates.items()
            },
        )

    def _fetch(self, hook_request: HookRequest, urls: dict[str, str]) -> dict:
        """GET each of `urls` (on fhirServer) concurrently, within the deadline."""
        if not urls:
            return {}
        headers = {"Accept": "application/fhir+json"}
        if hook_request.access_token:
            headers["Authorization"] = f"Bearer {hook_request.access_token}"
        deadline = time.monotonic() + self.settings.fhir_deadline

        futures = {
            key: self.executor.submit(self._search, url, headers, deadline)
            for key, url in urls.items()
        }
        # Other calls compute while this one waits on the EHR.
        with cpu.slot.released():
            wait(futures.values(), timeout=self.settings.fhir_deadline)

        results = {}
        for key, future in futures.items():
            if not future.done():
                logger.warning("fetch of %s missed the deadline", key)
                results[key] = UNAVAILABLE
            elif future.exception() is not None:
                logger.warning(
                    "fetch of %s failed: %s", key, _reason(future.exception())
                )
                results[key] = UNAVAILABLE
            else:
                results[key] = future.result()
        metrics().observe_fallback(results, UNAVAILABLE)
        return results

    def _search(self, url: str, headers: dict, deadline: float) -> object:
        """GET `url`, following `next` links up to the page cap into one Bundle."""
        origin = urlsplit(url)[:2]
        entries: list = []
        visited = {url}
        partial = None
        _fetch.deadline = deadline
        for _ in range(self.settings.fhir_page_cap):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed between pages")
            response = self.session.get(
                url, headers=headers, timeout=min(self.settings.fhir_timeout, remaining)
            )
            if response.status_code == 404 and not entries and "?" not in url:
                return None  # a read of a resource the server does not have
            response.raise_for_status()
            body = response.json()
            if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
                return body
            entries.extend(_entries(body))

            url = _next_link(body, url)
            if url is None:
                break
            # The bearer token goes to the client's server only, never elsewhere.
            if urlsplit(url)[:2] != origin:
                logger.warning("next link to another server not followed")
                partial = "a next link to another server was not followed"
                break
            # A server whose `next` points back at a page already read would
            # otherwise return the same entries until the page cap.
            if url in visited:
                logger.warning("next link loops back to a page already read")
                break
            visited.add(url)
        else:
            logger.warning(
                "stopped after %d pages (fhir_page_cap)", self.settings.fhir_page_cap
            )
            partial = "paging stopped at fhir_page_cap"
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
        return Incomplete(bundle, partial) if partial else bundle

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()


def render(template: str, hook_request: HookRequest) -> str:
    """Fill the template's context tokens with URL-quoted values."""
    return template.replace(_PATIENT, quote(hook_request.patient_id, safe=""))


def _base(fhir_server: str) -> str:
    return fhir_server.rstrip("/") + "/"


def _is_bundle(value: object) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "Bundle"


def _entries(bundle: dict) -> list:
    entries = bundle.get("entry") or []
    return entries if isinstance(entries, list) else [entries]


def _continued(first: dict, rest: object) -> object:
    """A prefetched Bundle joined with the pages fetched after it."""
    if isinstance(rest, Incomplete):
        return Incomplete(_continued(first, rest.value), rest.reason)
    if not _is_bundle(rest):
        return Incomplete(first, "its next page could not be fetched")
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": _entries(first) + _entries(rest),
    }


def _next_link(bundle: dict, current: str) -> str | None:
    links = bundle.get("link") or []
    for link in links if isinstance(links, list) else [links]:
        if isinstance(link, dict) and link.get("relation") == "next":
            target = link.get("url")
            if isinstance(target, str) and target:
                return urljoin(current, target)
    return None


def _reason(error: BaseException) -> str:
    # Say what failed without echoing URLs or bodies (they may carry patient ids).
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}"
    return type(error).__name__
