"""The CDS Hooks request envelope: marshmallow schemas and the `HookRequest`."""

from __future__ import annotations

from dataclasses import dataclass, field

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates_schema,
)

from cds_service.errors import Issue, ServiceError

ORDER_SELECT = "order-select"
ORDER_SIGN = "order-sign"

# An order form signs a handful of orders; same-day rules compare every pair, so
# a bound keeps one hostile call from occupying a worker for minutes.
MAX_DRAFT_ORDERS = 100
# Selections missing from draftOrders are named one by one up to this many; a
# hostile list of thousands gets one more issue counting the rest.
MAX_NAMED_SELECTIONS = 10

# Invariant ord-1 of the hook library: userId and selections are `Type/id`.
_REFERENCE = validate.Regexp(
    r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-\.]{1,64}$",
    error="must be a relative reference of the form Type/id",
)


class _Lenient(Schema):
    class Meta:
        # Unknown fields and extensions are ignored, as CRD (found-33) asks.
        unknown = EXCLUDE


class FhirAuthorizationSchema(_Lenient):
    access_token = fields.Str(required=True, validate=validate.Length(min=1))
    token_type = fields.Str(load_default="Bearer")
    expires_in = fields.Int()
    scope = fields.Str()
    subject = fields.Str()
    patient = fields.Str()


class DraftOrdersField(fields.Dict):
    """`context.draftOrders`: a Bundle, with or without its `type`."""

    def _deserialize(self, value, attr, data, **kwargs):
        bundle = super()._deserialize(value, attr, data, **kwargs)
        if bundle.get("resourceType") != "Bundle":
            raise ValidationError("must be a FHIR Bundle of draft orders")
        entries = bundle.get("entry")
        if entries is None:
            return bundle
        if not isinstance(entries, list):
            raise ValidationError({"entry": ["must be an array of Bundle entries"]})
        if len(entries) > MAX_DRAFT_ORDERS:
            raise ValidationError(
                f"holds {len(entries)} draft orders; at most {MAX_DRAFT_ORDERS} "
                "are judged in one call"
            )
        errors: dict = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                errors[index] = ["must be a Bundle entry (a JSON object)"]
                continue
            resource = entry.get("resource")
            if not isinstance(resource, dict):
                errors[index] = {
                    "resource": ["must be a FHIR resource (a JSON object)"]
                }
            elif not isinstance(resource.get("resourceType"), str):
                errors[index] = {"resource": {"resourceType": ["is required"]}}
            elif wrong := _extension_errors(resource.get("extension")):
                # The order is echoed back with our extension added (CRD
                # coverage-information): its own extensions must be FHIR's shape.
                errors[index] = {"resource": {"extension": wrong}}
        if errors:
            raise ValidationError({"entry": errors})
        return bundle


def _extension_errors(extensions: object) -> list | dict:
    """What is wrong with an `extension` element: an array of objects, each with a
    `url`, whose own `extension` (if any) is the same."""
    if extensions is None:
        return []
    if not isinstance(extensions, list):
        return ["must be an array of extensions"]
    errors: dict = {}
    for index, extension in enumerate(extensions):
        if not isinstance(extension, dict):
            errors[index] = ["must be an extension (a JSON object)"]
        elif not isinstance(extension.get("url"), str):
            errors[index] = {"url": ["is required"]}
        elif wrong := _extension_errors(extension.get("extension")):
            errors[index] = {"extension": wrong}
    return errors


class OrderContextSchema(_Lenient):
    userId = fields.Str(validate=_REFERENCE)
    patientId = fields.Str(required=True, validate=validate.Length(min=1))
    encounterId = fields.Str()
    draftOrders = DraftOrdersField(required=True)


class OrderSelectContextSchema(OrderContextSchema):
    selections = fields.List(fields.Str(validate=_REFERENCE), required=True)

    @validates_schema(skip_on_field_errors=False)
    def _selections_are_draft_orders(self, data, **kwargs):
        # CDS Hooks: selections reference resources in draftOrders; one that does
        # not would silently leave the order meant to be judged unjudged.
        selections = data.get("selections")
        if not isinstance(selections, list) or "draftOrders" not in data:
            return
        drafts = {
            f"{resource['resourceType']}/{resource['id']}"
            for _, resource in draft_resources(data)
            if isinstance(resource.get("id"), str)
        }
        unknown = [
            (index, selection)
            for index, selection in enumerate(selections)
            if selection not in drafts
        ]
        errors: dict = {
            index: [f"{selection} is not among context.draftOrders"]
            for index, selection in unknown[:MAX_NAMED_SELECTIONS]
        }
        if len(unknown) > MAX_NAMED_SELECTIONS:
            errors[unknown[MAX_NAMED_SELECTIONS][0]] = [
                f"and {len(unknown) - MAX_NAMED_SELECTIONS} more selections are "
                "not among context.draftOrders"
            ]
        if errors:
            raise ValidationError({"selections": errors})


def draft_resources(context: dict):
    """(entry index, resource) of each well-formed draft order in `context`."""
    bundle = context.get("draftOrders")
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            yield index, resource


class HookRequestSchema(_Lenient):
    hook = fields.Str(required=True)
    hookInstance = fields.Str(required=True, validate=validate.Length(min=1))
    fhirServer = fields.Url(
        require_tld=False, schemes={"http", "https"}, allow_none=True
    )
    fhirAuthorization = fields.Nested(FhirAuthorizationSchema, allow_none=True)
    context = fields.Nested(OrderContextSchema, required=True)
    # JSON object keys are strings and prefetch values are checked against their
    # templates below, so the mappings are taken as they are, not walked key by key.
    prefetch = fields.Dict(allow_none=True)
    extension = fields.Dict(allow_none=True)

    @validates_schema(skip_on_field_errors=False)
    def _token_needs_server(self, data, **kwargs):
        if data.get("fhirAuthorization") and not data.get("fhirServer"):
            raise ValidationError(
                "is required when fhirAuthorization is sent", "fhirServer"
            )


class OrderSelectRequestSchema(HookRequestSchema):
    context = fields.Nested(OrderSelectContextSchema, required=True)


SCHEMAS = {ORDER_SELECT: OrderSelectRequestSchema(), ORDER_SIGN: HookRequestSchema()}


@dataclass(frozen=True)
class HookRequest:
    """A validated order-select or order-sign call."""

    hook: str
    hook_instance: str
    patient_id: str
    draft_orders: dict
    selections: tuple[str, ...] | None = None
    user_id: str | None = None
    encounter_id: str | None = None
    fhir_server: str | None = None
    access_token: str | None = field(default=None, repr=False)
    prefetch: dict = field(default_factory=dict)
    extension: dict = field(default_factory=dict)


def load_hook_request(
    body: object, hook: str, templates: dict[str, str] | None = None
) -> HookRequest:
    """Validate `body` as a call of `hook`; raise 400 naming every wrong field.

    `templates` are the service's prefetch templates: the value sent under each of
    their keys must be what the template asks for. Other keys are not read.
    """
    if not isinstance(body, dict):
        raise ServiceError(400, "Request body must be a JSON object")
    sent_hook = body.get("hook")
    if isinstance(sent_hook, str) and sent_hook != hook:
        raise ServiceError(
            400,
            Issue(
                f"This service answers the {hook} hook, not {sent_hook}",
                expression="hook",
                code="not-supported",
            ),
        )

    messages: dict = {}
    try:
        data = SCHEMAS[hook].load(body)
    except ValidationError as error:
        messages = error.messages
    prefetch = body.get("prefetch")
    if isinstance(prefetch, dict) and templates and "prefetch" not in messages:
        if wrong := _prefetch_errors(prefetch, templates):
            messages = {**messages, "prefetch": wrong}
    if messages:
        raise ServiceError(400, list(_issues(messages)))

    context = data["context"]
    authorization = data.get("fhirAuthorization") or {}
    selections = context.get("selections")
    return HookRequest(
        hook=hook,
        hook_instance=data["hookInstance"],
        patient_id=context["patientId"],
        draft_orders=context["draftOrders"],
        selections=tuple(selections) if selections is not None else None,
        user_id=context.get("userId"),
        encounter_id=context.get("encounterId"),
        fhir_server=data.get("fhirServer"),
        access_token=authorization.get("access_token"),
        prefetch=data.get("prefetch") or {},
        extension=data.get("extension") or {},
    )


def _prefetch_errors(prefetch: dict, templates: dict[str, str]) -> dict:
    """Each prefetch value that is not what its template asks for, by key.

    Accepted: the template's resource type, a Bundle (a searchset, or a client's
    own packaging), an OperationOutcome (the client's report that the query
    failed), null (the client has no such data), and a value wrapped as a Bundle
    entry (`{"resource": ...}`).
    """
    errors = {}
    for key, template in templates.items():
        value = prefetch.get(key)
        if value is None:
            continue
        if isinstance(value, dict) and "resourceType" not in value:
            value = value.get("resource", value)
        wanted, searched = _template_type(template)
        expected = (
            f"a searchset Bundle of {wanted} resources"
            if searched
            else f"a {wanted} resource"
        )
        sent = value.get("resourceType") if isinstance(value, dict) else None
        if sent in (wanted, "Bundle", "OperationOutcome"):
            continue
        errors[key] = [
            f"expected {expected}, an OperationOutcome or null, not "
            + _describe_value(value)
        ]
    return errors


def _template_type(template: str) -> tuple[str, bool]:
    """The resource type a prefetch template asks for, and whether it searches."""
    path, searched = template.split("?", 1)[0], "?" in template
    resource_type, _, rest = path.partition("/")
    return resource_type, searched or not rest


def _describe_value(value: object) -> str:
    if isinstance(value, dict):
        sent = value.get("resourceType")
        if isinstance(sent, str):
            return f"a {sent} resource"
        return "an object without a resourceType"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _issues(messages, path: str = ""):
    """Flatten marshmallow's nested error dict into one Issue per wrong field."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                child = path
            elif isinstance(key, int):
                child = f"{path}[{key}]"
            else:
                child = f"{path}.{key}" if path else key
            yield from _issues(value, child)
        return
    for message in messages if isinstance(messages, list) else [messages]:
        if isinstance(message, (dict, list)):
            yield from _issues(message, path)
        else:
            where = path or "body"
            yield Issue(f"{where}: {message}", expression=path or None)
