"""The pain-cds benchmark: one table of the speed figures (README, Performance).

Run `python bench/run.py` from the checkout (about five minutes on two cores);
`--only inprocess,fallback` runs some sections, `--json FILE` keeps the figures.
It is not a test: nothing here asserts a time, and CI does not run it.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.workload import (  # noqa: E402
    EVALUATION_DATE,
    SERVICE,
    encoded,
    spine_patient,
    without_prefetch,
)

PATH = f"/cds-services/{SERVICE}"
SIZES = (10, 100, 1_000, 10_000)
# Calls per size in the in-process section: enough for a stable median.
ROUNDS = {10: 300, 100: 150, 1_000: 40, 10_000: 8}
FHIR_DELAY = 0.100
WRK_SECONDS = 5
# Alternating runs per endpoint (see over_http).
WRK_ROUNDS = 3
# Two workers with four threads each: eight calls in flight fill the server.
WRK_CONNECTIONS = 8
PYTHON = sys.executable
PAIN_CDS = str(Path(PYTHON).with_name("pain-cds"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        default="inprocess,fallback,http",
        help="comma-separated sections: inprocess, fallback, http",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="gunicorn workers"
    )
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}

    figures: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="pain-cds-bench-") as scratch:
        scratch = Path(scratch)
        if "inprocess" in sections:
            figures["inprocess"] = in_process(scratch)
        if "fallback" in sections:
            figures["fallback"] = fallback(scratch)
        if "http" in sections:
            figures["http"] = over_http(scratch, args.workers)
    print()
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


# --- the machine ----------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        memory_kb = 0
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --- 1. in-process: the request path against json.loads ------------------------------


def in_process(scratch: Path) -> dict:
    """Median time of one WSGI call per prefetch size, beside json.loads of its body."""
    app = _app(scratch / "inprocess.sqlite")
    results = {}
    for size in SIZES:
        body = encoded(size)
        call = _wsgi_caller(app, body)
        _check_answer(call())
        call_times, loads_times = [], []
        # Interleaved, so that a burst of load on the machine hits both alike.
        for _ in range(ROUNDS[size]):
            call_times.append(_timed(call))
            loads_times.append(_timed(lambda body=body: json.loads(body)))
        call_ms = statistics.median(call_times) * 1000
        loads_ms = statistics.median(loads_times) * 1000
        results[size] = {
            "body_bytes": len(body),
            "call_ms": round(call_ms, 3),
            "loads_ms": round(loads_ms, 3),
            "ratio": round(call_ms / loads_ms, 2),
        }
        _progress(f"in-process N={size}: {results[size]}")
    return results


def _app(database: Path, **overrides):
    from cds_service import create_app
    from cds_service.config import Settings

    # Log lines are formatted as in production but go nowhere.
    logging.basicConfig(
        level=logging.INFO,
        stream=open(os.devnull, "w"),
        force=True,  # noqa: SIM115
    )
    settings = Settings(
        auth=False,
        database_url=f"sqlite:///{database}",
        evaluation_date=EVALUATION_DATE,
        # The 10,000-resource body is 8 MB, above the 5 MB production limit.
        max_body_bytes=64_000_000,
        **overrides,
    )
    return create_app(settings)


def _wsgi_caller(app, body: bytes):
    """A function making one POST through the app's WSGI callable, as gunicorn does."""
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(
        path=PATH, method="POST", data=body, content_type="application/json"
    ).get_environ()

    def call() -> tuple[str, bytes]:
        env = dict(environ)
        env["wsgi.input"] = io.BytesIO(body)
        status = []
        iterable = app(env, lambda s, headers, exc_info=None: status.append(s))
        try:
            answer = b"".join(iterable)
        finally:
            # Closing runs call_on_close (the audit write), as a server does.
            getattr(iterable, "close", lambda: None)()
        return status[0], answer

    return call


def _check_answer(result: tuple[str, bytes]) -> None:
    status, answer = result
    if not status.startswith("200"):
        raise SystemExit(f"benchmark call refused: {status} {answer[:300]!r}")
    actions = json.loads(answer)["systemActions"]
    covered = [
        item["valueCode"]
        for action in actions
        for extension in action["resource"]["extension"]
        for item in extension["extension"]
        if item["url"] == "covered"
    ]
    if covered != ["covered"]:
        raise SystemExit(f"benchmark call answered {covered}, expected ['covered']")


def _timed(func) -> float:
    # Each run starts from the same collector state: a full collection left
    # pending by the previous run would otherwise land in this one (at 10,000
    # resources it costs as much as the parse).
    gc.collect()
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


# --- 3. the FHIR fallback ------------------------------------------------------------


class SlowFhir:
    """A loopback FHIR server answering the spine patient's searches after a delay."""

    def __init__(self, delay: float):
        self.delay = delay
        self.connections = 0
        self.requests = 0
        self.by_type = _resources_by_type(spine_patient()["prefetch"])
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle's algorithm the
            # body would wait for the client's delayed ACK (40 ms) on a kept-alive
            # connection. Production servers set TCP_NODELAY too.
            disable_nagle_algorithm = True

            def setup(self):
                super().setup()
                stand_in.connections += 1

            def do_GET(self):  # noqa: N802 (http.server's naming)
                stand_in.requests += 1
                time.sleep(stand_in.delay)
                status, body = stand_in.answer(self.path)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str) -> tuple[int, dict]:
        resource_type = urlsplit(path).path.split("/")[2]
        resources = self.by_type.get(resource_type, [])
        if "?" not in path:  # a read: Patient/{id}
            return (200, resources[0]) if resources else (404, {})
        return 200, {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [{"resource": r} for r in resources],
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _resources_by_type(prefetch: dict) -> dict[str, list[dict]]:
    by_type: dict[str, list[dict]] = {}
    for value in prefetch.values():
        if not isinstance(value, dict):
            continue
        entries = (
            [e["resource"] for e in value.get("entry") or []]
            if value.get("resourceType") == "Bundle"
            else [value]
        )
        for resource in entries:
            by_type.setdefault(resource["resourceType"], []).append(resource)
    return by_type


def fallback(scratch: Path) -> dict:
    """Every prefetch key missing: the fetch phase against the slowest single query."""
    from cds_service.api import EXTENSION_KEY
    from cds_service.prefetch import render

    stand_in = SlowFhir(FHIR_DELAY)
    try:
        app = _app(scratch / "fallback.sqlite", fhir_timeout=3.0, fhir_deadline=4.0)
        state = app.extensions[EXTENSION_KEY]
        phases: list[float] = []
        gather = state.fetcher.gather

        def timed_gather(*args, **kwargs):
            started = time.perf_counter()
            try:
                return gather(*args, **kwargs)
            finally:
                phases.append(time.perf_counter() - started)

        state.fetcher.gather = timed_gather
        body = json.dumps(without_prefetch(spine_patient(), stand_in.url)).encode()
        call = _wsgi_caller(app, body)
        _check_answer(call())  # opens the pooled connections
        phases.clear()
        connections_before = stand_in.connections
        requests_before = stand_in.requests
        calls = [_timed(call) for _ in range(10)]
        connections = stand_in.connections - connections_before
        queries = (stand_in.requests - requests_before) // len(calls)

        # Each query alone, on its own connection, as the yardstick.
        hook = _hook_request_for(body)
        singles = {}
        for key, template in state.prefetch.items():
            url = stand_in.url + "/" + render(template, hook)
            with requests.Session() as session:
                singles[key] = _timed(lambda url=url, s=session: s.get(url).json())
        slowest_key = max(singles, key=singles.get)
        fetch_ms = statistics.median(phases) * 1000
        slowest_ms = singles[slowest_key] * 1000
        result = {
            "queries_per_call": queries,
            "delay_ms": FHIR_DELAY * 1000,
            "fetch_ms": round(fetch_ms, 1),
            "slowest_query_ms": round(slowest_ms, 1),
            "slowest_query": slowest_key,
            "ratio": round(fetch_ms / slowest_ms, 2),
            "call_ms": round(statistics.median(calls) * 1000, 1),
            "new_connections_in_10_calls": connections,
        }
        _progress(f"fallback: {result}")
        return result
    finally:
        stand_in.close()


def _hook_request_for(body: bytes):
    from cds_service.hook_request import load_hook_request

    return load_hook_request(json.loads(body), "order-sign")


# --- 2 and 4. over HTTP on gunicorn, start-up and memory -----------------------------


def over_http(scratch: Path, workers: int) -> dict:
    """Both servers up side by side; wrk runs alternate between them.

    Alternating short runs (instead of one long run each) exposes both endpoints
    to the same background load, so the ratio holds on a shared machine.
    """
    bodies = {}
    for size in (100, 1_000):
        bodies[size] = scratch / f"body-{size}.json"
        bodies[size].write_bytes(encoded(size))
    result: dict = {"workers": workers}

    port = _free_port()
    service = _start(
        [PAIN_CDS, "serve", "--port", str(port), "--workers", str(workers)],
        scratch / "service.log",
        env={
            "PAIN_CDS_AUTH": "false",
            "PAIN_CDS_DATABASE_URL": f"sqlite:///{scratch / 'http.sqlite'}",
            "PAIN_CDS_EVALUATION_DATE": EVALUATION_DATE,
        },
    )
    service_url = f"http://127.0.0.1:{port}{PATH}"
    bare = None
    try:
        result["startup_s"] = round(_first_answer(service_url, bodies[100], service), 2)
        _progress(f"start-up to first answer: {result['startup_s']} s")
        result["memory"] = _memory(service, service_url, bodies[100])
        _progress(f"memory: {result['memory']}")

        port = _free_port()
        bare = _start(
            [PYTHON, str(HERE / "bare.py"), "--port", str(port)]
            + ["--workers", str(workers)],
            scratch / "bare.log",
        )
        bare_url = f"http://127.0.0.1:{port}{PATH}"
        _first_answer(bare_url, bodies[100], bare)
        runs: dict[str, list[dict]] = {}
        servers = (("bare", bare_url, bare), ("service", service_url, service))
        for size in (100, 1_000):
            for _ in range(WRK_ROUNDS):
                for name, url, process in servers:
                    before = _server_cpu_seconds(process.pid)
                    measured = _wrk(url, bodies[size])
                    measured["cpu_s"] = _server_cpu_seconds(process.pid) - before
                    runs.setdefault(f"{name}_{size}", []).append(measured)
        for name, measured in runs.items():
            result[name] = _combined(measured)
            _progress(f"{name}: {result[name]}")
    finally:
        _stop(service)
        if bare is not None:
            _stop(bare)
    result["throughput_ratio"] = round(
        result["service_100"]["rps"] / result["bare_100"]["rps"], 2
    )
    # Throughput also depends on what else the two cores run; the CPU each server
    # spends on a request (master and workers, user and system) does much less.
    result["cpu_ratio"] = round(
        result["bare_100"]["cpu_ms_per_request"]
        / result["service_100"]["cpu_ms_per_request"],
        2,
    )
    return result


def _combined(runs: list[dict]) -> dict:
    """Requests per second over all runs; latency percentiles, the runs' median."""
    seconds = sum(run["seconds"] for run in runs)
    combined = {
        "requests": sum(run["requests"] for run in runs),
        "seconds": round(seconds, 1),
        "failed": sum(run["failed"] for run in runs),
    }
    combined["rps"] = round(combined["requests"] / seconds, 1)
    cpu_seconds = sum(run["cpu_s"] for run in runs)
    combined["cpu_ms_per_request"] = round(cpu_seconds * 1000 / combined["requests"], 3)
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        combined[key] = round(statistics.median(run[key] for run in runs), 1)
    combined["max_ms"] = max(run["max_ms"] for run in runs)
    return combined


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], log: Path, env: dict | None = None):
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _first_answer(url: str, body_file: Path, process: subprocess.Popen) -> float:
    """Seconds from the process's start to its first answered hook call."""
    started = time.monotonic()
    body = body_file.read_bytes()
    headers = {"Content-Type": "application/json"}
    while time.monotonic() - started < 60:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            response = requests.post(url, data=body, headers=headers, timeout=5)
            if response.status_code == 200:
                # Popen returned before the clock started: a few ms are not counted.
                return time.monotonic() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.01)
    raise SystemExit("server did not answer within 60 s")


def _memory(process: subprocess.Popen, url: str, body_file: Path) -> dict:
    """Resident memory of the workers after 1,000 and after 10,000 calls."""
    body = body_file.read_bytes()
    samples = {}
    done = 0
    for target in (1_000, 10_000):
        _post_many(url, body, target - done)
        done = target
        samples[target] = _workers_rss_mib(process.pid)
    first, last = samples[1_000], samples[10_000]
    return {
        "rss_1k_mib": first,
        "rss_10k_mib": last,
        "growth_mib": round(sum(last) - sum(first), 1),
    }


def _post_many(url: str, body: bytes, count: int, threads: int = 8) -> None:
    headers = {"Content-Type": "application/json"}
    local = threading.local()

    def post(_):
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        response = session.post(url, data=body, headers=headers, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, range(count)))


def _server_cpu_seconds(master: int) -> float:
    """CPU time (user and system) of a gunicorn master and its workers so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command name, which is in parentheses and may hold
            # spaces: state, ppid, ..., utime (12th) and stime (13th).
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == master or int(fields[1]) == master:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _workers_rss_mib(master: int) -> list[float]:
    """VmRSS of each child of the gunicorn master, in MiB."""
    sizes = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines()
            )
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == master and "VmRSS" in fields:
            sizes.append(round(int(fields["VmRSS"].split()[0]) / 1024, 1))
    return sorted(sizes)


def _wrk(url: str, body_file: Path) -> dict:
    command = [
        "wrk",
        "--threads",
        "2",
        "--connections",
        str(WRK_CONNECTIONS),
        "--duration",
        f"{WRK_SECONDS}s",
        "--timeout",
        "10s",
        "--script",
        str(HERE / "post.lua"),
        url,
        "--",
        str(body_file),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("WRK "))
    return json.loads(line[4:])


# --- the table -----------------------------------------------------------------------


def table(figures: dict) -> str:
    m = figures["machine"]
    lines = [
        f"Machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, "
        f"Python {m['python']}, load average at start {m['load_average']}",
        "",
    ]
    inprocess = figures.get("inprocess")
    if inprocess:
        lines += [
            "1. In-process order-sign call vs json.loads of the same body (medians)",
            "",
            "| N resources | body | call | json.loads | ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        for size, row in inprocess.items():
            lines.append(
                f"| {size:,} | {row['body_bytes'] / 1024:,.0f} KiB "
                f"| {row['call_ms']:.2f} ms | {row['loads_ms']:.2f} ms "
                f"| {row['ratio']:.1f} × |"
            )
        small, large = inprocess[1_000], inprocess[10_000]
        lines += [
            "",
            f"From N = 1,000 to 10,000 (10 × the resources) the call grows "
            f"{large['call_ms'] / small['call_ms']:.1f} ×, json.loads "
            f"{large['loads_ms'] / small['loads_ms']:.1f} ×.",
            "",
        ]
    http = figures.get("http")
    if http:
        service, bare, big = http["service_100"], http["bare_100"], http["service_1000"]
        lines += [
            f"2. Over HTTP: `pain-cds serve` (gunicorn, {http['workers']} workers × 4 "
            f"threads), wrk, {WRK_CONNECTIONS} connections, {WRK_ROUNDS} "
            f"alternating runs of {WRK_SECONDS} s per row",
            "",
            "| endpoint | N | requests/s | server CPU per request | p50 | p95 | p99 "
            "| failed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, size, row in (
            ("bare Flask, same gunicorn", 100, bare),
            ("order-sign", 100, service),
            ("bare Flask, same gunicorn", 1_000, http["bare_1000"]),
            ("order-sign", 1_000, big),
        ):
            lines.append(
                f"| {name} | {size:,} | {row['rps']:,.0f} "
                f"| {row['cpu_ms_per_request']:.2f} ms | {row['p50_ms']:.1f} ms "
                f"| {row['p95_ms']:.1f} ms | {row['p99_ms']:.1f} ms | {row['failed']} |"
            )
        lines += [
            "",
            f"Throughput at N = 100: {http['throughput_ratio']:.2f} × the bare "
            "endpoint; server CPU per request: the bare endpoint's is "
            f"{http['cpu_ratio']:.2f} × the service's.",
            "",
        ]
    fetch = figures.get("fallback")
    if fetch:
        lines += [
            "3. FHIR fallback: every prefetch key missing, "
            f"{fetch['queries_per_call']} queries, each answered after "
            f"{fetch['delay_ms']:.0f} ms",
            "",
            "| fetch phase | slowest single query | ratio | whole call "
            "| new connections in 10 calls |",
            "|---:|---:|---:|---:|---:|",
            f"| {fetch['fetch_ms']:.0f} ms | {fetch['slowest_query_ms']:.0f} ms "
            f"({fetch['slowest_query']}) | {fetch['ratio']:.2f} × "
            f"| {fetch['call_ms']:.0f} ms | {fetch['new_connections_in_10_calls']} |",
            "",
        ]
    if http:
        memory = http["memory"]
        lines += [
            "4. Start-up and memory (gunicorn workers' resident set, N = 100 calls)",
            "",
            "| start-up to first answer | RSS after 1,000 calls | after 10,000 "
            "| growth |",
            "|---:|---:|---:|---:|",
            f"| {http['startup_s']:.2f} s | {_mib(memory['rss_1k_mib'])} "
            f"| {_mib(memory['rss_10k_mib'])} | {memory['growth_mib']:+.1f} MiB |",
        ]
    return "\n".join(lines)


def _mib(sizes: list[float]) -> str:
    return " + ".join(f"{size:.0f}" for size in sizes) + " MiB"


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
