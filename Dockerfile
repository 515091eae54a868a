# Declic: a small image that runs `declic serve` as a non-root user on a read-only root file system.
#   docker build -t declic .
#   docker run --read-only --tmpfs /tmp -p 8080:8080 -v declic-data:/var/lib/declic declic
# See docs/deployment.md (compose with PostgreSQL and HTTPS, systemd).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY plugins plugins
# Every dependency ships wheels (psycopg's binary one included): no compiler in either stage.
RUN python -m venv /opt/declic \
 && /opt/declic/bin/pip install ".[postgres]" \
 && /opt/declic/bin/python -m compileall -q /opt/declic

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/declic/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DECLIC_CONFIG=/etc/declic/declic.yaml \
    DECLIC_DATABASE_URL=sqlite:////var/lib/declic/declic.db
COPY --from=build /opt/declic /opt/declic
COPY config /etc/declic
# A fixed numeric user, so that Kubernetes' runAsNonRoot and volume ownership need no lookup.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/declic --shell /usr/sbin/nologin declic \
 && mkdir -p /var/lib/declic \
 && chown declic:declic /var/lib/declic
USER 10001:10001
WORKDIR /var/lib/declic
VOLUME /var/lib/declic
EXPOSE 8080
# 200 when the database is reachable, migrations are current and the worker runs; urlopen raises otherwise.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
# Exec form: declic is PID 1 and gets SIGTERM itself; it stops taking jobs, lets sends finish (10 s), exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["declic"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
