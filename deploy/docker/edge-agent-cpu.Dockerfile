# syntax=docker/dockerfile:1
# Edge agent, CPU image (no GPU on the node): Python 3.11 on Debian bookworm, the CPU
# onnxruntime. Build from the repository root:
#
#   docker build -f deploy/docker/edge-agent-cpu.Dockerfile -t registry.example/edge-agent-cpu:0.1.0 .
#
# Same layout, user and entrypoint as edge-agent.Dockerfile; with it set
# inference.providers = ["cpu"] and drop runtimeClassName / nvidia.com/gpu from the
# Deployment. deploy/docker/build-steps.sh runs the same build steps without Docker (CI).

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# 1. The project wheel.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_hub ./cloud_hub
COPY hub_protocol ./hub_protocol
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

# 2. A virtualenv with the wheel and its dependencies (all of them ship manylinux wheels: no
#    compiler needed).
FROM ${PYTHON_IMAGE} AS venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/edge-agent
ENV PATH=/opt/edge-agent/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# DL3013 (pin pip versions): "$1" is the project's own wheel, built above; its
# dependencies are the ranges pyproject.toml declares.
# hadolint ignore=DL3013
RUN set -- /wheels/edge_agent-*.whl \
    && pip install --no-cache-dir "$1"
# The same smoke checks as build-steps.sh.
COPY deploy/k3s/base/edge-agent.toml /tmp/check/edge-agent.toml
RUN edge-agent --version \
    && cloud-hub --help > /dev/null \
    && python -c "import edge_agent.web, importlib.resources as r; assert (r.files('edge_agent.web') / 'templates' / 'study.html').is_file()" \
    && edge-agent check-config --config /tmp/check/edge-agent.toml

# 3. The runtime, as uid 10001.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edge-agent-cpu" \
      org.opencontainers.image.description="Hospital edge agent (DICOM ingest, ONNX inference on the CPU, sync with the cloud hub)"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --gid 10001 edge \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/edge-agent \
        --shell /usr/sbin/nologin edge \
    && mkdir -p /etc/edge-agent/secrets /var/lib/edge-agent /data/hot /data/warm /data/cold \
    && chown 10001:10001 /var/lib/edge-agent /data/hot /data/warm /data/cold
COPY --from=venv /opt/edge-agent /opt/edge-agent
COPY deploy/docker/healthcheck.py /opt/edge-agent/healthcheck.py
ENV PATH=/opt/edge-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    EDGE_CONFIG=/etc/edge-agent/edge-agent.toml
WORKDIR /var/lib/edge-agent
USER 10001:10001
VOLUME ["/var/lib/edge-agent", "/data/hot", "/data/warm", "/data/cold"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/edge-agent/healthcheck.py", "8080"]
ENTRYPOINT ["edge-agent"]
CMD ["run", "--config", "/etc/edge-agent/edge-agent.toml"]
