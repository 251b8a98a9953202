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

from cds_service.config import Settings
from cds_service.errors import Issue, ServiceError
from cds_service.hook_request import HookRequest
from cds_service.metrics import metrics
from cds_service.model import CodeSystem, Coding, DataCategory
from cds_service.record import UNAVAILABLE

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
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fhir")

    def gather(
        self, hook_request: HookRequest, templates: dict[str, str]
    ) -> dict[DataCategory, object]:
        """Each category's value: prefetched, fetched, None or UNAVAILABLE.

        Raises 412 when keys are missing and the request names no fhirServer.
        """
        prefetch = hook_request.prefetch
        missing = [key for key in templates if key not in prefetch]
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

        fetched = self.fetch(hook_request, {k: templates[k] for k in missing})
        parts: dict[DataCategory, list] = {}
        for key in templates:
            category = QUERIES[key][0]
            value = prefetch[key] if key in prefetch else fetched[key]
            parts.setdefault(category, []).append(value)
        return {
            category: values[0] if len(values) == 1 else tuple(values)
            for category, values in parts.items()
        }

    def fetch(self, hook_request: HookRequest, templates: dict[str, str]) -> dict:
        """Run the `templates` against fhirServer; a failed key is UNAVAILABLE."""
        if not templates:
            return {}
        base = hook_request.fhir_server.rstrip("/") + "/"
        headers = {"Accept": "application/fhir+json"}
        if hook_request.access_token:
            headers["Authorization"] = f"Bearer {hook_request.access_token}"
        deadline = time.monotonic() + self.settings.fhir_deadline

        futures = {
            key: self.executor.submit(
                self._search,
                urljoin(base, render(template, hook_request)),
                headers,
                deadline,
            )
            for key, template in templates.items()
        }
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
            page = body.get("entry") or []
            entries.extend(page if isinstance(page, list) else [page])

            url = _next_link(body, url)
            if url is None:
                break
            # The bearer token goes to the client's server only, never elsewhere.
            if urlsplit(url)[:2] != origin:
                logger.warning("next link to another server not followed")
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
        return {"resourceType": "Bundle", "type": "searchset", "entry": entries}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()


def render(template: str, hook_request: HookRequest) -> str:
    """Fill the template's context tokens with URL-quoted values."""
    return template.replace(_PATIENT, quote(hook_request.patient_id, safe=""))


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
