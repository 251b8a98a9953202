"""Liveness (`/healthz`) and readiness (`/readyz`) endpoints for load balancers."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify

from cds_service.errors import Issue, error_response

logger = logging.getLogger(__name__)

blueprint = Blueprint("health", __name__)

# The store the cards part registers (`cds_service.storage.init_app`).
STORE_KEY = "store"


@blueprint.get("/healthz")
def healthz():
    """The process answers; says nothing about its dependencies (no restarts for a
    database outage, which readiness reports instead)."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz():
    """Ready to serve: the shared database (audit, feedback, jti cache) answers."""
    problem = database_problem()
    if problem:
        logger.warning("not ready: %s", problem)
        return error_response(503, [Issue(f"Not ready: {problem}", code="transient")])
    return jsonify({"status": "ok", "database": "ok"})


def database_problem() -> str | None:
    """What keeps the database from answering `SELECT 1`, or None when it does."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    store = current_app.extensions.get(STORE_KEY)
    engine = getattr(store, "engine", None)
    if engine is None:
        return "no database store is configured"
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        # The class name only: driver messages can carry host names and users.
        return f"database unreachable ({type(error).__name__})"
    return None


def init_app(app) -> None:
    app.register_blueprint(blueprint)
