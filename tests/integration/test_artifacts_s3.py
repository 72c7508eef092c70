"""The hub's artifact store on an S3-compatible bucket: publish writes the archive there, the
hub serves it with HTTP Range, and an edge's interrupted download resumes from it.

The bucket is moto's S3 server (a real HTTP S3 API implementation from PyPI: no MinIO or
Ceph can be installed here); the hub, the edge updater and boto3 talk to it over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.app import HubConfig, create_app
from cloud_hub.artifacts import FolderArtifacts, S3Artifacts, parse_range
from cloud_hub.ops import make_release
from cloud_hub.store import HubStore, connect
from edge_agent.clock import FakeClock
from edge_agent.inference.reference_models import SEG_NAME, build_reference_packages
from edge_agent.inference.registry import Registry
from edge_agent.store import Store
from edge_agent.sync.client import Credential, HttpHubClient
from edge_agent.sync.model_updates import ModelUpdater
from edge_agent.sync.uplink import Uplink
from hub_protocol.releases import envelope, key_id, sign

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


def test_parse_range() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-", 100) == (0, 100)
    assert parse_range("bytes=10-19", 100) == (10, 20)
    assert parse_range("bytes=90-500", 100) == (90, 100)
    assert parse_range("bytes=-30", 100) == (70, 100)
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0", "bytes=0-1,5-6", "items=0-1", "bytes=-"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


def test_folder_and_bucket_refuse_bytes_that_do_not_match_their_name(
    tmp_path: Path, s3_endpoint: str
) -> None:
    data = b"archive bytes"
    wrong = hashlib.sha256(b"other").hexdigest()
    for store in (FolderArtifacts(tmp_path / "a"), S3Artifacts("releases", "x")):
        with pytest.raises(ValueError, match="do not match"):
            store.put(wrong, data)
        with pytest.raises(ValueError, match="not a SHA-256"):
            store.size("../etc/passwd")
        sha = hashlib.sha256(data).hexdigest()
        assert store.size(sha) is None
        store.put(sha, data)
        store.put(sha, data)  # idempotent
        assert store.size(sha) == len(data)
        assert b"".join(store.read(sha, 3, 8)) == data[3:8]


def test_hub_on_s3_serves_ranges_and_an_edge_resumes_from_it(
    tmp_path: Path, s3_endpoint: str
) -> None:
    ops = Ed25519PrivateKey.generate()
    base = next(
        r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME)
    )
    hub_db = f"sqlite:///{tmp_path / 'hub.db'}"
    hub_store = HubStore(connect(hub_db))
    rel, archive, _ = make_release(base, tmp_path / "out", now=1_800_000_000.0)
    location = "s3://releases/prod/models"
    hub_store.publish(envelope(rel, [sign(rel, ops)]), archive.read_bytes(), location)
    full = archive.read_bytes()
    # it is in the bucket, under the prefix, with its hash as name
    obj = boto3.client("s3", endpoint_url=s3_endpoint).get_object(
        Bucket="releases", Key=f"prod/models/{rel.archive_sha256}"
    )
    assert obj["Body"].read() == full
    assert not (tmp_path / "artifacts").exists()

    async def go() -> None:
        app = create_app(HubConfig(database_url=hub_db, artifact_dir=location), store=hub_store)
        async with TestClient(TestServer(app)) as client:
            token = hub_store.create_enrollment_token("edge")
            body = await (await client.post("/v1/enroll", json={"token": token})).json()
            auth = {"Authorization": f"Bearer {body['credential']}"}
            path = f"/v1/artifacts/{rel.archive_sha256}"
            whole = await client.get(path, headers=auth)
            assert whole.status == 200 and await whole.read() == full
            part = await client.get(path, headers={**auth, "Range": "bytes=100-199"})
            assert part.status == 206 and await part.read() == full[100:200]
            assert part.headers["Content-Range"] == f"bytes 100-199/{len(full)}"
            tail = await client.get(path, headers={**auth, "Range": "bytes=-10"})
            assert await tail.read() == full[-10:]
            bad = await client.get(path, headers={**auth, "Range": f"bytes={len(full)}-"})
            assert bad.status == 416 and bad.headers["Content-Range"] == f"bytes */{len(full)}"
            assert (await bad.json())["error"]["code"] == "range_not_satisfiable"
            missing = await client.get("/v1/artifacts/" + "0" * 64, headers=auth)
            assert missing.status == 404
            unauth = await client.get(path)
            assert unauth.status == 401
            # an edge with half the archive already resumes from the bucket through the hub
            cred = Credential(
                str(client.make_url("")).rstrip("/"), body["site_id"], body["credential"]
            )
            store = Store(tmp_path / "edge.db")
            hub = HttpHubClient(cred)
            clock = FakeClock(1_800_000_060.0)
            registry = Registry(store=store, models_dir=tmp_path / "models", clock=clock)
            updater = ModelUpdater(
                store=store,
                registry=registry,
                source=hub,
                trusted={key_id(ops.public_key()): ops.public_key()},
                threshold=1,
                staging=tmp_path / "staging",
                clock=clock,
            )
            try:
                (tmp_path / "staging").mkdir()
                (tmp_path / "staging" / f"{rel.archive_sha256}.part").write_bytes(
                    full[: len(full) // 3]
                )
                hub_store.assign(rel.name, rel.version, [body["site_id"]])
                await Uplink(hub, store=store, clock=clock).pull()
                (decision,) = await updater.check()
                assert decision.status == "accepted", decision
                assert hub.last_download_status == 206
                assert [m.version for m in registry.active()] == [rel.version]
            finally:
                await hub.close()
                store.close()

    asyncio.run(go())
