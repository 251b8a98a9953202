"""The baseline of the HTTP benchmark: a bare Flask endpoint on the same gunicorn.

It decodes the request body as JSON and returns a fixed answer, served with the
same gunicorn configuration `pain-cds serve` uses: the floor the service is
measured against. Run as `python bench/bare.py --port 8099 --workers 2`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flask import Flask, jsonify, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cds_service.cli import gunicorn_options  # noqa: E402
from cds_service.config import Settings  # noqa: E402

FIXED_ANSWER = {"cards": [], "systemActions": []}


def bare_app() -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = Settings().max_body_bytes

    @app.post("/cds-services/<service_id>")
    def answer(service_id: str):
        body = request.get_json()
        if not isinstance(body, dict):
            return jsonify({"error": "not a JSON object"}), 400
        return jsonify(FIXED_ANSWER)

    return app


def main() -> None:
    from gunicorn.app.base import BaseApplication

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=Settings.threads)
    args = parser.parse_args()
    settings = Settings(
        port=args.port, workers=args.workers, threads=args.threads, log_level="WARNING"
    )

    class Bare(BaseApplication):
        def load_config(self):
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self):
            return bare_app()

    Bare().run()


if __name__ == "__main__":
    main()
