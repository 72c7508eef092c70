# syntax=docker/dockerfile:1
# Edge agent, GPU image: CUDA 12.4 + cuDNN 9 runtime, Python 3.11, onnxruntime-gpu (CUDA
# and CPU execution providers; no TensorRT libraries). Build from the repository root:
#
#   docker build -f deploy/docker/edge-agent.Dockerfile -t registry.example/edge-agent:0.1.0 .
#
# The node needs an NVIDIA driver for CUDA 12.4 (>= 550, or >= 525 with CUDA minor-version
# compatibility) and the NVIDIA container toolkit. deploy/docker/build-steps.sh runs the same
# build steps without Docker (CI). Nothing secret is in the image: the config, the cold-tier
# key ring and the hub credential are mounted at run time (deploy/k3s).

ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# 1. The project wheel. Pure Python, so any Python 3.11 builds the same wheel.
FROM python:3.11.10-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_hub ./cloud_hub
COPY hub_protocol ./hub_protocol
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

# 2. A virtualenv holding the wheel and its dependencies, on the runtime image's own Python
#    (Ubuntu 22.04's python3.11), so it can be copied as is into the final stage.
FROM ${CUDA_IMAGE} AS venv
# onnxruntime-gpu built for CUDA 12.x + cuDNN 9 (the base image's); newer releases may
# target another CUDA major: change both together.
ARG ORT_GPU_VERSION=1.20.1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/edge-agent
ENV PATH=/opt/edge-agent/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# pyproject's "gpu" extra adds onnxruntime-gpu, but pip still installs the CPU onnxruntime
# too: its marker `extra != 'gpu'` is evaluated for the base requirements without the
# extra. Both ship the same `onnxruntime` package folder, so: install, remove the CPU
# build, then reinstall onnxruntime-gpu (the removal took files it shares), and check.
# DL3013 (pin pip versions): "$1" is the project's own wheel, built above; its
# dependencies are the ranges pyproject.toml declares.
# hadolint ignore=DL3013
RUN set -- /wheels/edge_agent-*.whl \
    && pip install --no-cache-dir "$1[gpu]" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir --no-deps --force-reinstall "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && if pip show -q onnxruntime 2>/dev/null; then echo "CPU onnxruntime still installed" >&2; exit 1; fi \
    && python -c "import onnxruntime as o, sys; p = o.get_available_providers(); print(p); sys.exit('CUDAExecutionProvider' not in p)"
# The same smoke checks as build-steps.sh: the commands start, the web templates are in the
# wheel, the k3s base config validates.
COPY deploy/k3s/base/edge-agent.toml /tmp/check/edge-agent.toml
RUN edge-agent --version \
    && cloud-hub --help > /dev/null \
    && python -c "import edge_agent.web, importlib.resources as r; assert (r.files('edge_agent.web') / 'templates' / 'study.html').is_file()" \
    && edge-agent check-config --config /tmp/check/edge-agent.toml

# 3. The runtime: CUDA runtime + python3.11 + the virtualenv, running as uid 10001.
FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="edge-agent" \
      org.opencontainers.image.description="Hospital edge agent (DICOM ingest, ONNX inference on the GPU, sync with the cloud hub)"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 edge \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/edge-agent \
        --shell /usr/sbin/nologin edge \
    && mkdir -p /etc/edge-agent/secrets /var/lib/edge-agent /data/hot /data/warm /data/cold \
    && chown 10001:10001 /var/lib/edge-agent /data/hot /data/warm /data/cold
COPY --from=venv /opt/edge-agent /opt/edge-agent
COPY deploy/docker/healthcheck.py /opt/edge-agent/healthcheck.py
# Read-only root filesystem: nothing is written outside the volumes and /tmp (no bytecode
# caches at run time; HOME, and so CUDA's kernel cache, under /tmp).
ENV PATH=/opt/edge-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    EDGE_CONFIG=/etc/edge-agent/edge-agent.toml \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/edge-agent
USER 10001:10001
# the SQLite store, models, quarantine (data_dir) and the three storage tiers
VOLUME ["/var/lib/edge-agent", "/data/hot", "/data/warm", "/data/cold"]
# DICOM, web UI / REST API / metrics / probes
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/edge-agent/healthcheck.py", "8080"]
ENTRYPOINT ["edge-agent"]
# the config is mounted (deploy/k3s: ConfigMap edge-agent-config); none is baked in
CMD ["run", "--config", "/etc/edge-agent/edge-agent.toml"]
