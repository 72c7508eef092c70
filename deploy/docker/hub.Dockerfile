# syntax=docker/dockerfile:1
# Cloud hub image: Python 3.11 on Debian bookworm, with boto3 for an S3-compatible archive
# (the "s3" extra). Build from the repository root:
#
#   docker build -f deploy/docker/hub.Dockerfile -t registry.example/cloud-hub:0.1.0 .
#
# Stateless: the database URL, ops token, TLS certificate and S3 credentials come from the
# environment and mounted Secrets (deploy/k3s/overlays/hub), never from the image.

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# 1. The project wheel (one distribution holds the agent and the hub).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_hub ./cloud_hub
COPY hub_protocol ./hub_protocol
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

# 2. A virtualenv with the wheel, its dependencies and boto3.
FROM ${PYTHON_IMAGE} AS venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/cloud-hub
ENV PATH=/opt/cloud-hub/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# DL3013 (pin pip versions): "$1" is the project's own wheel, built above; its
# dependencies are the ranges pyproject.toml declares.
# hadolint ignore=DL3013
RUN set -- /wheels/edge_agent-*.whl \
    && pip install --no-cache-dir "$1[s3]" \
    && cloud-hub --version \
    && cloud-hub run --help > /dev/null \
    && python -c "import boto3, cloud_hub.app"

# 3. The runtime, as uid 10001.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cloud-hub" \
      org.opencontainers.image.description="Central hub for hospital edge agents (sync, model releases, archive)"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --gid 10001 hub \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/cloud-hub \
        --shell /usr/sbin/nologin hub \
    && mkdir -p /var/lib/cloud-hub /etc/cloud-hub/tls \
    && chown 10001:10001 /var/lib/cloud-hub
COPY --from=venv /opt/cloud-hub /opt/cloud-hub
COPY deploy/docker/healthcheck.py /opt/cloud-hub/healthcheck.py
ENV PATH=/opt/cloud-hub/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# default locations (relative to the working directory, a volume): sqlite:///hub.db,
# artifacts/, archive/, uploads/; production sets HUB_DATABASE_URL etc.
WORKDIR /var/lib/cloud-hub
USER 10001:10001
VOLUME ["/var/lib/cloud-hub"]
EXPOSE 8443
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "/opt/cloud-hub/healthcheck.py", "8443"]
ENTRYPOINT ["cloud-hub"]
CMD ["run", "--host", "0.0.0.0", "--port", "8443"]
