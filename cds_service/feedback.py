"""`POST /cds-services/{id}/feedback`: CDS Hooks 2.0 card feedback, validated."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

from flask import Blueprint, current_app, jsonify, request
from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates_schema,
)

from cds_service.errors import (
    Issue,
    ServiceError,
    require_json_content,
    unknown_service,
)
from cds_service.storage import EXTENSION_KEY, FeedbackItem, Store

logger = logging.getLogger(__name__)

blueprint = Blueprint("feedback", __name__)

OUTCOMES = ("accepted", "overridden")
DEFAULT_MAX_ITEMS = 100

# Every card this service returns carries a uuid (cards.identity); anything else
# names no card of ours and would only fill the store.
_UUID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE
)


class _Base(Schema):
    class Meta:
        # Unknown members (a client's `extension`, future fields) are ignored.
        unknown = EXCLUDE


class CodingSchema(_Base):
    system = fields.Str(required=True, validate=validate.Length(min=1))
    code = fields.Str(required=True, validate=validate.Length(min=1))
    # CDS Hooks makes display conditional; the sandbox sends none.
    display = fields.Str()


class OverrideReasonSchema(_Base):
    reason = fields.Nested(CodingSchema)
    userComment = fields.Str()


class AcceptedSuggestionSchema(_Base):
    id = fields.Str(required=True, validate=validate.Length(min=1))


class Rfc3339UTC(fields.Field):
    """An RFC 3339 date-time with a time zone, read as UTC (CDS Hooks 2.0)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("must be an RFC 3339 date-time string")
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError(
                "must be an RFC 3339 date-time, e.g. 2026-12-03T18:20:00Z"
            ) from None
        if "T" not in value.upper() or parsed.tzinfo is None:
            raise ValidationError(
                "must be a date-time in UTC with its zone, e.g. 2026-12-03T18:20:00Z"
            )
        try:
            return parsed.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
            raise ValidationError(
                "must be a date-time from year 1 to 9999 in UTC"
            ) from None


class FeedbackItemSchema(_Base):
    card = fields.Str(
        required=True,
        validate=validate.Regexp(_UUID, error="must be the uuid of a card we returned"),
    )
    outcome = fields.Str(required=True, validate=validate.OneOf(OUTCOMES))
    acceptedSuggestions = fields.List(
        fields.Nested(AcceptedSuggestionSchema), validate=validate.Length(min=1)
    )
    overrideReason = fields.Nested(OverrideReasonSchema)
    outcomeTimestamp = Rfc3339UTC(required=True)

    @validates_schema(skip_on_field_errors=False)
    def _accepted_names_suggestions(self, data, **kwargs):
        if data.get("outcome") == "accepted" and not data.get("acceptedSuggestions"):
            raise ValidationError(
                "required when outcome is accepted", "acceptedSuggestions"
            )
        if data.get("outcome") == "overridden" and data.get("acceptedSuggestions"):
            raise ValidationError(
                "not allowed when outcome is overridden", "acceptedSuggestions"
            )


class FeedbackSchema(_Base):
    feedback = fields.List(
        fields.Nested(FeedbackItemSchema),
        required=True,
        validate=validate.Length(min=1, error="must list at least one item"),
    )


_SCHEMA = FeedbackSchema()


@blueprint.post("/cds-services/<service_id>/feedback")
def receive_feedback(service_id: str):
    known = _known_services()
    if known is not None and service_id not in known:
        raise unknown_service(service_id)
    require_json_content()
    body = request.get_json(silent=True)
    if body is None and request.get_data().strip() != b"null":
        raise ServiceError(
            400,
            Issue('Request body must be JSON: {"feedback": [...]}', code="structure"),
        )
    if not isinstance(body, dict):
        raise ServiceError(400, Issue("must be a JSON object", expression="$"))
    _check_item_count(body.get("feedback"))
    try:
        data = _SCHEMA.load(body)
    except ValidationError as error:
        raise ServiceError(400, list(_issues(error.messages))) from None

    items = [_item(entry) for entry in data["feedback"]]
    stored = _store().add_feedback(service_id, items)
    logger.info(
        "feedback stored",
        extra={
            "service": service_id,
            "items": len(items),
            "stored": stored,
            "outcomes": sorted({item.outcome for item in items}),
        },
    )
    return jsonify({"received": len(items), "stored": stored})


def _check_item_count(items: object) -> None:
    # Counted before validation: validating thousands of items is the cost to avoid.
    limit = _max_items()
    if isinstance(items, list) and len(items) > limit:
        raise ServiceError(
            400,
            Issue(
                f"feedback: at most {limit} items per call, not {len(items)}; "
                "send the rest in further calls",
                code="too-costly",
                expression="feedback",
            ),
        )


def _max_items() -> int:
    from cds_service.api import EXTENSION_KEY as API_KEY

    state = current_app.extensions.get(API_KEY)
    settings = getattr(state, "settings", None)
    return getattr(settings, "max_feedback_items", None) or DEFAULT_MAX_ITEMS


def _item(entry: dict) -> FeedbackItem:
    reason = (entry.get("overrideReason") or {}).get("reason") or {}
    return FeedbackItem(
        card=entry["card"],
        outcome=entry["outcome"],
        outcome_timestamp=entry["outcomeTimestamp"],
        accepted_suggestions=tuple(
            s["id"] for s in entry.get("acceptedSuggestions", [])
        ),
        override_system=reason.get("system"),
        override_code=reason.get("code"),
        override_display=reason.get("display"),
        user_comment=(entry.get("overrideReason") or {}).get("userComment"),
    )


def _issues(messages, path: str = ""):
    """One OperationOutcome issue per wrong field, with its FHIRPath-like location."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if isinstance(key, int):
                location = f"{path}[{key}]"
            elif key == "_schema":
                location = path
            else:
                location = f"{path}.{key}" if path else key
            yield from _issues(value, location)
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        for message in messages:
            yield Issue(f"{path or 'body'}: {message}", expression=path or None)
    elif isinstance(messages, list):
        for value in messages:
            yield from _issues(value, path)
    else:
        yield Issue(f"{path or 'body'}: {messages}", expression=path or None)


def _store() -> Store:
    store = current_app.extensions.get(EXTENSION_KEY)
    if store is None:
        raise RuntimeError("cds_service.storage.init_app(app) was not called")
    return store


def _known_services() -> set[str] | None:
    try:
        from cds_service.api import EXTENSION_KEY as API_KEY
        from cds_service.api import SERVICES
    except ImportError:
        return None
    if API_KEY not in current_app.extensions:
        return None  # a bare app (tests of this blueprint alone) serves any id
    return set(SERVICES)
