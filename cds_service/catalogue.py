"""`pain-cds rules`: the encoded guideline as a clinical reviewer reads it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap

logger = logging.getLogger(__name__)

WIDTH = 88
ROLE_HEADINGS = (
    ("requirement", "Criteria"),
    ("limit", "Limits (not covered when not met)"),
    ("exclusion", "Exclusions (not covered when not met)"),
    ("review", "Manual review"),
)


def add_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "rules",
        help="print the encoded guideline: codes, criteria, wording and readings",
        description="Prints every guideline section with its procedure codes, its "
        "criteria, limits, exclusions and review rules, the guideline wording each "
        "encodes and the reading chosen where the text is ambiguous.",
    )
    parser.add_argument(
        "--code",
        action="append",
        metavar="CODE",
        help="only the section of this CPT/HCPCS code and the rules that apply to "
        "it (repeatable)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the catalogue as JSON"
    )
    parser.set_defaults(func=rules_command)


def rules_command(args: argparse.Namespace) -> int:
    from cds_service.guideline import Guideline, RuleFileError

    try:
        guideline = Guideline.load()
    except RuleFileError as error:
        print(f"pain-cds: {error}", file=sys.stderr)
        return 2
    catalogue = guideline.catalogue()
    if args.code:
        wanted = [c.strip().upper() for c in args.code]
        known = {code["code"] for entry in catalogue for code in entry["codes"]}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            print(
                f"pain-cds: no rule for code(s) {', '.join(unknown)}", file=sys.stderr
            )
            return 1
        catalogue = [
            selected for entry in catalogue if (selected := only(entry, wanted))
        ]
    if args.json:
        print(json.dumps(catalogue, indent=2))
    else:
        print(render(catalogue))
    return 0


def only(entry: dict, codes: list[str]) -> dict | None:
    """The catalogue entry narrowed to `codes` and the rules that apply to them."""
    kept = [c for c in entry["codes"] if c["code"] in codes]
    if not kept:
        return None
    kept_codes = {c["code"] for c in kept}
    rules = [
        r for r in entry["rules"] if r["codes"] is None or kept_codes & set(r["codes"])
    ]
    return {**entry, "codes": kept, "rules": rules}


def render(catalogue: list[dict]) -> str:
    codes = sum(len(e["codes"]) for e in catalogue)
    rules = {r["id"] for e in catalogue for r in e["rules"]}
    lines = [
        "Pain Management guideline (EmblemHealth MG.MM.ME.38hC6v3), as encoded",
        f"{len(catalogue)} section(s), {codes} code(s), {len(rules)} rule(s)",
    ]
    for entry in catalogue:
        lines += ["", *_section(entry)]
    return "\n".join(lines)


def _section(entry: dict) -> list[str]:
    title = f"{entry['title']} [{entry['id']}]"
    lines = [title, "=" * min(len(title), WIDTH)]
    lines += _wrap(f"Guideline section: {entry['section']}", "")
    lines.append(f"Rule file: rules/{entry['file']}")
    lines.append("Codes:")
    for code in entry["codes"]:
        facts = []
        if code["region"]:
            facts.append(code["region"])
        if code["image_guided"] is True:
            facts.append("image guided")
        elif code["image_guided"] is False:
            facts.append("no imaging")
        if code["add_on_of"]:
            facts.append("add-on of " + ", ".join(code["add_on_of"]))
        extra = f" ({'; '.join(facts)})" if facts else ""
        lines += _wrap(f"{code['code']}  {code['display']}{extra}", "  ", "         ")
    for role, heading in ROLE_HEADINGS:
        chosen = [r for r in entry["rules"] if r["role"] == role]
        if not chosen:
            continue
        lines.append(f"{heading}:")
        for rule in chosen:
            lines += _rule(rule)
    if entry["not_encoded"]:
        lines.append("Not encoded:")
    for item in entry["not_encoded"]:
        lines += _wrap(f"{item['section']}: {item['text']}", "  - ", "    ")
        lines += _wrap(f"Why: {item['why']}", "    ")
    return lines


def _rule(rule: dict) -> list[str]:
    lines = [f"  - {rule['id']} ({rule['kind']})"]
    lines += _wrap(f"Section: {rule['section']}", "      ")
    lines += _wrap(f"Guideline: {rule['text']}", "      ")
    if rule["reading"]:
        lines += _wrap(f"Reading: {rule['reading']}", "      ")
    if rule["params"]:
        lines += _wrap("Parameters: " + _params(rule["params"]), "      ")
    scope = []
    if rule["codes"] is not None:
        scope.append("codes " + ", ".join(rule["codes"]))
    if rule["applies_when"]:
        scope.append("only when " + _condition(rule["applies_when"]))
    if rule["applies_unless"]:
        scope.append("unless " + _condition(rule["applies_unless"]))
    if rule["effective_from"]:
        scope.append(f"from {rule['effective_from']}")
    if rule["effective_until"]:
        scope.append(f"until {rule['effective_until']}")
    if scope:
        lines += _wrap("Applies to: " + "; ".join(scope), "      ")
    if rule["file"]:
        lines.append(f"      Rule file: rules/{rule['file']}")
    return lines


def _condition(described: dict) -> str:
    """A nested applies_when/unless criterion in one line: kind and parameters."""
    params = described["params"]
    if described["kind"] == "not" and params.get("criteria"):
        (inner,) = params["criteria"]
        return f"not ({inner.get('text') or inner['kind']})"
    shown = ", ".join(f"{k}={_value(v)}" for k, v in params.items())
    return f"{described['kind']}({shown})"


def _params(params: dict) -> str:
    return "; ".join(f"{k}={_value(v)}" for k, v in params.items())


def _value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if "kind" in value:  # a nested criterion
            inner = _params(value.get("params") or {})
            return f"{value.get('id', value['kind'])}: {value['kind']}({inner})"
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _wrap(text: str, indent: str, subsequent: str | None = None) -> list[str]:
    return textwrap.wrap(
        " ".join(text.split()),
        width=WIDTH,
        initial_indent=indent,
        subsequent_indent=subsequent if subsequent is not None else indent + "  ",
        break_on_hyphens=False,
    )
