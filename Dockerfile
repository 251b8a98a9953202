# pain-cds: the CDS Hooks service on gunicorn, as one container per replica.
#
#   docker build -t pain-cds .
#   docker run -p 8080:8080 -e PAIN_CDS_DATABASE_URL=postgresql+psycopg://... pain-cds
#
# Every setting is a PAIN_CDS_* environment variable (README, "Configuration").

FROM python:3.11-slim AS build
WORKDIR /src
# Only what the package needs, so that editing tests or docs keeps this layer cached.
COPY setup.cfg pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY cards ./cards
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 pain-cds \
    && useradd --system --uid 10001 --gid pain-cds --home-dir /app \
       --no-create-home --shell /usr/sbin/nologin pain-cds
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

WORKDIR /app
# The synthetic patients, for `pain-cds load-fixtures` (the compose `load-fixtures` job).
COPY fixtures ./fixtures

# Listen on all interfaces inside the container; the embedded SQLite default is only
# for a single container without a database (Compose sets PAIN_CDS_DATABASE_URL).
# Gunicorn workers share their Prometheus counters through files in this directory,
# which `pain-cds serve` empties when it starts.
ENV PAIN_CDS_HOST=0.0.0.0 \
    PAIN_CDS_PORT=8080 \
    PAIN_CDS_WORKERS=2 \
    PAIN_CDS_DATABASE_URL=sqlite:////tmp/pain-cds.sqlite \
    PROMETHEUS_MULTIPROC_DIR=/tmp/pain-cds-metrics

USER 10001:10001
EXPOSE 8080
# slim has no curl; the standard library is enough for a liveness probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PAIN_CDS_PORT', '8080'), timeout=2)"]

# Exec form, so the gunicorn master is PID 1 and gets `docker stop`'s SIGTERM itself:
# it stops accepting, lets in-flight calls finish (PAIN_CDS_GRACEFUL_TIMEOUT), exits 0.
STOPSIGNAL SIGTERM
CMD ["pain-cds", "serve"]
