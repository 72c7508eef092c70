"""A real PACS: Debian's Orthanc pushes a study to the agent (C-STORE, as a PACS's routing
rule would) and gets the results back into the same study, which its REST API then lists
with their series descriptions. The one place the whole round trip runs against a PACS
that is not ours nor DCMTK's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from edge_agent.config import AllowedCaller, Destination
from edge_agent.inference.reference_models import SEG_NAME
from edge_agent.samples import make_study
from tests.conftest import dciodvfy, free_port, make_config, run_tool


@dataclass
class Orthanc:
    http: str  # base URL of its REST API
    dicom_port: int
    aet: str = "ORTHANC"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(
            self.http + path, data=body, headers={"Content-Type": content_type}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def put(self, path: str, value: Any) -> None:
        req = urllib.request.Request(
            self.http + path, data=json.dumps(value).encode(), method="PUT"
        )
        with urllib.request.urlopen(req, timeout=30):
            pass


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Debian's Orthanc on free ports, its own storage, no plugins, no authentication (bound
    to loopback). Skips without it, unless REQUIRE_DCMTK=1 (make test installs it)."""
    exe = shutil.which("Orthanc")
    if exe is None:
        if os.environ.get("REQUIRE_DCMTK") == "1":
            pytest.fail("REQUIRE_DCMTK=1 but Orthanc is not installed (make test installs it)")
        pytest.skip("Orthanc not installed (make test installs the Debian package)")
    root = tmp_path / "orthanc"
    root.mkdir()
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "test-pacs",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "Plugins": [],
        "DicomModalities": {},
        "DicomModalitiesInDatabase": True,  # the agent is declared over REST below
        "StableAge": 1,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "log.txt").open("w")
    proc = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=log, stderr=log)
    pacs = Orthanc(http=f"http://127.0.0.1:{http_port}", dicom_port=dicom_port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                pacs.get("/system")
                break
            except OSError:
                assert proc.poll() is None, (root / "log.txt").read_text()[-2000:]
                assert time.monotonic() < deadline, "Orthanc did not come up"
                time.sleep(0.2)
        yield pacs
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _jpeg_ls(files: list[Path], out: Path) -> list[Path]:
    """The same images, JPEG-LS lossless (DCMTK's dcmcjpls), as a modality might send."""
    out.mkdir()
    done = []
    for f in files:
        dest = out / f.name
        r = run_tool("dcmcjpls", str(f), str(dest))
        assert r.returncode == 0, r.stderr
        done.append(dest)
    return done


@pytest.mark.dcmtk
@pytest.mark.parametrize("syntax", ["explicit-le", "jpeg-ls"])
def test_a_study_pushed_by_orthanc_gets_seg_sr_and_kos_back_in_the_same_study(
    app_factory: Any,
    tmp_path: Path,
    clock: Any,
    ref_models: dict[str, Path],
    orthanc: Orthanc,
    syntax: str,
) -> None:
    study = make_study(tmp_path / "ct", modality="CT", slices=6, size=128, seed="orthanc")
    files = study.files if syntax == "explicit-le" else _jpeg_ls(study.files, tmp_path / "ls")
    if syntax == "jpeg-ls":
        assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    cfg = make_config(
        tmp_path,
        dicom={"allowed_callers": (AllowedCaller(ae_title="ORTHANC", host="127.0.0.1/32"),)},
        results={
            "destinations": (
                Destination(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port),
            ),
        },
    )
    app = app_factory(cfg)
    app.registry.install(ref_models[SEG_NAME])
    # the study is in the PACS first, as it would be after the modality sent it there
    for f in files:
        orthanc.post("/instances", f.read_bytes(), "application/dicom")
    (orthanc_study,) = orthanc.get("/studies")
    orthanc.put(
        "/modalities/edge", {"AET": "EDGE_TEST", "Host": "127.0.0.1", "Port": app.listener.port}
    )
    # the PACS routes it to the agent (C-STORE, Orthanc as the SCU)
    job = orthanc.post(
        "/modalities/edge/store",
        json.dumps({"Resources": [orthanc_study], "Synchronous": True}).encode(),
    )
    assert int(job.get("InstancesCount", len(files))) == len(files), job
    n = app.store.query("SELECT count(*) FROM instances WHERE study_uid = ?", (study.study_uid,))
    assert n[0][0] == len(files)
    calling = app.store.query("SELECT DISTINCT calling_ae FROM associations WHERE calling_ae != ''")
    assert {r[0] for r in calling} == {"ORTHANC"}

    clock.advance(11)
    app.assembly.tick()
    app.inference.drain()
    (result,) = app.store.query("SELECT model_name FROM results")
    assert result[0] == SEG_NAME
    sent, failed = app.forwarder.tick()
    assert (sent, failed) == (3, 0), app.store.query("SELECT last_error FROM forwards")

    # back in the PACS: the same study, now with three titled series from the agent
    (same,) = orthanc.get("/studies")
    assert same == orthanc_study
    series = [orthanc.get(f"/series/{s}") for s in orthanc.get(f"/studies/{same}")["Series"]]
    by_modality = {s["MainDicomTags"]["Modality"]: s["MainDicomTags"] for s in series}
    assert set(by_modality) == {"CT", "SEG", "SR", "KO"}
    for modality, what in (("SEG", "segmentation"), ("SR", "report"), ("KO", "key images")):
        description = by_modality[modality].get("SeriesDescription", "")
        assert description == f"AI {what}: {SEG_NAME} 1.0.0", (modality, description)
    numbers = {s["MainDicomTags"].get("SeriesNumber") for s in series}
    assert len(numbers) == 4  # a series number each: not grouped as one in a viewer
    # what the PACS holds is what we made (and valid)
    for s in series:
        if s["MainDicomTags"]["Modality"] == "CT":
            continue
        (instance,) = s["Instances"]
        path = tmp_path / f"{s['MainDicomTags']['Modality']}.dcm"
        with urllib.request.urlopen(f"{orthanc.http}/instances/{instance}/file") as r:
            path.write_bytes(r.read())
        assert pydicom.dcmread(path).StudyInstanceUID == study.study_uid
        assert dciodvfy(path) == []
