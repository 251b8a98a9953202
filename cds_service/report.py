"""`pain-cds report`: what the service answered, how fast, and what clinicians did."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, time

from dateutil import parser as dateparser
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from cards.content import override_reasons
from cds_service.config import PREFIX, Settings
from cds_service.storage import Store, safe_hook

TARGET_MS = 500  # CDS Hooks: answer "on the order of 500 ms"
DEFAULT_URL = Settings.database_url


def add_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "report",
        help="summarise the audit record: calls, determinations, feedback, latency",
        description="Reads the audit and feedback record of the database the service "
        f"writes to ({PREFIX}DATABASE_URL or --database-url). The default, "
        f"{DEFAULT_URL}, is a file relative to the current directory: run the "
        "report where the service runs, or give the URL.",
    )
    parser.add_argument(
        "--database-url",
        help=f"SQLAlchemy URL of the record [{PREFIX}DATABASE_URL; default "
        f"{DEFAULT_URL}, relative to the current directory]",
    )
    parser.add_argument(
        "--since", type=_when, help="only calls from this date or time (UTC)"
    )
    parser.add_argument(
        "--until", type=_when, help="only calls before this date or time (UTC)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    url = getattr(args, "database_url", None) or Settings.from_env().database_url
    store = Store(url)
    try:
        store.create_schema()
        summary = summarise(
            store.calls(args.since, args.until),
            store.feedback_items(args.since, args.until),
        )
    except SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        print(
            f"pain-cds: cannot read the database {_safe_name(url)}: {reason}",
            file=sys.stderr,
        )
        return 2
    finally:
        store.dispose()
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(render(summary))
    return 0


def _safe_name(url: str) -> str:
    """The URL without its password, for an error message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a SQLAlchemy URL)"


def summarise(calls: list[dict], feedback: list[dict]) -> dict:
    """The report as data (the text form and `--json` both come from it)."""
    by_hook: dict[str, Counter] = defaultdict(Counter)
    determinations: dict[str, Counter] = defaultdict(Counter)
    for call in calls:
        # Rows written before hooks were checked may hold caller text: not shown.
        hook = safe_hook(call["hook"]) or "(unknown)"
        by_hook[hook][_call_outcome(call["status"])] += 1
        for item in call["determinations"] or []:
            determinations[str(item.get("code"))][str(item.get("outcome"))] += 1

    durations = sorted(call["duration_ms"] for call in calls)
    within = sum(1 for d in durations if d <= TARGET_MS)

    reasons: Counter = Counter()
    outcomes: Counter = Counter()
    for item in feedback:
        outcomes[item["outcome"]] += 1
        if item["outcome"] == "overridden":
            reasons[_reason_label(item)] += 1

    return {
        "calls": len(calls),
        "calls_by_hook": {
            hook: dict(sorted(c.items())) for hook, c in sorted(by_hook.items())
        },
        "determinations_by_code": {
            code: dict(sorted(c.items())) for code, c in sorted(determinations.items())
        },
        "feedback": {
            "accepted": outcomes["accepted"],
            "overridden": outcomes["overridden"],
            "override_reasons": dict(reasons.most_common()),
        },
        "duration_ms": {
            "p50": percentile(durations, 50),
            "p95": percentile(durations, 95),
        },
        "within_500ms": round(within / len(durations), 4) if durations else None,
    }


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of sorted values (None for no values)."""
    if not values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return round(values[rank - 1], 1)


def render(summary: dict) -> str:
    lines = [f"Hook calls: {summary['calls']}"]
    for hook, outcomes in summary["calls_by_hook"].items():
        parts = ", ".join(f"{name} {count}" for name, count in outcomes.items())
        lines.append(f"  {hook}: {parts}")
    lines.append("Determinations by code:")
    if not summary["determinations_by_code"]:
        lines.append("  (none)")
    for code, outcomes in summary["determinations_by_code"].items():
        parts = ", ".join(f"{name} {count}" for name, count in outcomes.items())
        lines.append(f"  {code}: {parts}")
    fb = summary["feedback"]
    lines.append(f"Feedback: accepted {fb['accepted']}, overridden {fb['overridden']}")
    for reason, count in fb["override_reasons"].items():
        lines.append(f"  {count} x {reason}")
    duration = summary["duration_ms"]
    if summary["calls"]:
        lines.append(
            f"Duration: p50 {duration['p50']} ms, p95 {duration['p95']} ms; "
            f"{summary['within_500ms']:.1%} of calls answered within {TARGET_MS} ms"
        )
    else:
        lines.append("Duration: no calls recorded")
    return "\n".join(lines)


def _call_outcome(status: int) -> str:
    if 200 <= status < 300:
        return "answered"
    if status == 401:
        return "refused (401)"
    if 400 <= status < 500:
        return f"rejected ({status})"
    return f"failed ({status})"


def _reason_label(item: dict) -> str:
    if item.get("override_display"):
        return item["override_display"]
    # The sandbox sends code and system only; our own codes have a display.
    ours = {(r["system"], r["code"]): r["display"] for r in override_reasons()}
    known = ours.get((item.get("override_system"), item.get("override_code")))
    if known:
        return known
    if item.get("override_code"):
        return f"{item['override_code']} ({item.get('override_system') or 'no system'})"
    return "no reason given"


def _when(value: str) -> datetime:
    try:
        parsed = dateparser.isoparse(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date or time"
        ) from None
    if isinstance(parsed, datetime) and len(value.strip()) <= 10:
        parsed = datetime.combine(parsed.date(), time.min)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)
