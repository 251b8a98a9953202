"""Pain-management CDS Hooks service: `create_app()` builds the Flask application."""

from __future__ import annotations

import logging
from datetime import date

from flask import Flask, request
from flask_cors import CORS

from cds_service.config import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, guideline=None) -> Flask:
    """The service, with its guideline loaded once for the life of the app."""
    import cards
    from cds_service import api
    from cds_service.errors import register_error_handlers
    from cds_service.logs import configure_logging
    from cds_service.prefetch import FhirFetcher, prefetch_templates

    settings = settings or Settings.from_env()
    configure_logging(settings, only_if_unconfigured=True)
    if guideline is None:
        from cds_service.guideline import Guideline

        guideline = Guideline.load()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions[api.EXTENSION_KEY] = api.ServiceState(
        settings=settings,
        guideline=guideline,
        fetcher=FhirFetcher(settings),
        prefetch=prefetch_templates(guideline.observation_codes()),
        evaluation_date=_evaluation_date(settings.evaluation_date),
        discovery_extension=cards.discovery_extension,
    )

    _allow_browsers(app, settings)
    register_error_handlers(app)
    app.register_blueprint(api.blueprint)

    # Other parts register here, one line each:
    #   cards:   cds_service.storage.init_app(app) (it may set
    #            app.extensions[api.EXTENSION_KEY].card_memory); feedback blueprint
    #   trust:   cds_service.auth.init_app(app, settings)
    from cards import discovery_extension
    from cds_service import feedback, storage

    store = storage.init_app(app, settings)
    app.register_blueprint(feedback.blueprint)
    app.extensions[api.EXTENSION_KEY].discovery_extension = discovery_extension
    app.extensions[api.EXTENSION_KEY].card_memory = store
    from cds_service import auth, limits

    auth.init_app(app, settings, replay_cache=store)
    limits.init_app(app)
    from cds_service import health, metrics

    health.init_app(app)
    metrics.init_app(app)
    return app


def _allow_browsers(app: Flask, settings: Settings) -> None:
    """CORS (flask-cors) for browser clients such as the CDS Hooks sandbox.

    Browsers preflight every call because it carries an Authorization header, and
    errors need the CORS headers too, so every path has them. A POST without an
    Origin header is answered without the CORS pass: browsers name their origin
    on every POST (Fetch standard), so it comes from a server (an EHR, the CRD
    test kit), which reads no CORS header, and its answer is never cached where
    a browser could get it. GET answers (discovery) keep the headers either way.
    """
    registered = list(app.after_request_funcs.get(None, ()))
    CORS(
        app,
        resources={r"/*": {"origins": settings.cors_origins}},
        allow_headers=["Authorization", "Content-Type"],
        methods=["GET", "POST", "OPTIONS"],
        max_age=600,
    )
    functions = app.after_request_funcs[None]
    for index, function in enumerate(functions):
        if function not in registered:
            functions[index] = _browser_calls_only(function)


def _browser_calls_only(add_cors_headers):
    def after_request(response):
        if request.method == "POST" and "Origin" not in request.headers:
            return response
        return add_cors_headers(response)

    return after_request


def _evaluation_date(text: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"PAIN_CDS_EVALUATION_DATE must be a date (YYYY-MM-DD), not {text!r}"
        ) from None
