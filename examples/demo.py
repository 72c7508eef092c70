"""The demo behind ``make demo``: the whole ingest path end to end on a default config.

Run it with ``python examples/demo.py [--dir DIR] [--serve]`` from the project's virtualenv.

It makes a scratch folder, writes a config, generates synthetic sample studies, starts the
agent as a child process, sends the studies with DCMTK's ``storescu`` (plus two compressed
files from pydicom's test set and one intruder with an unknown AE title), waits for the
studies to complete, prints what the agent holds, shows sync with a hub (and a WAN outage),
then central ops publishing a signed model version (shadow, staged rollout, a refused
release), and stops the agent with SIGTERM.

It calls the same functions the ``edge-agent`` commands end in (``edge_agent.cli.*``) and the
composition root's factories (``edge_agent.compose``); only the agent and the hub run as
child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_agent import cli, compose
from edge_agent.cli import ingest, models, results, setup, storage, studies, sync
from edge_agent.config import Config, load_config
from edge_agent.inference.reference_models import build_reference_packages
from edge_agent.samples import make_study
from edge_agent.sync.client import enroll

QUIET_PERIOD_S = 3.0
HEARTBEAT_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")
    print("    $ " + " ".join(args[:8]) + (" ..." if len(args) > 8 else ""), flush=True)
    return subprocess.run(list(args), capture_output=True, text=True, env=env, check=False)


def _storescu(
    port: int, *files: object, aet: str = "STORESCU", options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu to the demo agent."""
    return _tool(
        "storescu",
        *options,
        "-aet",
        aet,
        "-aec",
        "EDGE_DEMO",
        "127.0.0.1",
        str(port),
        *map(str, files),
    )


def _wait_settled(db: Path, timeout: float = 120.0) -> None:
    """Until no study is RECEIVING, COMPLETE or INFERRING (read-only look at the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (busy,) = conn.execute(
                "SELECT count(*) FROM studies WHERE state IN ('RECEIVING', 'COMPLETE', 'INFERRING')"
            ).fetchone()
        finally:
            conn.close()
        if busy == 0:
            return
        time.sleep(0.3)
    print("    (gave up waiting; showing what there is)")


def start_hub(
    db: Path, port: int, log: Path, artifact_dir: Path | None = None, *, ops_token: str = ""
) -> subprocess.Popen[bytes]:
    """``cloud-hub run`` on SQLite ``db`` as a child process (output appended to ``log``),
    with ``ops_token`` for its fleet page; returns once /healthz answers. Raises RuntimeError
    if it exits or takes over 30 s."""
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud_hub",
                "run",
                "--database-url",
                f"sqlite:///{db}",
                "--port",
                str(port),
                "--artifact-dir",
                str(artifact_dir or db.parent / "artifacts"),
                "--archive-dir",
                str(db.parent / "archive"),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, HUB_OPS_TOKEN=ops_token) if ops_token else None,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the hub did not start; see {log}:\n{log.read_text()[-2000:]}")


def _hub_result_keys(credential_file: Path) -> list[str]:
    cred = json.loads(credential_file.read_text())
    url = f"{cred['hub_url']}/v1/results"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) hub URL: {url}")
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, headers={"Authorization": f"Bearer {cred['credential']}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own hub URL
        return [r["key"] for r in json.loads(resp.read())["results"]]


def _wait_synced(db: Path, timeout: float = 60.0) -> None:
    """Until the outbox has nothing pending (read-only look at the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (n,) = conn.execute("SELECT count(*) FROM outbox WHERE state = 'PENDING'").fetchone()
        finally:
            conn.close()
        if n == 0:
            return
        time.sleep(0.3)


def _all_sent(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (n,) = conn.execute("SELECT count(*) FROM forwards WHERE state = 'PENDING'").fetchone()
        (total,) = conn.execute("SELECT count(*) FROM forwards").fetchone()
    finally:
        conn.close()
    return bool(total) and n == 0


def _send_truncated(port: int, source: Path, workdir: Path) -> tuple[int, str]:
    """Send ``source`` with its last 1000 bytes cut off, as raw bytes (storescu refuses to
    send a damaged file, a buggy modality would not). Returns (status, error comment)."""
    from pynetdicom import AE
    from pynetdicom import _config as pynetdicom_config

    bad = workdir / "samples" / "truncated.dcm"
    bad.write_bytes(source.read_bytes()[:-1000])
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])  # MR
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_DEMO")
    if not assoc.is_established:
        return 0xFFFF, "association failed"
    try:
        rsp = assoc.send_c_store(bad)
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


class Ops:
    """Central ops at their desk: ``cloud-hub`` commands against the demo hub's database."""

    def __init__(self, workdir: Path, hub_db: Path) -> None:
        self.workdir, self.db = workdir, hub_db
        self.key = workdir / "ops" / "ops1.key"
        self.key.parent.mkdir(parents=True, exist_ok=True)
        # a fresh random passphrase per demo run (ops type theirs, or use a secret store)
        self.env = dict(os.environ, HUB_KEY_PASSPHRASE=secrets.token_urlsafe(24))

    def hub(self, *args: str, show: bool = True) -> str:
        cmd = [sys.executable, "-m", "cloud_hub", *args]
        if args[0] in ("models", "sites") and args[1] not in ("keygen", "release", "sign"):
            cmd += ["--database-url", f"sqlite:///{self.db}"]
        if show:
            print(
                "    $ cloud-hub " + " ".join(a.replace(str(self.workdir) + "/", "") for a in args)
            )
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, check=False)
        out = (r.stdout + r.stderr).strip()
        if show and out:
            print("      " + out.replace("\n", "\n      "))
        if r.returncode != 0:
            raise RuntimeError(f"cloud-hub {' '.join(args)} failed: {out}")
        return out

    def release(self, source: Path, version: str, *, key: Path | None = None) -> None:
        """Copy ``source`` as ``version``, package, sign and publish it."""
        from hub_protocol.package import write_manifest_files

        pkg = self.workdir / "ops" / f"{source.name.rsplit('-', 1)[0]}-{version}"
        shutil.copytree(source, pkg)
        manifest = json.loads((pkg / "manifest.json").read_text())
        manifest["version"] = version
        write_manifest_files(pkg, manifest)
        out = self.workdir / "ops" / "releases"
        self.hub("models", "release", str(pkg), "--out", str(out), "--expires-days", "180")
        base = out / f"{manifest['name']}-{version}"
        doc, tar = f"{base}.release.json", f"{base}.tar"
        self.hub("models", "sign", doc, "--key", str(key or self.key))
        self.hub("models", "publish", doc, tar, "--artifact-dir", str(self.workdir / "artifacts"))


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    print(f"    (gave up waiting for {what})")
    return False


def _model_state(db: Path, name: str) -> dict[str, str]:
    """version -> 'active' | 'shadow' | 'installed' in the agent's store."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT version, active, shadow FROM model_versions WHERE name = ?", (name,)
        ).fetchall()
    finally:
        conn.close()
    return {v: "active" if a else "shadow" if sh else "installed" for v, a, sh in rows}


def _load(path: Path) -> Config:
    """The demo agent's config as the commands read it (the file and EDGE_* overrides)."""
    return load_config(path)


def _model_rollout(ops: Ops, workdir: Path, cfg: Path, port: int, samples: Path) -> None:
    """Ops publish ct-lesion-seg 1.1.0: shadow first, then a staged rollout; then a release
    signed by a key the site does not trust is refused."""
    from edge_agent.inference.reference_models import SEG_NAME
    from edge_agent.sync.client import Credential

    db = workdir / "data" / "edge.db"
    site = Credential.load(workdir / "data" / "sync-credential.json").site_id
    source = next((workdir / "model-packages").glob(f"{SEG_NAME}-*"))

    _step(f"ops publish {SEG_NAME} 1.1.0: package, sign (Ed25519), publish to the hub")
    ops.release(source, "1.1.0")

    _step("shadow mode: 1.1.0 runs beside 1.0.0 on live studies and publishes nothing")
    ops.hub("models", "assign", SEG_NAME, "1.1.0", "--site", site, "--shadow")
    _wait_for("the shadow", lambda: _model_state(db, SEG_NAME).get("1.1.0") == "shadow")
    ct = make_study(
        samples / "ct-shadow",
        modality="CT",
        slices=8,
        size=256,
        seed="demo-ct-shadow",
        patient_id="DEMO-CT-3",
        patient_name="DEMO^CT^THREE",
    )
    r = _storescu(port, *ct.files)
    print(f"    a new CT study: storescu exit {r.returncode}")
    _wait_settled(db)
    _wait_for(
        "the agreement report",
        lambda: "over 1 series" in ops.hub("models", "status", SEG_NAME, show=False),
    )
    ops.hub("models", "status", SEG_NAME)
    models.show(_load(cfg))

    _step("staged rollout: canary (this site) -> percentage -> every site")
    ops.hub("models", "rollout", "start", SEG_NAME, "1.1.0", "--canary", site, "--percent", "50")
    _wait_for("activation", lambda: _model_state(db, SEG_NAME).get("1.1.0") == "active")
    _wait_for(
        "the install report",
        lambda: " active " in ops.hub("models", "status", SEG_NAME, show=False),
    )
    ops.hub("models", "rollout", "advance", SEG_NAME, "1.1.0")
    ops.hub("models", "rollout", "advance", SEG_NAME, "1.1.0")
    ops.hub("models", "status", SEG_NAME)
    models.show(_load(cfg))

    _step("a release signed by a key this site does not trust: refused, 1.1.0 stays active")
    rogue = workdir / "ops" / "rogue.key"
    ops.hub("models", "keygen", str(rogue))
    ops.release(source, "1.2.0", key=rogue)
    ops.hub("models", "assign", SEG_NAME, "1.2.0", "--site", site)
    _wait_for(
        "the refusal",
        lambda: "refused" in ops.hub("models", "status", SEG_NAME, show=False),
    )
    models.history(_load(cfg), SEG_NAME)
    state = _model_state(db, SEG_NAME)
    print("    active now: " + ", ".join(f"{v} {s}" for v, s in sorted(state.items())))


def _show_web(port: int, user: str, password: str) -> None:
    import http.cookiejar
    import urllib.parse

    base = f"http://127.0.0.1:{port}"
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=10) as r:  # noqa: S310 - http://127.0.0.1
            print(f"    GET {path}: {r.status} {r.read().decode()}")
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    opener.open(base + "/login", data=form, timeout=10).read()
    with opener.open(base + "/api/v1/studies?limit=5", timeout=10) as r:
        body = json.loads(r.read())
    shown = body["studies"][:5]
    print(
        f"    GET /api/v1/studies as {user}: {body['total']} studies; "
        f"the newest {len(shown)} of them:"
    )
    for st in shown:
        flag = " CRITICAL" if st["critical"] else ""
        print(
            f"      {st['patient_name']:<16} {st['modality']:<3} {st['state']:<8} "
            f"{st['ai_status']}{flag}"
        )


def _show_fleet(hub_url: str, ops_token: str) -> None:
    """The hub's fleet page as ops open it (HTTP Basic, the ops token as password)."""
    import base64

    if not hub_url.startswith("http://127.0.0.1:"):
        raise ValueError(f"not the demo hub: {hub_url}")
    auth = base64.b64encode(f"ops:{ops_token}".encode()).decode()
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        f"{hub_url}/fleet", headers={"Authorization": f"Basic {auth}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - the demo's own hub
        page = r.read().decode()
    title = page.split("<h1>", 1)[1].split("</h1>", 1)[0] if "<h1>" in page else "?"
    print(f"    GET {hub_url}/fleet as ops: {r.status}, {title}")


def run_demo(workdir: Path, *, serve: bool = False) -> int:
    """Run the demo in ``workdir`` (recreated). ``serve``: leave the agent, hub and web UI
    running at the end until Ctrl-C. Returns the exit code."""
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(
                f"demo: {tool} not found; install DCMTK (make demo does)",
                file=sys.stderr,
            )
            return 1
    if workdir.exists():
        shutil.rmtree(workdir)
    port = _free_port()
    _step(f"writing a default config in {workdir}")
    setup.init(
        workdir,
        port=port,
        ae_title="EDGE_DEMO",
        bind_address="127.0.0.1",
        quiet_period_s=QUIET_PERIOD_S,
        min_free_mb=64,
    )
    cfg = workdir / cli.CONFIG_NAME

    _step("building the reference models in code and installing them")
    for root in build_reference_packages(workdir / "model-packages"):
        models.install(_load(cfg), root)

    _step("generating synthetic sample studies")
    samples = workdir / "samples"
    ct = make_study(
        samples / "ct",
        modality="CT",
        slices=40,
        size=512,
        seed="demo-ct",
        patient_id="DEMO-CT-1",
        patient_name="DEMO^CT",
    )
    mr = make_study(
        samples / "mr",
        modality="MR",
        slices=24,
        size=64,
        seed="demo-mr",
        patient_id="DEMO-MR-1",
        patient_name="DEMO^MR",
    )
    print(f"    CT: {len(ct.files)} slices 512x512; MR: {len(mr.files)} slices 64x64")

    pacs_port, pacs_dir = _free_port(), workdir / "pacs"
    pacs_dir.mkdir()
    _step(f"starting a stand-in PACS (DCMTK storescp, AE PACS, port {pacs_port}) for results")
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+xa", "-dhl", "-od", str(pacs_dir), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    hub_port, hub_db = _free_port(), workdir / "hub.db"
    hub_url = f"http://127.0.0.1:{hub_port}"
    _step(f"starting the cloud hub (cloud-hub run, SQLite, {hub_url}) and enrolling this site")
    ops_token = secrets.token_urlsafe(16)
    hub = start_hub(hub_db, hub_port, workdir / "hub.log", ops_token=ops_token)
    token = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud_hub",
            "sites",
            "enroll",
            "Demo hospital",
            "--database-url",
            f"sqlite:///{hub_db}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    config = _load(cfg)
    credential = asyncio.run(enroll(hub_url, token, ca_file=config.sync.hub_ca_file))
    credential.save(config.sync.credential_path(config.storage.data_dir))
    print(f"enrolled as {credential.site_id} with {credential.hub_url}")

    ops = Ops(workdir, hub_db)
    _step("central ops make their release signing key; this site pins its public half")
    ops.hub("models", "keygen", str(ops.key))
    text = cfg.read_text()
    cfg.write_text(text.replace("trusted_keys = []", f'trusted_keys = ["{ops.key}.pub"]'))
    print(f"    sync.trusted_keys = [{ops.key.name}.pub] in {cfg.name}")

    _step("starting the agent (results go to PACS@127.0.0.1, set by EDGE_RESULTS_DESTINATIONS)")
    log_path = workdir / "agent.log"
    web_port = _free_port()
    env = dict(
        os.environ,
        EDGE_RESULTS_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}",
        EDGE_SYNC_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_S),  # the demo's hub answers fast
        EDGE_WEB_PORT=str(web_port),
        EDGE_WEB_BIND_ADDRESS="127.0.0.1",
    )
    _step("web accounts: a radiologist and an admin for the UI (random passwords)")
    logins = {}
    config = _load(cfg)
    store = compose.open_store(config)
    try:
        accounts = compose.accounts(config, store)
        for user, role in (("radiologist", "radiologist"), ("admin", "admin")):
            logins[user] = secrets.token_urlsafe(12)
            added = accounts.add_user(user, role, logins[user], now=time.time())
            print(f"added {added.username} ({added.role})")
    finally:
        store.close()
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            echo = subprocess.run(
                ["echoscu", "-aet", "ECHOSCU", "-aec", "EDGE_DEMO", "127.0.0.1", str(port)],
                capture_output=True,
                check=False,
            )
            if echo.returncode == 0:
                break
            if agent.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(), file=sys.stderr)
                print("demo: the agent did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"    agent up: AE EDGE_DEMO on 127.0.0.1:{port}; C-ECHO ok (log: {log_path})")
        print(
            f"    web UI: http://127.0.0.1:{web_port}/ (radiologist / {logins['radiologist']}); "
            f"fleet: {hub_url}/fleet (any user name / {ops_token}); both stop at the end of "
            "the demo unless it runs with --serve"
        )

        _step("sending the CT and MR studies with storescu")
        for study in (ct, mr):
            r = _storescu(port, *study.files)
            print(f"    {study.modality}: storescu exit {r.returncode}")

        _step("sending compressed instances (JPEG-LS lossless, JPEG 2000) from pydicom's test set")
        import pydicom.data

        for name, flag in (("MR_small_jpeg_ls_lossless.dcm", "-xt"), ("JPEG2000.dcm", "-xw")):
            r = _storescu(port, pydicom.data.get_testdata_file(name), options=("-R", flag))
            print(f"    {name}: storescu exit {r.returncode}")

        _step("an unknown modality (AE title INTRUDER) tries to send: rejected")
        r = _storescu(port, mr.files[0], aet="INTRUDER")
        print("    " + (r.stderr.strip().splitlines() or ["(no output)"])[-1])

        _step(
            f"waiting for the studies to complete (quiet period {QUIET_PERIOD_S:g} s) "
            "and for the models to run"
        )
        _wait_settled(workdir / "data" / "edge.db")
        _step("edge-agent studies")
        studies.show(_load(cfg))
        _step(
            "edge-agent results (reference models, not for clinical use: a CT lesion "
            "segmentation and a 2D classifier on synthetic images)"
        )
        results.show(_load(cfg))

        _step(
            "results sent to PACS as DICOM SEG, Comprehensive SR and Key Object Selection "
            "(edge-agent forwards)"
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _all_sent(workdir / "data" / "edge.db"):
            time.sleep(0.3)
        results.forwards(_load(cfg))
        # storescp names files by SOP class: SG.<uid> for SEG, SRc.<uid> for Comprehensive SR,
        # KO.<uid> for a Key Object Selection
        kinds = {"SG": "SEG", "SR": "SR", "KO": "KOS"}
        received = sorted(kinds.get(p.name[:2], p.name[:2]) for p in pacs_dir.iterdir())
        print(
            f"    PACS received {len(received)} object(s): "
            + ", ".join(f"{received.count(k)} x {k}" for k in sorted(set(received)))
        )

        _step("results at the hub (GET /v1/results with this site's credential)")
        _wait_synced(workdir / "data" / "edge.db")
        keys = _hub_result_keys(workdir / "data" / "sync-credential.json")
        print(f"    the hub holds {len(keys)} result(s) of this site")

        _step("the WAN goes down: the hub stops; a new MR study arrives meanwhile")
        hub.terminate()
        hub.wait(30)
        mr2 = make_study(
            samples / "mr2",
            modality="MR",
            slices=12,
            size=64,
            seed="demo-mr2",
            patient_id="DEMO-MR-2",
            patient_name="DEMO^MR^TWO",
        )
        r = _storescu(port, *mr2.files)
        print(f"    storescu exit {r.returncode}")
        _wait_settled(workdir / "data" / "edge.db")
        time.sleep(1.0)
        sync.status(_load(cfg))

        _step("the hub comes back: the backlog drains, nothing lost, nothing twice")
        hub = start_hub(hub_db, hub_port, workdir / "hub.log", ops_token=ops_token)
        _wait_synced(workdir / "data" / "edge.db")
        after = _hub_result_keys(workdir / "data" / "sync-credential.json")
        print(
            f"    the hub now holds {len(after)} result(s) ({len(set(after))} distinct), "
            f"{len(set(after) - set(keys))} new"
        )
        sync.status(_load(cfg))

        _step("a late CT slice arrives after the study completed: the study re-opens")
        late = make_study(
            samples / "ct-late",
            modality="CT",
            slices=len(ct.files) + 1,
            size=512,
            seed="demo-ct",
            patient_id="DEMO-CT-1",
            patient_name="DEMO^CT",
        )
        r = _storescu(port, late.files[-1])
        print(f"    storescu exit {r.returncode}")
        studies.show(_load(cfg), state="RECEIVING")
        _wait_settled(workdir / "data" / "edge.db")
        print("    ... complete again; the new results supersede the old ones (never overwrite):")
        results.show(_load(cfg), study_uid=ct.study_uid, include_superseded=True)

        _step("a truncated instance is refused with 0xC000 and kept in quarantine")
        status, comment = _send_truncated(port, mr.files[0], workdir)
        print(f"    C-STORE status 0x{status:04X}: {comment}")
        ingest.quarantine(_load(cfg))

        _step("edge-agent associations (audit trail)")
        ingest.associations(_load(cfg), limit=10)

        _model_rollout(ops, workdir, cfg, port, samples)

        _step("edge-agent storage status (tiers; studies age hot -> warm -> cold -> hub archive)")
        storage.status(_load(cfg))

        _step("the web UI answers: /healthz, /readyz, and the worklist API as the radiologist")
        _show_web(web_port, "radiologist", logins["radiologist"])
        _show_fleet(hub_url, ops_token)
        if serve:
            _step("serving until Ctrl-C")
            print(f"    web UI   http://127.0.0.1:{web_port}/")
            for user, pw in logins.items():
                print(f"             {user} / {pw}")
            print(f"    DICOM    AE EDGE_DEMO at 127.0.0.1:{port} (storescu -aet STORESCU ...)")
            print(f"    fleet    {hub_url}/fleet   (any user name / {ops_token})")
            with contextlib.suppress(KeyboardInterrupt):
                while agent.poll() is None:
                    time.sleep(1)
    finally:
        _step("stopping the agent with SIGTERM")
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = agent.wait()
        print(f"    agent exited with {code}")
        pacs.terminate()
        pacs.wait(10)
        hub.terminate()
        hub.wait(30)
    print(f"\nDone. Config: {cfg}\nData: {workdir / 'data'}\nAgent log (JSON): {log_path}")
    if not serve:
        print(
            "The agent, hub and web UI have stopped (the links above no longer answer); "
            "`make demo DEMO_ARGS=--serve` keeps them up until Ctrl-C."
        )
    return 0 if code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """``python examples/demo.py [--dir DIR] [--serve]``; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="demo",
        description="run the end-to-end demo: agent + sample studies sent with storescu",
    )
    p.add_argument("--dir", type=Path, default=Path("demo-run"), help="scratch folder (recreated)")
    p.add_argument(
        "--serve", action="store_true", help="keep the agent, hub and web UI running at the end"
    )
    args = p.parse_args(argv)
    return run_demo(args.dir.resolve(), serve=args.serve)


if __name__ == "__main__":
    sys.exit(main())
