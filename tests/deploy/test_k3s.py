"""deploy/k3s: every overlay renders, validates against the Kubernetes schemas, and meets the
security and sizing policy; the agent config in each edge ConfigMap is one the agent accepts
and matches its overlay's GPUs; the restore Job agrees with it."""

from __future__ import annotations

import importlib
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    EDGE_OVERLAYS,
    K3S,
    K8S_VERSION,
    OVERLAYS,
    clean_env,
    find,
    missing,
    one,
    pod_spec,
    run,
)

Render = Callable[[str], list[dict[str, Any]]]
LONG_RUNNING = ("Deployment", "StatefulSet", "DaemonSet")
BASE_TOML = K3S / "base" / "edge-agent.toml"
# keys an edge overlay's TOML may change from the base's (everything else must be equal)
OVERLAY_KEYS = {
    "edge-lite": {("inference", "device_ids"), ("inference", "intra_op_threads")},
    "edge-standard": {
        ("inference", "device_ids"),
        ("inference", "intra_op_threads"),
        ("dicom", "max_associations"),
    },
}


def kubernetes_validate() -> Any:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        missing("kubernetes-validate", "pip install kubernetes-validate")
        raise


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in docs:
        spec = pod_spec(d)
        if spec is not None:
            yield d, spec


def edge_config(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(ConfigMap name, TOML text) of the agent config the Deployment mounts."""
    dep = one(docs, "Deployment", "edge-agent")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    name = vols["config"]["configMap"]["name"]
    cm = one(docs, "ConfigMap", name)
    return name, cm["data"]["edge-agent.toml"]


def flatten(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and k not in ("quiet_period_by_modality", "cold_days_by_modality"):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def check_config(path: Path) -> None:
    out = run(
        [sys.executable, "-m", "edge_agent", "check-config", "--config", str(path)],
        env=clean_env(),
        timeout=60,
    )
    assert out.returncode == 0, f"edge-agent check-config refused {path}:\n{out.stderr}"
    assert "configuration OK" in out.stdout


# ---------------------------------------------------------------------------------------
# rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(rendered: Render, overlay: str) -> None:
    kv = kubernetes_validate()
    docs = rendered(overlay)
    errors = []
    for d in docs:
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except (kv.ValidationError, kv.SchemaNotFoundError) as exc:
            errors.append(f"{d['kind']} {d['metadata']['name']}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "path",
    [K3S / "jobs" / "restore-job.yaml", K3S / "k3s-config" / "runtimeclass-nvidia.yaml"],
    ids=lambda p: p.name,
)
def test_standalone_manifests_validate(path: Path) -> None:
    kv = kubernetes_validate()
    for d in yaml.safe_load_all(path.read_text()):
        kv.validate(d, K8S_VERSION, strict=True)


def test_k3s_config_examples_are_yaml() -> None:
    server = yaml.safe_load((K3S / "k3s-config" / "server.yaml").read_text())
    agent = yaml.safe_load((K3S / "k3s-config" / "agent.yaml").read_text())
    assert "traefik" in server["disable"]
    assert server["cluster-cidr"] and server["service-cidr"]
    labels = {*server["node-label"], *agent["node-label"]}
    assert {"edge.example/gpu=t4", "edge.example/gpu=a40"} <= labels
    assert agent["server"].startswith("https://")


# ---------------------------------------------------------------------------------------
# policy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_security_policy(rendered: Render, overlay: str) -> None:
    problems = []
    for d, spec in workloads(rendered(overlay)):
        where = f"{d['kind']} {d['metadata']['name']}"
        psc = spec.get("securityContext", {})
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: host namespaces")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: service account token mounted")
        for v in spec.get("volumes", []):
            if "hostPath" in v:
                problems.append(f"{where}: hostPath volume {v['name']}")
        for c in containers(spec):
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: root filesystem not read-only")
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{at}: runAsNonRoot not set")
            if sc.get("runAsUser", psc.get("runAsUser", 0)) == 0:
                problems.append(f"{at}: runs as uid 0")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{at}: capabilities not dropped")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{at}: adds capabilities")
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{at}: no RuntimeDefault seccomp profile")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(part, {}):
                        problems.append(f"{at}: no {r} {part}")
            if d["kind"] in LONG_RUNNING:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        problems.append(f"{at}: no {probe}")
            image = c["image"]
            name = image.split("@", 1)[0]
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
            if not tag or tag == "latest":
                problems.append(f"{at}: image {image} has no explicit version tag")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_and_no_api_permissions(rendered: Render, overlay: str) -> None:
    docs = rendered(overlay)
    assert not find(docs, "Secret"), "Secrets are created by install.sh, never committed"
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert not find(docs, kind), f"the {overlay} overlay grants API permissions ({kind})"
    for sa in find(docs, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for ns in find(docs, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", list(EDGE_OVERLAYS))
def test_edge_deployment_is_one_recreated_replica_with_its_gpus(
    rendered: Render, overlay: str
) -> None:
    docs = rendered(overlay)
    dep = one(docs, "Deployment", "edge-agent")
    assert dep["metadata"]["namespace"] == "edge-agent"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    spec = dep["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert (
        spec["nodeSelector"]["edge.example/gpu"]
        == {"edge-lite": "t4", "edge-standard": "a40"}[overlay]
    )
    (agent,) = spec["containers"]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == EDGE_OVERLAYS[overlay]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "web"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "web"}
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"dicom": 11112, "web": 8080}
    assert agent["args"] == ["run", "--config", "/etc/edge-agent/edge-agent.toml"]
    # the backup CronJob runs the same image as the agent (the same store version)
    (cron,) = find(docs, "CronJob", "edge-agent-backup")
    (backup,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert backup["image"] == agent["image"]
    cron_spec = pod_spec(cron)
    assert cron_spec is not None and "runtimeClassName" not in cron_spec
    # ... with the same generated config (kustomize rewrote both references)
    config = {v["name"]: v for v in spec["volumes"]}["config"]["configMap"]["name"]
    cron_config = {v["name"]: v for v in cron_spec["volumes"]}["config"]["configMap"]["name"]
    assert cron_config == config


def test_edge_standard_is_bigger_than_edge_lite(rendered: Render) -> None:
    def sizes(overlay: str) -> dict[str, str]:
        return {
            p["metadata"]["name"]: p["spec"]["resources"]["requests"]["storage"]
            for p in find(rendered(overlay), "PersistentVolumeClaim")
        }

    def gib(q: str) -> float:
        units = {"Gi": 1, "Ti": 1024}
        return float(q[:-2]) * units[q[-2:]]

    lite, std = sizes("edge-lite"), sizes("edge-standard")
    assert (
        set(lite)
        == set(std)
        == {f"edge-agent-{v}" for v in ("data", "hot", "warm", "cold", "backup")}
    )
    for name in lite:
        assert gib(std[name]) > gib(lite[name]), name


@pytest.mark.parametrize("overlay", list(EDGE_OVERLAYS))
def test_service_and_network_policy(rendered: Render, overlay: str) -> None:
    docs = rendered(overlay)
    svc = one(docs, "Service", "edge-agent")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["dicom"]["nodePort"] == 30104 and ports["dicom"]["targetPort"] == "dicom"
    assert ports["web"]["port"] == 8080
    assert svc["spec"]["externalTrafficPolicy"] == "Local"  # the PACS address, not a node's

    (pol,) = find(docs, "NetworkPolicy")
    dep = one(docs, "Deployment", "edge-agent")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    dicom_rules = 0
    for rule in pol["spec"]["ingress"]:
        ports_ = rule.get("ports")
        covers_dicom = not ports_ or any(p.get("port") in (11112, "dicom") for p in ports_)
        if not covers_dicom:
            continue
        dicom_rules += 1
        peers = rule.get("from")
        assert peers, "DICOM ingress open to every source"
        for peer in peers:
            assert set(peer) == {"ipBlock"}, f"DICOM ingress from a non-ipBlock peer: {peer}"
            assert peer["ipBlock"]["cidr"] != "0.0.0.0/0"
    assert dicom_rules >= 1
    egress_ports = {p["port"] for r in pol["spec"]["egress"] for p in r.get("ports", [])}
    assert {443, 8443, 53} <= egress_ports


def test_hub_overlay(rendered: Render) -> None:
    docs = rendered("hub")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "edge-hub", d["metadata"]["name"]
    dep = one(docs, "Deployment", "cloud-hub")
    assert dep["spec"]["replicas"] == 3
    (hub,) = dep["spec"]["template"]["spec"]["containers"]
    args = hub["args"]
    assert args[:5] == ["run", "--host", "0.0.0.0", "--port", "8443"]
    assert "--database-url" not in args  # from $HUB_DATABASE_URL: no password in argv
    env = {e["name"]: e for e in hub["env"]}
    assert env["HUB_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "cloud-hub-secrets"
    assert hub["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert hub["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert env["HUB_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    settings = one(docs, "ConfigMap", "cloud-hub-settings-")
    assert {"HUB_ARCHIVE_DIR", "HUB_ARTIFACT_DIR"} <= set(settings["data"])

    hpa = one(docs, "HorizontalPodAutoscaler", "cloud-hub")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert one(docs, "PodDisruptionBudget", "cloud-hub")["spec"]["minAvailable"] == 2

    pg = one(docs, "StatefulSet", "cloud-hub-postgres")
    (db,) = pg["spec"]["template"]["spec"]["containers"]
    assert db["image"].startswith("postgres:16.")
    assert pg["spec"]["volumeClaimTemplates"]
    headless = one(docs, "Service", "cloud-hub-postgres")
    assert headless["spec"]["clusterIP"] == "None"


#: connections kept free beside the hub's pools: the CLI (kubectl exec ... cloud-hub), pg_dump
#: backups, monitoring (README "Several hub replicas on one PostgreSQL")
PG_RESERVE = 20


def test_postgres_is_sized_for_the_hub_at_its_hpa_maximum(rendered: Render) -> None:
    """Every replica the HPA may run, plus the rolling update's surge pod, each with its pool
    at its limit, fits in PostgreSQL's max_connections with the superuser and ops reserve;
    the hub's worker threads follow its pool (the default: one per connection)."""
    docs = rendered("hub")
    hpa = one(docs, "HorizontalPodAutoscaler", "cloud-hub")
    dep = one(docs, "Deployment", "cloud-hub")
    surge = int(dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"])
    settings = one(docs, "ConfigMap", "cloud-hub-settings-")["data"]
    pool = int(settings["HUB_DB_POOL_SIZE"]) + int(settings["HUB_DB_MAX_OVERFLOW"])
    assert "HUB_WORKER_THREADS" not in settings  # = pool size + overflow
    (db,) = one(docs, "StatefulSet", "cloud-hub-postgres")["spec"]["template"]["spec"]["containers"]
    pg = dict(a.split("=", 1) for a in db["args"] if "=" in a)
    max_conn, superuser = int(pg["max_connections"]), int(pg["superuser_reserved_connections"])
    need = (hpa["spec"]["maxReplicas"] + surge) * pool
    assert need <= max_conn - superuser - PG_RESERVE, (need, max_conn)
    from cloud_hub.app import HubConfig

    defaults = HubConfig()
    assert (defaults.db_pool_size, defaults.db_max_overflow) == (
        int(settings["HUB_DB_POOL_SIZE"]),
        int(settings["HUB_DB_MAX_OVERFLOW"]),
    )


# ---------------------------------------------------------------------------------------
# the agent's configuration


@pytest.mark.parametrize("overlay", list(EDGE_OVERLAYS))
def test_configmap_holds_a_config_the_agent_accepts(
    rendered: Render, overlay: str, tmp_path: Path
) -> None:
    name, text = edge_config(rendered(overlay))
    assert name.startswith("edge-agent-config-"), "generated with a content hash"
    path = tmp_path / "edge-agent.toml"
    path.write_text(text)
    check_config(path)
    cfg = tomllib.loads(text)
    assert cfg["inference"]["device_ids"] == list(range(EDGE_OVERLAYS[overlay]))
    assert cfg["inference"]["device_ids"] == sorted(set(cfg["inference"]["device_ids"]))


def test_base_config_is_accepted() -> None:
    check_config(BASE_TOML)


@pytest.mark.parametrize("overlay", list(EDGE_OVERLAYS))
def test_overlay_config_differs_from_base_only_where_meant(overlay: str) -> None:
    base = flatten(tomllib.loads(BASE_TOML.read_text()))
    mine = flatten(tomllib.loads((K3S / "overlays" / overlay / "edge-agent.toml").read_text()))
    assert set(base) == set(mine)
    differ = {k for k in base if base[k] != mine[k]}
    assert differ <= OVERLAY_KEYS[overlay], f"unexpected differences: {sorted(differ)}"


@pytest.mark.parametrize("overlay", list(EDGE_OVERLAYS))
def test_config_paths_are_mounted(rendered: Render, overlay: str) -> None:
    docs = rendered(overlay)
    cfg = tomllib.loads(edge_config(docs)[1])
    spec = one(docs, "Deployment", "edge-agent")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (agent,) = spec["containers"]
    mounts = {m["mountPath"]: volumes[m["name"]] for m in agent["volumeMounts"]}
    st = cfg["storage"]
    for path in (st["data_dir"], st["hot_dir"], st["warm_dir"], st["cold_dir"]):
        assert "persistentVolumeClaim" in mounts[path], f"{path} is not on a volume"
    secrets = mounts["/etc/edge-agent/secrets"]["secret"]["secretName"]
    assert secrets == "edge-agent-secrets"
    for path in (cfg["lifecycle"]["cold_key_file"], cfg["sync"]["credential_file"]):
        assert str(Path(path).parent) == "/etc/edge-agent/secrets"
    assert "emptyDir" in mounts["/tmp"]
    assert cfg["web"]["port"] == 8080 and cfg["web"]["bind_address"] == "0.0.0.0"
    assert cfg["dicom"]["port"] == 11112
    # every allowed caller comes from a PACS range the NetworkPolicy admits
    (pol,) = find(docs, "NetworkPolicy")
    ingress = pol["spec"]["ingress"]
    cidrs = {p["ipBlock"]["cidr"] for r in ingress for p in r["from"] if "ipBlock" in p}
    for caller in cfg["dicom"]["allowed_callers"]:
        assert caller["host"] in cidrs, caller


def test_restore_job_puts_files_where_the_agent_reads_them(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((K3S / "jobs" / "restore-job.yaml").read_text()))
    cm = one(docs, "ConfigMap", "edge-agent-restore-config")
    path = tmp_path / "restore.toml"
    path.write_text(cm["data"]["restore.toml"])
    check_config(path)
    restore = tomllib.loads(path.read_text())
    base = tomllib.loads(BASE_TOML.read_text())
    for key in ("data_dir", "database", "hot_dir", "warm_dir", "cold_dir", "quarantine_dir"):
        assert restore["storage"][key] == base["storage"][key], key
    assert restore["inference"]["models_dir"] == base["inference"]["models_dir"]
    assert restore["sync"]["secret_file"] == base["sync"]["secret_file"]
    job = one(docs, "Job", "edge-agent-restore")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {
        m["mountPath"]: volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
        for m in c["volumeMounts"]
        if "persistentVolumeClaim" in volumes[m["name"]]
    }
    assert claims == {
        "/var/lib/edge-agent": "edge-agent-data",
        "/data/hot": "edge-agent-hot",
        "/data/warm": "edge-agent-warm",
        "/data/cold": "edge-agent-cold",
        "/backup": "edge-agent-backup",
    }
