"""deploy/k3s/install.sh without a cluster: a fake kubectl answers the read-only questions
(version, nodes, RuntimeClass, Secrets), renders with the real ``kubectl kustomize``, and
fails loudly on anything that would change the cluster."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import K3S, kubectl, run

INSTALL = K3S / "install.sh"
Render = Callable[[str], list[dict[str, Any]]]

FAKE_KUBECTL = r"""#!/bin/sh
# fake kubectl for tests/deploy/test_install.py
printf '%s\n' "$*" >> "$FAKE_LOG"
case "$1" in
  version)
    if [ "${FAKE_UNREACHABLE:-0}" = 1 ]; then
      echo "The connection to the server was refused" >&2; exit 1
    fi
    echo "Client Version: v1.30.6"; echo "Server Version: v1.30.6+k3s1"; exit 0 ;;
  kustomize) exec "$REAL_KUBECTL" "$@" ;;
  get)
    case "$2" in
      nodes) printf '%b' "$FAKE_NODES"; exit 0 ;;
      runtimeclass)
        [ "${FAKE_NO_RUNTIMECLASS:-0}" = 1 ] && exit 1
        echo "runtimeclass.node.k8s.io/nvidia"; exit 0 ;;
      secret)
        for s in $FAKE_SECRETS; do
          [ "$s" = "$3" ] || continue
          case "$*" in
            *jsonpath=*cold-keys*) printf '%s' "${FAKE_COLD_KEYS_B64:-}" ;;
            *jsonpath=*) ;;
            *) echo "secret/$3" ;;
          esac
          exit 0
        done
        echo "Error from server (NotFound): secrets \"$3\" not found" >&2; exit 1 ;;
      pods) echo "10.1.2.3"; exit 0 ;;
      *) echo "Error from server (NotFound): $2 not found" >&2; exit 1 ;;
    esac ;;
esac
if [ "${FAKE_ALLOW_CHANGES:-0}" = 1 ]; then
  # the apply path: record, read what is piped in, succeed
  case "$*" in *"-f -"*) cat > /dev/null ;; esac
  case "$1" in
    create) case "$*" in *--dry-run=client*) echo "kind: Secret" ;; esac; exit 0 ;;
    apply|replace|rollout) exit 0 ;;
  esac
fi
echo "fake kubectl: refusing a call that changes the cluster: $*" >&2
touch "$FAKE_LOG.changed"
exit 99
"""

T4_NODE = r"gpu-node-1\t1\tt4\t10.1.2.3\n"
A40_NODE = r"gpu-node-2\t2\ta40\t10.1.2.4\n"
CPU_NODE = r"cpu-node-1\t\t\t10.1.2.9\n"


def fake_runner(tmp_path: Path, real_kubectl: str) -> Any:
    """Run install.sh against the fake kubectl; returns (result, log lines, changed?)."""
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text(FAKE_KUBECTL)
    (bindir / "kubectl").chmod(0o755)
    log = tmp_path / "kubectl.log"

    def go(*args: str, nodes: str = T4_NODE, **env: str) -> tuple[Any, list[str], bool]:
        log.write_text("")
        full = {
            **{k: v for k, v in os.environ.items() if k != "KUBECTL"},
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "FAKE_LOG": str(log),
            "REAL_KUBECTL": real_kubectl,
            "FAKE_NODES": nodes,
            "FAKE_SECRETS": "",
            **env,
        }
        result = run(["bash", str(INSTALL), *args], env=full, cwd=tmp_path, timeout=120)
        calls = [c for c in log.read_text().splitlines() if c]
        return result, calls, Path(f"{log}.changed").exists()

    return go


@pytest.fixture
def fake(tmp_path: Path) -> Any:
    """install.sh with the fake kubectl, rendering with the real one (needs kubectl)."""
    return fake_runner(tmp_path, kubectl())


@pytest.fixture
def fake_no_render(tmp_path: Path) -> Any:
    """install.sh with the fake kubectl, for runs that stop before rendering."""
    return fake_runner(tmp_path, "/nonexistent/kubectl")


@pytest.fixture
def cold_keys(tmp_path: Path) -> Path:
    p = tmp_path / "cold-keys"
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    p.write_text(f"# test ring\nk1-{secrets.token_hex(4)} {key}\n")
    p.chmod(0o600)
    return p


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def test_help() -> None:
    out = run(["bash", str(INSTALL), "--help"])
    assert out.returncode == 0
    for option in (
        "--overlay",
        "--cold-keys",
        "--generate-cold-keys",
        "--sync-credential",
        "--hub-ca",
        "--database-url",
        "--dry-run",
        "--replace-secrets",
    ):
        assert option in out.stdout


def test_dry_run_prints_the_manifests_and_changes_nothing(
    fake: Any, rendered: Render, cold_keys: Path, tmp_path: Path
) -> None:
    cred = tmp_path / "sync-credential.json"
    cred.write_text('{"site_id": "st-mary", "credential": "s3cr3t-credential-value"}')
    ca = tmp_path / "hub-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    result, calls, changed = fake(
        "--overlay",
        "edge-lite",
        "--cold-keys",
        str(cold_keys),
        "--sync-credential",
        str(cred),
        "--hub-ca",
        str(ca),
        "--env",
        "EDGE_DICOM_AE_TITLE=EDGE_MAIN",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert not changed, calls
    verbs = {c.split()[0] for c in calls}
    assert verbs <= {"version", "get", "kustomize"}, calls
    printed = docs_of(result.stdout)
    assert names(printed) == names(rendered("edge-lite"))
    # the Secret is described by its keys and sources, never its values
    out = result.stdout
    assert "edge-agent-secrets" in out
    for key in ("cold-keys", "sync-credential.json", "hub-ca.pem"):
        assert f"#   {key}: <" in out
    ring_key = cold_keys.read_text().split()[-1]
    assert ring_key not in out and ring_key not in result.stderr
    assert "s3cr3t-credential-value" not in out
    # the site's settings and the hub CA path go into the site ConfigMap
    assert "#   EDGE_DICOM_AE_TITLE: EDGE_MAIN" in out
    assert "#   EDGE_SYNC_HUB_CA_FILE: /etc/edge-agent/secrets/hub-ca.pem" in out
    assert "storescu -aet STORESCU -aec EDGE_MAIN 10.1.2.3 30104" in out


def test_dry_run_of_generated_keys_writes_no_file(
    fake: Any, rendered: Render, tmp_path: Path
) -> None:
    target = tmp_path / "new-cold-keys"
    result, _, changed = fake(
        "--overlay", "edge-standard", "--generate-cold-keys", str(target), "--dry-run",
        nodes=T4_NODE + A40_NODE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not changed and not target.exists()
    assert names(docs_of(result.stdout)) == names(rendered("edge-standard"))


def test_hub_dry_run(fake: Any, rendered: Render, tmp_path: Path) -> None:
    cert, key = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    result, calls, changed = fake(
        "--overlay", "hub", "--tls-cert", str(cert), "--tls-key", str(key), "--dry-run",
        nodes=CPU_NODE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not changed, calls
    assert names(docs_of(result.stdout)) == names(rendered("hub"))
    assert "#   postgres-password: <" in result.stdout
    assert "#   database-url: <" in result.stdout
    assert "postgresql+psycopg://" not in result.stdout  # the generated password stays hidden
    assert "statefulset/cloud-hub-postgres" in result.stdout


@pytest.mark.parametrize(
    ("nodes", "env", "message"),
    [
        (CPU_NODE, {}, "no node has allocatable nvidia.com/gpu"),
        (T4_NODE, {}, "needs a node labelled edge.example/gpu=a40 with 2"),
        (A40_NODE, {"FAKE_NO_RUNTIMECLASS": "1"}, "RuntimeClass nvidia is missing"),
        (A40_NODE, {"FAKE_UNREACHABLE": "1"}, "the cluster is not reachable"),
    ],
    ids=["no-gpu", "wrong-gpu", "no-runtimeclass", "unreachable"],
)
def test_cluster_prerequisites(
    fake_no_render: Any, cold_keys: Path, nodes: str, env: dict[str, str], message: str
) -> None:
    result, _, changed = fake_no_render(
        "--overlay", "edge-standard", "--cold-keys", str(cold_keys), "--dry-run",
        nodes=nodes, **env,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert not changed


def test_existing_secret_is_never_replaced_silently(fake: Any, cold_keys: Path) -> None:
    result, _, changed = fake(
        "--overlay", "edge-lite", "--cold-keys", str(cold_keys), "--dry-run",
        FAKE_SECRETS="edge-agent-secrets",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--replace-secrets" in result.stderr and not changed
    # without secret options the existing Secret is kept
    kept = {"FAKE_SECRETS": "edge-agent-secrets"}
    result, _, changed = fake("--overlay", "edge-lite", "--dry-run", **kept)
    assert result.returncode == 0, result.stderr
    assert "none to create" in result.stdout and not changed


def test_replacing_the_secret_keeps_every_cold_key(
    fake: Any, cold_keys: Path, tmp_path: Path
) -> None:
    in_cluster = base64.b64encode(cold_keys.read_bytes()).decode()
    env = {"FAKE_SECRETS": "edge-agent-secrets", "FAKE_COLD_KEYS_B64": in_cluster}
    # the same ring with a key appended (a rotation): accepted
    rotated = tmp_path / "rotated-keys"
    new_key = base64.b64encode(secrets.token_bytes(32)).decode()
    rotated.write_text(cold_keys.read_text() + f"k2-{secrets.token_hex(4)} {new_key}\n")
    args = ("--overlay", "edge-lite", "--replace-secrets", "--dry-run")
    result, _, changed = fake(*args, "--cold-keys", str(rotated), **env)
    assert result.returncode == 0, result.stderr
    assert "Secret edge-agent/edge-agent-secrets: would be replaced" in result.stdout
    assert not changed
    # a ring without the key in the cluster: refused
    other = tmp_path / "other-keys"
    other.write_text(f"k9-{secrets.token_hex(4)} {new_key}\n")
    result, _, changed = fake(*args, "--cold-keys", str(other), **env)
    assert result.returncode == 2
    assert "lacks key 'k1-" in result.stderr and not changed
    # a brand-new ring over an existing one: refused
    result, _, changed = fake(*args, "--generate-cold-keys", str(tmp_path / "fresh"), **env)
    assert result.returncode == 2
    assert "would replace the site's key ring" in result.stderr
    assert not (tmp_path / "fresh").exists() and not changed


def test_install_order_and_no_secret_on_a_command_line(
    fake: Any, cold_keys: Path, tmp_path: Path
) -> None:
    """The apply path against a fake that accepts changes: namespace, then the Secret (from
    files), the site ConfigMap, the manifests, the rollout wait; no secret value is ever an
    argument of kubectl (ps would show it)."""
    cred = tmp_path / "sync-credential.json"
    cred.write_text('{"site_id": "st-mary", "credential": "s3cr3t-credential-value"}')
    result, calls, changed = fake(
        "--overlay", "edge-lite", "--cold-keys", str(cold_keys), "--sync-credential", str(cred),
        "--env", "EDGE_DICOM_AE_TITLE=EDGE_MAIN", "--timeout", "30",
        FAKE_ALLOW_CHANGES="1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not changed
    changes = [c for c in calls if c.split()[0] in ("apply", "create", "replace", "rollout")]
    assert changes[0].startswith("apply -f ") and changes[0].endswith("base/namespace.yaml")
    assert changes[1].startswith("create secret generic edge-agent-secrets -n edge-agent")
    assert f"--from-file=cold-keys={cold_keys}" in changes[1]
    # "create configmap --dry-run=client -o yaml | apply -f -": a pipeline, either order
    (site,) = [c for c in changes[2:4] if c.startswith("create configmap edge-agent-site")]
    assert "--from-literal=EDGE_DICOM_AE_TITLE=EDGE_MAIN" in site
    assert "apply -f -" in changes[2:4]
    assert changes[4].startswith("apply -f ") and "manifests.yaml" in changes[4]
    assert changes[-1] == "rollout status deployment/edge-agent -n edge-agent --timeout=30s"
    ring_key = cold_keys.read_text().split()[-1]
    for c in calls:
        assert ring_key not in c and "s3cr3t" not in c, c
    assert "storescu -aet STORESCU -aec EDGE_MAIN 10.1.2.3 30104" in result.stdout


def test_generated_key_ring_is_one_the_agent_reads(fake: Any, tmp_path: Path) -> None:
    from edge_agent.lifecycle.coldcrypt import KeyRing

    ring = tmp_path / "site-cold-keys"
    result, calls, _ = fake(
        "--overlay", "edge-lite", "--generate-cold-keys", str(ring), FAKE_ALLOW_CHANGES="1"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ring.stat().st_mode & 0o777 == 0o600
    keys = KeyRing.load(ring)
    assert len(keys.keys[keys.active]) == 32
    assert any(f"--from-file=cold-keys={ring}" in c for c in calls)
    assert "BACK IT UP" in result.stderr


def test_hub_install_passes_generated_secrets_as_files(fake: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    result, calls, _ = fake(
        "--overlay", "hub", "--tls-cert", str(cert), "--tls-key", str(key),
        nodes=CPU_NODE, FAKE_ALLOW_CHANGES="1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (create,) = [c for c in calls if c.startswith("create secret generic cloud-hub-secrets")]
    assert "--from-file=database-url=" in create and "--from-file=postgres-password=" in create
    assert not any("postgresql" in c or "--from-literal" in c for c in calls if "secret" in c)
    rollouts = [c for c in calls if c.startswith("rollout status")]
    assert [r.split()[2] for r in rollouts] == [
        "deployment/cloud-hub",
        "statefulset/cloud-hub-postgres",
    ]


def test_first_install_needs_the_cold_key_ring(fake: Any) -> None:
    result, _, changed = fake("--overlay", "edge-lite", "--dry-run")
    assert result.returncode == 2
    assert "give --cold-keys FILE" in result.stderr and not changed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--overlay is required"),
        (["--overlay", "edge-huge"], "unknown overlay 'edge-huge'"),
        (["--overlay", "edge-lite", "--frobnicate"], "unknown argument '--frobnicate'"),
        (["--overlay"], "--overlay needs a value"),
        (["--overlay", "edge-lite", "--cold-keys", "/nonexistent/keys"], "cannot read file"),
        (["--overlay", "edge-lite", "--cold-keys", "{notakeyring}"], "not a cold-tier key ring"),
        (["--overlay", "edge-lite", "--tls-cert", "x.pem"], "is for --overlay hub"),
        (["--overlay", "hub", "--cold-keys", "{keyring}"], "is for the edge overlays"),
        (["--overlay", "edge-lite", "--env", "DICOM_PORT=1"], "--env wants EDGE_NAME=VALUE"),
        (["--overlay", "edge-lite", "--timeout", "soon"], "--timeout must be a number"),
        (["--overlay", "hub", "--database-url", "mysql://x"], "must be a postgresql:// URL"),
        (["--overlay", "hub", "--tls-cert", "{keyring}"], "--tls-cert and --tls-key go together"),
    ],
)
def test_bad_arguments_are_refused_before_touching_the_cluster(
    fake_no_render: Any, cold_keys: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    not_a_ring = tmp_path / "notes.txt"
    not_a_ring.write_text("hello\n")
    args = [
        a.replace("{keyring}", str(cold_keys)).replace("{notakeyring}", str(not_a_ring))
        for a in args
    ]
    result, calls, changed = fake_no_render(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert calls == [] and not changed


def test_missing_kubectl_is_reported(tmp_path: Path, cold_keys: Path) -> None:
    env = {**os.environ, "KUBECTL": str(tmp_path / "no-kubectl")}
    out = run(
        ["bash", str(INSTALL), "--overlay", "edge-lite", "--cold-keys", str(cold_keys)],
        env=env,
    )
    assert out.returncode == 1
    assert "kubectl not found" in out.stderr


@pytest.mark.parametrize("script", ["k3s/install.sh", "docker/build-steps.sh"])
def test_scripts_are_shellcheck_clean(script: str) -> None:
    # optional tool: skipped without it even under REQUIRE_DCMTK
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    out = run([shellcheck, str(K3S.parent / script)])
    assert out.returncode == 0, out.stdout
