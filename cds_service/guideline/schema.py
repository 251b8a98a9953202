"""Marshmallow schemas for the rule and value-set YAML files, and their loader."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import yaml
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from cds_service.guideline.criteria import Criterion, kind_spec
from cds_service.guideline.valuesets import (
    CONFIDENCE_TAGS,
    ValueSet,
    ValueSetEntry,
    normalize_system,
)
from cds_service.model import CodeSystem, Role

logger = logging.getLogger(__name__)

# libyaml's loader when PyYAML was built with it: the files load several times faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
REGIONS = ("cervical-thoracic", "lumbosacral", "sacroiliac")
SPINE_REGIONS = ("cervical-thoracic", "lumbosacral")
_PREFIX_BY_DEFAULT = {CodeSystem.ICD10CM, CodeSystem.SOP}
VALUESETS_DIR = Path(__file__).parent / "valuesets"


class RuleFileError(Exception):
    """A rule or value-set file is broken; names the file, rule and field."""

    def __init__(self, file, rule: str | None, field_name: str | None, message: str):
        self.file = str(file)
        self.rule = rule
        self.field = field_name
        self.message = message
        where = self.file
        if rule:
            where += f", rule {rule!r}"
        if field_name:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {message}")


def _first_error(messages, prefix: str = "") -> tuple[str, str]:
    """Flatten marshmallow's nested error dict to (dotted field, first message)."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        name = (
            f"{prefix}[{key}]"
            if isinstance(key, int)
            else (f"{prefix}.{key}" if prefix else str(key))
        )
        return _first_error(value, name)
    if isinstance(messages, list) and messages:
        return prefix, str(messages[0])
    return prefix, str(messages)


# --- value sets -----------------------------------------------------------------------


class ValueSetEntrySchema(Schema):
    system = fields.String(required=True)
    code = fields.String(load_default=None)
    display = fields.String(load_default=None)
    tag = fields.String(required=True, validate=validate.OneOf(CONFIDENCE_TAGS))
    match = fields.String(
        load_default=None, validate=validate.OneOf(["exact", "prefix"])
    )
    name = fields.String(load_default=None)
    value = fields.Float(load_default=None)
    note = fields.String(load_default=None)
    # The spine region the code names; untagged entries match any region.
    region = fields.String(load_default=None, validate=validate.OneOf(SPINE_REGIONS))

    @validates_schema
    def _check(self, data, **_):
        if normalize_system(data["system"]) is None:
            raise ValidationError(f"unknown code system {data['system']!r}", "system")
        if not data.get("code") and not data.get("name"):
            raise ValidationError("an entry needs a code or a name", "code")


class ValueSetSchema(Schema):
    id = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]*$"))
    title = fields.String(required=True)
    source = fields.String(load_default=None)
    note = fields.String(load_default=None)
    codes = fields.List(fields.Nested(ValueSetEntrySchema), required=True)


class ValueSetFileSchema(Schema):
    valuesets = fields.List(fields.Dict(), required=True)


def load_valuesets(directory: Path) -> dict[str, ValueSet]:
    result: dict[str, ValueSet] = {}
    for path in sorted(directory.glob("*.yaml")):
        data = _read_yaml(path)
        try:
            ValueSetFileSchema().load(data)
        except ValidationError as exc:
            raise RuleFileError(path, None, *_first_error(exc.messages)) from None
        for raw in data["valuesets"]:
            vs_id = raw.get("id") if isinstance(raw, dict) else None
            try:
                loaded = ValueSetSchema().load(raw)
            except ValidationError as exc:
                raise RuleFileError(path, vs_id, *_first_error(exc.messages)) from None
            if vs_id in result:
                raise RuleFileError(path, vs_id, "id", "value set defined twice")
            result[vs_id] = _build_valueset(loaded, path)
    return result


@functools.cache
def answer_values(valueset_id: str) -> Mapping[str, float]:
    """Answer code -> number of a shipped value set (LA6113-0 -> 2.0), for readers
    without a Guideline at hand; the files are read once per process."""
    valueset = load_valuesets(VALUESETS_DIR)[valueset_id]
    return MappingProxyType(
        {e.code: e.value for e in valueset.entries if e.value is not None}
    )


def _build_valueset(data: dict, path: Path) -> ValueSet:
    entries = []
    for raw in data["codes"]:
        system = normalize_system(raw["system"])
        prefix = raw["match"] or ("prefix" if system in _PREFIX_BY_DEFAULT else "exact")
        entries.append(
            ValueSetEntry(
                system=system,
                code=raw["code"],
                display=raw["display"],
                tag=raw["tag"],
                prefix=prefix == "prefix",
                name=raw["name"],
                value=raw["value"],
                note=raw["note"],
                region=raw["region"],
            )
        )
    return ValueSet(
        id=data["id"],
        title=data["title"],
        entries=tuple(entries),
        source=str(path.name),
    )


# --- rule files -----------------------------------------------------------------------


class ProcedureCodeSchema(Schema):
    system = fields.String(required=True, validate=validate.OneOf(["cpt", "hcpcs"]))
    code = fields.String(required=True)
    display = fields.String(required=True)
    region = fields.String(load_default=None, validate=validate.OneOf(REGIONS))
    image_guided = fields.Boolean(load_default=None)
    add_on_of = fields.List(fields.String(), load_default=list)


class CriterionSchema(Schema):
    """A rule, or a nested criterion (a waiver, applies_when, a composite part)."""

    id = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]*$"))
    section = fields.String(load_default=None)
    text = fields.String(required=True)
    reading = fields.String(load_default=None)
    role = fields.String(
        load_default=Role.REQUIREMENT.value,
        validate=validate.OneOf([r.value for r in Role]),
    )
    kind = fields.String(required=True)
    params = fields.Dict(load_default=dict)
    codes = fields.List(fields.String(), load_default=None)  # subset of the section
    sections = fields.List(fields.String(), load_default=None)  # for shared rules
    applies_when = fields.Dict(load_default=None)
    applies_unless = fields.Dict(load_default=None)
    effective_from = fields.Date(load_default=None)
    effective_until = fields.Date(load_default=None)


class NotEncodedSchema(Schema):
    section = fields.String(required=True)
    text = fields.String(required=True)
    why = fields.String(required=True)


class RuleFileSchema(Schema):
    id = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]*$"))
    title = fields.String(required=True)
    section = fields.String(required=True)
    codes = fields.List(fields.Dict(), load_default=list)
    rules = fields.List(fields.Dict(), required=True)
    not_encoded = fields.List(fields.Nested(NotEncodedSchema), load_default=list)


@dataclass(frozen=True)
class ProcedureCode:
    system: str
    code: str
    display: str
    rule_set: str
    region: str | None = None
    image_guided: bool | None = None
    add_on_of: tuple[str, ...] = ()


@dataclass
class RuleSet:
    id: str
    title: str
    section: str
    file: str
    codes: dict[str, ProcedureCode] = field(default_factory=dict)
    rules: list[Criterion] = field(default_factory=list)
    not_encoded: list[dict] = field(default_factory=list)


def load_rule_sets(
    directory: Path, valuesets: dict[str, ValueSet]
) -> dict[str, RuleSet]:
    rule_sets: dict[str, RuleSet] = {}
    shared: list[tuple[Path, Criterion, list[str]]] = []
    seen_codes: dict[str, str] = {}
    seen_rules: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")):
        data = _read_yaml(path)
        try:
            top = RuleFileSchema().load(data)
        except ValidationError as exc:
            raise RuleFileError(path, None, *_first_error(exc.messages)) from None
        if top["id"] in rule_sets:
            raise RuleFileError(
                path, None, "id", f"rule set {top['id']!r} defined twice"
            )
        rule_set = RuleSet(
            id=top["id"],
            title=top["title"],
            section=top["section"],
            file=path.name,
            not_encoded=top["not_encoded"],
        )
        for i, raw in enumerate(top["codes"]):
            try:
                c = ProcedureCodeSchema().load(raw)
            except ValidationError as exc:
                name, msg = _first_error(exc.messages, f"codes[{i}]")
                raise RuleFileError(path, None, name, msg) from None
            if c["code"] in seen_codes:
                raise RuleFileError(
                    path,
                    None,
                    f"codes[{i}]",
                    f"code {c['code']} already belongs to rule set "
                    f"{seen_codes[c['code']]}",
                )
            seen_codes[c["code"]] = rule_set.id
            rule_set.codes[c["code"]] = ProcedureCode(
                system=c["system"],
                code=c["code"],
                display=c["display"],
                rule_set=rule_set.id,
                region=c["region"],
                image_guided=c["image_guided"],
                add_on_of=tuple(c["add_on_of"]),
            )
        for raw in top["rules"]:
            rule = build_criterion(raw, path, valuesets, section_default=top["section"])
            if rule.id in seen_rules:
                raise RuleFileError(path, rule.id, "id", "rule id used twice")
            seen_rules[rule.id] = path
            targets = rule.sections
            if targets:
                shared.append((path, rule, targets))
            else:
                if not rule_set.codes:
                    raise RuleFileError(
                        path,
                        rule.id,
                        "sections",
                        "a rule in a file without codes must name the sections it "
                        "applies to",
                    )
                unknown = set(rule.codes or ()) - set(rule_set.codes)
                if unknown:
                    raise RuleFileError(
                        path,
                        rule.id,
                        "codes",
                        f"codes not in this section: {sorted(unknown)}",
                    )
                rule_set.rules.append(rule)
        rule_sets[rule_set.id] = rule_set

    for path, rule, targets in shared:
        for target in targets:
            if target not in rule_sets:
                raise RuleFileError(
                    path, rule.id, "sections", f"unknown section {target!r}"
                )
            rule_sets[target].rules.append(rule)
    # Files holding only shared rules are not rule sets of their own.
    rule_sets = {k: rs for k, rs in rule_sets.items() if rs.codes}
    for rule_set in rule_sets.values():
        for code in rule_set.codes.values():
            for primary in code.add_on_of:
                if primary not in seen_codes:
                    raise RuleFileError(
                        rule_set.file,
                        None,
                        "codes.add_on_of",
                        f"{code.code} is an add-on of {primary}, which no section "
                        "lists",
                    )
    return rule_sets


def build_criterion(
    raw,
    path: Path,
    valuesets: dict[str, ValueSet],
    *,
    section_default: str | None,
    parent: str | None = None,
    field_prefix: str = "",
) -> Criterion:
    """Validate one rule (or nested criterion) and resolve its value-set references."""
    rule_id = raw.get("id") if isinstance(raw, dict) else None
    shown_id = parent or rule_id
    if not isinstance(raw, dict):
        raise RuleFileError(
            path, shown_id, field_prefix or None, "a rule must be a mapping"
        )
    try:
        data = CriterionSchema().load(raw)
    except ValidationError as exc:
        name, msg = _first_error(exc.messages)
        raise RuleFileError(path, shown_id, field_prefix + name, msg) from None

    spec = kind_spec(data["kind"])
    if spec is None:
        raise RuleFileError(
            path,
            shown_id,
            field_prefix + "kind",
            f"unknown criterion kind {data['kind']!r}",
        )
    try:
        params = spec.schema().load(data["params"])
    except ValidationError as exc:
        name, msg = _first_error(exc.messages, "params")
        raise RuleFileError(path, shown_id, field_prefix + name, msg) from None

    params = _resolve(
        params, spec, path, shown_id, field_prefix, valuesets, section_default
    )
    nested = {}
    for key in ("applies_when", "applies_unless"):
        if data[key] is not None:
            nested[key] = build_criterion(
                {
                    "id": f"{data['id']}-{key.replace('_', '-')}",
                    "text": key,
                    **data[key],
                },
                path,
                valuesets,
                section_default=section_default,
                parent=shown_id,
                field_prefix=f"{field_prefix}{key}.",
            )
    section = data["section"] or section_default
    if section is None:
        raise RuleFileError(path, shown_id, field_prefix + "section", "missing section")
    return Criterion(
        id=data["id"],
        section=section,
        text=data["text"],
        role=Role(data["role"]),
        kind=data["kind"],
        params=params,
        raw_params=data["params"],
        evaluator=spec.evaluate,
        reading=data["reading"],
        codes=frozenset(data["codes"]) if data["codes"] is not None else None,
        sections=tuple(data["sections"]) if data["sections"] else (),
        applies_when=nested.get("applies_when"),
        applies_unless=nested.get("applies_unless"),
        effective_from=data["effective_from"],
        effective_until=data["effective_until"],
        file=path.name,
    )


def _resolve(params, spec, path, rule_id, prefix, valuesets, section_default):
    """Replace value-set ids by ValueSet objects and nested dicts by Criteria."""
    resolved = dict(params)
    for name in spec.valueset_params:
        if "." in name:  # "measures.valueset": a key inside each dict of a list
            outer, inner = name.split(".", 1)
            items = []
            for i, item in enumerate(resolved.get(outer) or ()):
                vs_id = item.get(inner)
                if vs_id not in valuesets:
                    raise RuleFileError(
                        path,
                        rule_id,
                        f"{prefix}params.{outer}[{i}].{inner}",
                        f"unknown value set {vs_id!r}",
                    )
                items.append({**item, inner: valuesets[vs_id]})
            if outer in resolved and resolved[outer] is not None:
                resolved[outer] = tuple(items)
            continue
        value = resolved.get(name)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        missing = [v for v in ids if v not in valuesets]
        if missing:
            raise RuleFileError(
                path,
                rule_id,
                f"{prefix}params.{name}",
                f"unknown value set {missing[0]!r}",
            )
        objs = tuple(valuesets[v] for v in ids)
        resolved[name] = objs if isinstance(value, list) else objs[0]
    for name in spec.criteria_params:
        value = resolved.get(name)
        if value is None:
            continue
        resolved[name] = tuple(
            build_criterion(
                item,
                path,
                valuesets,
                section_default=section_default,
                parent=rule_id,
                field_prefix=f"{prefix}params.{name}[{i}].",
            )
            for i, item in enumerate(value)
        )
    return resolved


def _read_yaml(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise RuleFileError(path, None, None, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RuleFileError(path, None, None, "the file must hold a mapping")
    return data
