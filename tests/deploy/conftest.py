"""Shared helpers for the deployment tests (deploy/): the repository paths, external tools
found or skipped, and the overlays rendered once per session.

A missing tool (kubectl, hadolint, promtool) or the schema package skips its tests, unless
``REQUIRE_DCMTK`` is set: that is how ``make test`` says "everything must be installed", and
then a missing tool fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K3S = DEPLOY / "k3s"
OVERLAYS = ("edge-lite", "edge-standard", "hub")
EDGE_OVERLAYS = {"edge-lite": 1, "edge-standard": 2}  # overlay -> GPUs
K8S_VERSION = "1.30"


def required() -> bool:
    """True when every tool must be present (``make test`` sets REQUIRE_DCMTK=1)."""
    return os.environ.get("REQUIRE_DCMTK", "") not in ("", "0")


def missing(what: str, hint: str) -> None:
    """Skip (or, under REQUIRE_DCMTK, fail) because ``what`` is not installed."""
    if required():
        pytest.fail(f"REQUIRE_DCMTK is set but {what} is not installed ({hint})")
    pytest.skip(f"{what} is not installed ({hint})")


def tool(name: str, hint: str) -> str:
    """The path of an executable: on PATH, or next to this Python (a venv's bin/)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    missing(name, hint)
    raise AssertionError("unreachable")  # missing() skips or fails


def kubectl() -> str:
    return tool("kubectl", "make system-deps installs it")


def run(
    args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without EDGE_* (the tests' own overrides, e.g.
    EDGE_WEB_PORT=0) so a config is judged as the pod would see it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(extra)
    return env


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/k3s/overlays/<overlay>`` as a list of documents."""
    out = run([kubectl(), "kustomize", str(K3S / "overlays" / overlay)])
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs, f"{overlay} rendered nothing"
    return docs


@pytest.fixture(scope="session")
def rendered() -> Callable[[str], list[dict[str, Any]]]:
    """overlay name -> its rendered documents (each rendered once per session)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def get(overlay: str) -> list[dict[str, Any]]:
        if overlay not in cache:
            cache[overlay] = render(overlay)
        return cache[overlay]

    return get


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Documents of ``kind`` (named ``name``, or whose name starts with it for generated
    names when ``name`` ends with '-')."""
    out = []
    for d in docs:
        if d.get("kind") != kind:
            continue
        n = d["metadata"]["name"]
        if name is None or n == name or (name.endswith("-") and n.startswith(name)):
            out.append(d)
    return out


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a workload, None for other kinds."""
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return doc["spec"]
    return None
