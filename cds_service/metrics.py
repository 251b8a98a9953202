"""Prometheus metrics: hook calls, determinations, latency and FHIR fallback fetches."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from flask import Flask, Response, g, request

logger = logging.getLogger(__name__)

# prometheus_client picks its value store when it is first imported: files shared by
# gunicorn workers when this variable names a directory, process memory otherwise.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HOOK_ENDPOINT = "cds_hooks.call_service"
# Hook calls take milliseconds from prefetch and up to the FHIR deadline (4 s by
# default) when the service fetches from the EHR.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OWN_DIR_PREFIX = "pain-cds-metrics-"
_master_pid: int | None = None


def prepare_multiprocess_dir() -> Path:
    """Give gunicorn's workers one directory for their metric files, emptied.

    Called by `pain-cds serve` in the master before anything imports
    prometheus_client. Left-over files from an earlier run would add that run's counts
    to this one's; a directory of our own is made when none is configured.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix=OWN_DIR_PREFIX))
        os.environ[MULTIPROC_ENV] = str(directory)
    global _master_pid
    _master_pid = os.getpid()
    return directory


def remove_own_multiprocess_dir(directory: Path) -> None:
    """Remove a directory `prepare_multiprocess_dir` made (not a configured one).

    Only the master removes it: a gunicorn worker leaves through the same `finally`
    (it is a fork of the master's stack), while other workers still write there.
    """
    if os.getpid() == _master_pid and directory.name.startswith(OWN_DIR_PREFIX):
        shutil.rmtree(directory, ignore_errors=True)


def child_exit(server, worker) -> None:
    """Gunicorn hook: forget a worker that exited, for live-process gauges."""
    from prometheus_client import multiprocess

    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(worker.pid)


class Metrics:
    """The service's metrics, registered once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram, disable_created_metrics

        # `_created` timestamps double the series; multiprocess mode has none anyway.
        disable_created_metrics()
        self.hook_calls = Counter(
            "pain_cds_hook_calls",
            "CDS Hooks service calls by service, hook and HTTP status",
            ["service", "hook", "status"],
        )
        self.hook_latency = Histogram(
            "pain_cds_hook_duration_seconds",
            "Time to answer a CDS Hooks service call",
            ["service"],
            buckets=LATENCY_BUCKETS,
        )
        self.determinations = Counter(
            "pain_cds_determinations",
            "Guideline determinations by procedure code and outcome",
            ["code", "outcome"],
        )
        self.fhir_fallback = Counter(
            "pain_cds_fhir_fallback_queries",
            "Queries sent to the EHR's FHIR server for data the client did not "
            "prefetch, by prefetch key",
            ["query"],
        )
        self.fhir_fallback_failures = Counter(
            "pain_cds_fhir_fallback_failures",
            "FHIR fallback queries that failed or missed the deadline, by prefetch key",
            ["query"],
        )

        # Labelled series by their label values. prometheus_client checks and
        # converts the values on every `labels` call; a hook call touches three
        # series, each a handful of services, statuses, codes and outcomes.
        self._series: dict[tuple, object] = {}

    def series(self, metric, *values: object):
        """`metric.labels(*values)`, looked up once per distinct label values."""
        key = (metric, *values)
        try:
            return self._series[key]
        except KeyError:
            child = self._series[key] = metric.labels(*values)
            return child

    def observe_fallback(self, results: Mapping[str, object], unavailable) -> None:
        """Count one FHIR fallback fetch: its queries and those that failed."""
        try:
            for key, value in results.items():
                self.fhir_fallback.labels(key).inc()
                if value is unavailable:
                    self.fhir_fallback_failures.labels(key).inc()
        except Exception:
            logger.exception("FHIR fallback fetch not counted in the metrics")


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's metrics (created on first use, after serve's set-up)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def init_app(app: Flask) -> None:
    """Count and time every hook call, and serve `GET /metrics` (no token needed)."""
    current = metrics()
    # First in line, so that calls refused by the JWT check are timed too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start_clock)

    @app.after_request
    def count_call(response: Response) -> Response:
        if request.endpoint != HOOK_ENDPOINT:
            return response
        try:
            _count(current, response)
        except Exception:
            # Metrics are for watching the service; they never fail a call.
            logger.exception("hook call not counted in the metrics")
        return response

    app.add_url_rule("/metrics", "metrics", exposition, methods=["GET"])


def _count(current: Metrics, response: Response) -> None:
    from cds_service.api import SERVICES

    service_id = (request.view_args or {}).get("service_id")
    service = SERVICES.get(service_id)
    # Unknown ids are one label, so a scanner cannot grow the series without bound.
    service_label = service.id if service else "unknown"
    hook = service.hook if service else "unknown"
    current.series(current.hook_calls, service_label, hook, response.status_code).inc()
    started = g.get("metrics_started")
    if started is not None:
        current.series(current.hook_latency, service_label).observe(
            time.perf_counter() - started
        )
    for determination in (g.get("audit_entry") or {}).get("determinations", []):
        current.series(
            current.determinations, determination["code"], determination["outcome"]
        ).inc()


def _start_clock() -> None:
    g.metrics_started = time.perf_counter()


def exposition() -> Response:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    if os.environ.get(MULTIPROC_ENV):
        # Every worker's files, so a scrape sees the whole server, not one worker.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
