"""The `pain-cds` command: serve the service, evaluate a request offline, and more."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import textwrap
from collections.abc import Callable
from dataclasses import MISSING, fields
from datetime import date
from pathlib import Path

from cds_service.config import PREFIX, Settings

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pain-cds",
        description="Pain-management prior-authorization CDS Hooks service.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subcommands)
    return parser


# --- serve ------------------------------------------------------------------------


def add_serve(subcommands) -> None:
    parser = subcommands.add_parser(
        "serve",
        help="run the service on a production WSGI server (gunicorn)",
        description="Every flag can also be set as an environment variable "
        f"{PREFIX}<NAME>; flags win.",
    )
    add_settings_flags(parser)
    parser.set_defaults(func=serve)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `Settings` field, defaulting to the environment's value."""
    for item in fields(Settings):
        default = (
            item.default if item.default is not MISSING else item.default_factory()
        )
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{item.metadata.get('help', '')} [{PREFIX}{item.name.upper()}]"
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=item.name,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        elif isinstance(default, list):
            parser.add_argument(flag, dest=item.name, type=_comma_list, help=help_text)
        else:
            parser.add_argument(
                flag, dest=item.name, type=type(default), help=help_text
            )


def settings_from_args(args: argparse.Namespace, **forced) -> Settings:
    overrides = {item.name: getattr(args, item.name, None) for item in fields(Settings)}
    overrides.update(forced)
    return Settings.from_env(**overrides)


def serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from cds_service.guideline import Guideline, RuleFileError
    from cds_service.jwks import IssuerConfigError, load_trusted_issuers
    from cds_service.logs import configure_logging, gunicorn_logger_class
    from cds_service.metrics import (
        child_exit,
        prepare_multiprocess_dir,
        remove_own_multiprocess_dir,
    )

    settings = settings_from_args(args)
    # Before anything imports prometheus_client, so that workers share counters.
    metrics_dir = prepare_multiprocess_dir()
    configure_logging(settings)
    try:
        # Checked once here so that a broken rule file stops start-up with its
        # name, instead of every worker failing to boot; the workers are forked
        # with it loaded, so none reads the rule files again.
        guideline = Guideline.load()
    except RuleFileError as error:
        print(f"pain-cds: {error}", file=sys.stderr)
        return 2
    try:
        # Likewise a broken trusted-issuer list, before any worker boots.
        load_trusted_issuers(settings.trusted_issuers)
    except IssuerConfigError as error:
        print(f"pain-cds: {error}", file=sys.stderr)
        return 2
    if not _create_tables(settings):
        return 2

    class Server(BaseApplication):
        def load_config(self):
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)
            self.cfg.set("child_exit", child_exit)
            self.cfg.set("logger_class", gunicorn_logger_class())

        def load(self):
            from cds_service import create_app

            configure_logging(settings)
            app = create_app(settings, guideline=guideline)
            # What start-up built (models, rules, value sets) lives as long as the
            # worker: kept out of the collector's full passes, which would
            # otherwise walk it all every few hundred calls.
            gc.freeze()
            return app

    logger.info(
        "serving on http://%s:%s with %d workers",
        settings.host,
        settings.port,
        settings.workers,
    )
    try:
        Server().run()
    finally:
        remove_own_multiprocess_dir(metrics_dir)
    return 0


def gunicorn_options(settings: Settings) -> dict[str, object]:
    """How gunicorn serves the app (shared with the benchmark's bare endpoint)."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        # Threads keep a worker answering while another call waits on the
        # EHR's FHIR server.
        "worker_class": "gthread",
        "threads": settings.threads,
        "graceful_timeout": getattr(settings, "graceful_timeout", 30),
        "loglevel": settings.log_level.lower(),
        "accesslog": None,
        # gunicorn's control socket lives in $HOME, which two servers on one
        # host would share and a read-only container cannot write.
        "control_socket_disable": True,
    }


# --- evaluate -----------------------------------------------------------------------


def _create_tables(settings: Settings) -> bool:
    """Create the store's tables once, before the workers start.

    Workers creating them at the same moment race on SQLite ("table already
    exists"); an unusable database stops start-up here with one clear line.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from cds_service.storage import Store

    store = Store(settings.database_url)
    try:
        store.create_schema()
    except SQLAlchemyError as error:
        reason = getattr(error, "orig", None) or error
        print(f"pain-cds: database not usable: {reason}", file=sys.stderr)
        return False
    finally:
        store.dispose()
    return True


def add_evaluate(subcommands) -> None:
    parser = subcommands.add_parser(
        "evaluate",
        help="run one hook request offline and print the cards",
        description="Runs REQUEST.json through the same code path as the service "
        "(without authentication or audit) and prints the answer.",
    )
    parser.add_argument("request", type=Path, help="a CDS Hooks request body (JSON)")
    parser.add_argument(
        "--json", action="store_true", help="print the exact response body"
    )
    parser.add_argument(
        "--on",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="judge as of this date instead of today",
    )
    parser.set_defaults(func=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    from cds_service import create_app
    from cds_service.api import SERVICES
    from cds_service.guideline import RuleFileError

    try:
        text = args.request.read_text()
        body = json.loads(text)
    except (OSError, ValueError) as error:
        print(f"pain-cds: cannot read {args.request}: {error}", file=sys.stderr)
        return 2
    except RecursionError:
        print(
            f"pain-cds: cannot read {args.request}: JSON nested too deeply",
            file=sys.stderr,
        )
        return 2
    served = ", ".join(s.hook for s in SERVICES.values())
    if not isinstance(body, dict):
        print(
            f"pain-cds: {args.request} is not a CDS Hooks request: the body must be "
            "a JSON object",
            file=sys.stderr,
        )
        return 2
    hook = body.get("hook")
    if hook is None:
        print(
            f"pain-cds: the request in {args.request} has no `hook` "
            f"(expected one of {served})",
            file=sys.stderr,
        )
        return 2
    service = next((s for s in SERVICES.values() if s.hook == hook), None)
    if service is None:
        print(f"pain-cds: hook {hook!r} is not served (only {served})", file=sys.stderr)
        return 2

    settings = Settings.from_env(
        auth=False,
        database_url="sqlite://",
        evaluation_date=args.on.isoformat() if args.on else "",
    )
    logging.basicConfig(level=logging.WARNING)
    # Offline evaluation runs without authentication by design; not worth a warning.
    logging.getLogger("cds_service.auth").setLevel(logging.ERROR)
    try:
        client = create_app(settings).test_client()
    except RuleFileError as error:
        print(f"pain-cds: {error}", file=sys.stderr)
        return 2
    # The file's own text, not re-encoded: encoding recurses, and the service
    # answers a body nested too deeply with its own 400.
    response = client.post(
        f"/cds-services/{service.id}", data=text, content_type="application/json"
    )
    answer = response.get_json()
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(describe_response(response.status_code, answer))
    return 0 if response.status_code == 200 else 1


def describe_response(status: int, answer: dict) -> str:
    """The answer as a person reads it: cards, then coverage information."""
    if status != 200:
        issues = answer.get("issue", []) if isinstance(answer, dict) else []
        lines = [f"HTTP {status}"]
        lines += [f"  - {issue.get('diagnostics')}" for issue in issues]
        return "\n".join(lines)

    cards = answer.get("cards", [])
    lines = [f"{len(cards)} card(s)"]
    for card in cards:
        lines.append("")
        lines.append(f"[{card.get('indicator', '?').upper()}] {card.get('summary')}")
        if card.get("detail"):
            lines += [
                textwrap.indent(line, "    ") for line in card["detail"].splitlines()
            ]
        label = (card.get("source") or {}).get("label")
        if label:
            lines.append(f"    source: {label}")
        for suggestion in card.get("suggestions", []):
            lines.append(f"    suggestion: {suggestion.get('label')}")
        for link in card.get("links", []):
            lines.append(f"    link: {link.get('label')} <{link.get('url')}>")

    actions = answer.get("systemActions", [])
    if actions:
        lines += ["", f"{len(actions)} system action(s)"]
    for action in actions:
        resource = action.get("resource") or {}
        target = f"{resource.get('resourceType')}/{resource.get('id')}"
        lines.append(
            f"  {action.get('type')} {target}: {action.get('description', '')}"
        )
        for extension in resource.get("extension", []):
            if extension.get("url", "").endswith("/ext-coverage-information"):
                lines.append("    coverage information: " + _coverage_text(extension))
    return "\n".join(lines)


def _coverage_text(extension: dict) -> str:
    """`covered=…, pa-needed=…, reason` from a CRD coverage-information extension."""
    parts, reasons = [], []
    for item in extension.get("extension", []):
        url = item.get("url")
        if url in ("covered", "pa-needed", "doc-needed"):
            parts.append(f"{url}={item.get('valueCode')}")
        elif url == "reason":
            reasons.append((item.get("valueCodeableConcept") or {}).get("text"))
    return ", ".join(parts + [reason for reason in reasons if reason])


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


# Subcommands: each is a function that adds its parser to the subparsers and sets
# `func`. Other parts of the project append theirs (rules, report, load-fixtures).
COMMANDS: list[Callable] = [add_serve, add_evaluate]


def add_load_fixtures(subcommands) -> None:
    from cds_service.load_fixtures import add_command

    add_command(subcommands)


COMMANDS.append(add_load_fixtures)


def add_report(subcommands) -> None:
    from cds_service.report import add_command

    add_command(subcommands)


COMMANDS.append(add_report)


def add_rules(subcommands) -> None:
    from cds_service.catalogue import add_command

    add_command(subcommands)


COMMANDS.append(add_rules)


if __name__ == "__main__":
    sys.exit(main())
