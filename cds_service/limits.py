"""Request body limits: size (also for chunked uploads), JSON nesting depth, numbers."""

from __future__ import annotations

import logging

from flask import Flask, Request, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from cds_service import cpu

logger = logging.getLogger(__name__)


class NestedTooDeeply(BadRequest):
    description = "Request body is nested too deeply"


class BoundedRequest(Request):
    """A Flask request that refuses oversized and too deeply nested JSON bodies.

    With a Content-Length, werkzeug refuses an oversized body itself. A chunked
    body (no Content-Length) is instead cut silently at `MAX_CONTENT_LENGTH`
    (werkzeug's LimitedStream on servers that set `wsgi.input_terminated`, such as
    gunicorn), which would surface as "invalid JSON" rather than "too large".

    JSON nested deeper than the interpreter's recursion limit makes the decoder
    raise RecursionError, which Flask does not treat as a parse error; it is
    turned into a 400 once, and later silent reads (the audit) get None.
    """

    _nested_too_deeply = False

    def get_data(self, *args, **kwargs):
        data = super().get_data(*args, **kwargs)
        limit = self.max_content_length
        if self.content_length is None and limit is not None and len(data) >= limit:
            raise RequestEntityTooLarge()
        return data

    def get_json(self, force=False, silent=False, cache=True):
        if self._nested_too_deeply:
            if silent:
                return None
            raise NestedTooDeeply()
        try:
            return super().get_json(force=force, silent=silent, cache=cache)
        except RecursionError:
            self._nested_too_deeply = True
            raise NestedTooDeeply() from None


class StrictJSONProvider(DefaultJSONProvider):
    """JSON as RFC 8259 has it: no NaN or Infinity, read or written.

    Python's json reads and writes them by default; an order echoed with one in a
    systemAction would make the whole answer unreadable to the EHR.
    """

    sort_keys = False

    def loads(self, s, **kwargs):
        kwargs.setdefault("parse_constant", _refuse_constant)
        return super().loads(s, **kwargs)

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def init_app(app: Flask) -> None:
    """Check the body of every JSON call once, after authentication, before views.

    Call after `auth.init_app` so that an unauthenticated body is never read. The
    parsed body is cached, so the view's own `get_json` costs nothing more. From
    the parse to the end of the call the call holds the process's CPU slot.
    """
    app.request_class = BoundedRequest
    app.json = StrictJSONProvider(app)

    def check_body() -> None:
        if request.method == "POST" and request.is_json:
            # Read from the socket first: a slow client never holds the slot.
            request.get_data()
            cpu.slot.acquire()
            request.get_json(silent=True)

    def leave_slot(_error: BaseException | None) -> None:
        cpu.slot.release()

    app.before_request(check_body)
    app.teardown_request(leave_slot)
