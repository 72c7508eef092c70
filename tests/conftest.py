"""Shared fixtures: configs in temp folders, a running agent, DCMTK helpers, test files."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

# agents started by the tests serve their web UI on a free port (never a fixed 8080)
os.environ.setdefault("EDGE_WEB_PORT", "0")
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import settings
from pydicom.filereader import read_preamble

from edge_agent.clock import FakeClock
from edge_agent.config import (
    AllowedCaller,
    Config,
    DicomConfig,
    LifecycleConfig,
    StorageConfig,
    StudiesConfig,
)

# In CI the property tests replay the same examples every run (no flaky red); locally they
# explore new ones each run.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

TEST_FILES = Path(os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")))
DCMTK_TOOLS = ("storescu", "echoscu", "storescp")


def have_dcmtk() -> bool:
    return all(shutil.which(t) for t in DCMTK_TOOLS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if have_dcmtk():
        return
    if os.environ.get("REQUIRE_DCMTK") == "1":
        raise pytest.UsageError(
            "REQUIRE_DCMTK=1 but DCMTK (storescu/echoscu/storescp) is not on PATH"
        )
    skip = pytest.mark.skip(reason="DCMTK not installed (make test installs it)")
    for item in items:
        if "dcmtk" in item.keywords:
            item.add_marker(skip)


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config rooted in ``tmp_path``: port 0 (ephemeral), STORESCU/ECHOSCU/PYSCU allowed,
    no free-space floor, no disk-pressure watermarks (the tiers share the test machine's disk,
    whose usage is not the test's), short quiet period. ``sections`` override fields per
    section."""
    dicom = DicomConfig(
        ae_title="EDGE_TEST",
        bind_address="127.0.0.1",
        port=0,
        allowed_callers=(
            AllowedCaller(ae_title="STORESCU"),
            AllowedCaller(ae_title="ECHOSCU"),
            AllowedCaller(ae_title="PYSCU"),
        ),
        shutdown_grace_s=5.0,
    )
    storage = StorageConfig(data_dir=str(tmp_path / "data"), min_free_mb=0)
    studies = StudiesConfig(quiet_period_s=10.0, check_interval_s=0.1)
    # used <= 1.0 always, so no tier is ever "above its high watermark" unless a test says so
    unbounded = {
        f"{t}_{w}_watermark": v
        for t in ("hot", "warm", "cold")
        for w, v in (("high", 1.0), ("low", 0.99))
    }
    lifecycle = LifecycleConfig(**unbounded)
    cfg = Config(dicom=dicom, storage=storage, studies=studies, lifecycle=lifecycle)
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg


@pytest.fixture(scope="session")
def ref_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference model packages (built in code once per run), by model name."""
    from edge_agent.inference.reference_models import build_reference_packages

    return {
        r.name.rsplit("-", 1)[0]: r
        for r in build_reference_packages(tmp_path_factory.mktemp("ref"))
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app_factory(tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    """Build (and later close) EdgeApp instances with a started listener."""
    from edge_agent.app import EdgeApp

    apps: list[EdgeApp] = []

    def factory(cfg: Config | None = None, *, start: bool = True) -> EdgeApp:
        app = EdgeApp(cfg or make_config(tmp_path), clock=clock)
        if start:
            app.listener.start()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.listener.stop(grace_s=1.0)
        app.close()


def split_part10(data: bytes) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes) of a DICOM Part 10 file's bytes."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = pydicom.filereader._read_file_meta_info(fp)
    return str(meta.TransferSyntaxUID), data[fp.tell() :]


def dataset_sha(path: Path) -> str:
    return hashlib.sha256(split_part10(path.read_bytes())[1]).hexdigest()


def dciodvfy(path: Path | str) -> list[str]:
    """What dicom3tools' ``dciodvfy`` says about a DICOM file: its error and warning lines
    (none for a valid object). Skips without the tool, unless REQUIRE_DCMTK=1 (make test
    installs it), where its absence fails the test."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("REQUIRE_DCMTK") == "1":
            pytest.fail("REQUIRE_DCMTK=1 but dciodvfy (dicom3tools) is not on PATH")
        pytest.skip("dciodvfy not installed (make test installs dicom3tools)")
    r = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [
        line.strip()
        for line in (r.stdout + r.stderr).splitlines()
        if line.startswith(("Error", "Warning"))
    ]


def run_tool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def storescu(
    port: int,
    *files: Path | str,
    aet: str = "STORESCU",
    aec: str = "EDGE_TEST",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    return run_tool(
        "storescu", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)
    )


# Transfer syntax of a test file -> the storescu flag that makes it propose that syntax.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(cfg: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``edge-agent run`` as a child process, output appended to ``log``; ``env`` adds
    environment variables (``EDGE_*`` overrides)."""
    import sys

    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def wait_ready(port: int, ae_title: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the agent answers C-ECHO (fails with its log if it died or took > 30 s)."""
    import time

    deadline = time.monotonic() + 30
    while (
        run_tool("echoscu", "-aet", "ECHOSCU", "-aec", ae_title, "127.0.0.1", str(port)).returncode
        != 0
    ):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "agent did not come up:\n" + log.read_text()[-3000:]
        time.sleep(0.05)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true (the association audit row is written when the peer has
    closed the connection, a moment after the DCMTK tool exits)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def associations_closed(app: Any) -> bool:
    """At least one association was recorded and none is still open (audit rows are written
    by the store writer a moment after the peer sees its answer)."""
    rows = app.store.query("SELECT count(*), sum(outcome = 'open') FROM associations")
    return int(rows[0][0]) > 0 and not rows[0][1]


@dataclass(frozen=True)
class PostgresServer:
    """The session's PostgreSQL server: its URL, and ``restart()`` (``pg_ctl restart``: every
    session is cut, the server is back when it returns)."""

    url: str
    ctl: tuple[str, ...]

    def restart(self) -> None:
        subprocess.run([*self.ctl, "-w", "-m", "fast", "restart"], capture_output=True, check=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (initdb + pg_ctl as the postgres user).
    Skips with the reason if none can be started here."""
    import glob
    import time

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (make test installs it)")
    bindir = bins[-1]
    import tempfile

    # not under pytest's tmp dir: that is private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="edge-test-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_pg: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    init = subprocess.run(
        [*as_pg, f"{bindir}/initdb", "-D", str(data), "--auth=trust", "-U", "postgres"],
        capture_output=True,
        text=True,
        check=False,
    )
    if init.returncode != 0:
        pytest.skip(f"cannot initdb a PostgreSQL cluster: {init.stderr.strip()[:300]}")
    start = subprocess.run(
        [
            *as_pg,
            f"{bindir}/pg_ctl",
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if start.returncode != 0:
        pytest.skip(f"cannot start PostgreSQL: {start.stderr.strip()[:300]}")
    try:
        deadline = time.monotonic() + 30
        while (
            subprocess.run(
                [f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
                check=False,
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, "PostgreSQL did not become ready"
            time.sleep(0.2)
        yield PostgresServer(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
            (*as_pg, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log")),
        )
    finally:
        subprocess.run(
            [*as_pg, f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"],
            capture_output=True,
            check=False,
        )


def fresh_database(postgres_url: str) -> str:
    """A new, empty database on the session's PostgreSQL server; its SQLAlchemy URL."""
    import uuid

    import psycopg

    name = f"hub_{uuid.uuid4().hex[:12]}"
    dsn = postgres_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The hub's database, once on SQLite (the embedded default) and once on a fresh
    database of the real PostgreSQL server (production): every hub test runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return fresh_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server (a real HTTP S3 API) with a bucket "releases"; the hub's and boto3's
    environment points at it."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "hub")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hub-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HUB_S3_ENDPOINT_URL", url)
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="releases")
    try:
        yield url
    finally:
        server.stop()


def start_hub(
    db: Path, port: int, log: Path, artifact_dir: Path | None = None
) -> subprocess.Popen[bytes]:
    """``cloud-hub run`` on SQLite ``db`` as a child process; waits for /healthz."""
    from examples.demo import start_hub as start

    return start(db, port, log, artifact_dir)


def start_replica(
    db: str, port: int, tmp: Path, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """One hub replica (``cloud-hub run``) on database URL ``db`` and ``port``, with its
    blob folders under ``tmp``; output appended to ``log`` (discarded without one). Does
    not wait for it to answer."""
    import sys

    cmd = [
        sys.executable,
        "-m",
        "cloud_hub",
        "run",
        "--database-url",
        db,
        "--port",
        str(port),
        "--artifact-dir",
        str(tmp / "artifacts"),
        "--archive-dir",
        str(tmp / "archive"),
    ]
    if log is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for "localhost" and 127.0.0.1, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class ReleaseRig:
    """A signed release published at a running hub, and an enrolled agent folder whose
    config pins the ops key and polls the hub every second (the agent is not started)."""

    release: Any
    hub: subprocess.Popen[bytes]
    hub_store: Any
    cred: Any
    cfg: Path
    root: Path
    port: int
    key_id: str


def release_rig(tmp_path: Path, package: Path, ae_title: str) -> ReleaseRig:
    import asyncio

    from cloud_hub.ops import add_signature, keygen, load_private, make_release
    from cloud_hub.store import HubStore, connect
    from edge_agent.cli import main as cli
    from edge_agent.sync.client import enroll

    kid = keygen(tmp_path / "ops.key", b"correct horse battery")
    rel, archive, doc = make_release(package, tmp_path / "rel")
    add_signature(doc, load_private(tmp_path / "ops.key", b"correct horse battery"))
    hub_db, hub_port = tmp_path / "hub.db", free_port()
    hub_store = HubStore(connect(f"sqlite:///{hub_db}"))
    hub_store.publish(doc.read_bytes(), archive.read_bytes(), tmp_path / "artifacts")
    token = hub_store.create_enrollment_token(ae_title)
    hub = start_hub(hub_db, hub_port, tmp_path / "hub.log", artifact_dir=tmp_path / "artifacts")
    port, root = free_port(), tmp_path / "agent"
    assert (
        cli(
            [
                "init",
                str(root),
                "--port",
                str(port),
                "--bind-address",
                "127.0.0.1",
                "--ae-title",
                ae_title,
                "--min-free-mb",
                "0",
            ]
        )
        == 0
    )
    cfg = root / "edge-agent.toml"
    text = cfg.read_text().replace(
        "trusted_keys = []", f'trusted_keys = ["{tmp_path / "ops.key.pub"}"]'
    )
    cfg.write_text(text.replace("heartbeat_interval_s = 60.0", "heartbeat_interval_s = 1.0"))
    cred = asyncio.run(enroll(f"http://127.0.0.1:{hub_port}", token))
    cred.save(root / "data" / "sync-credential.json")
    return ReleaseRig(rel, hub, hub_store, cred, cfg, root, port, kid)
