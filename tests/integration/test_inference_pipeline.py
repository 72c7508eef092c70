"""Studies sent by storescu end as results: routing, jobs, supersession on late arrival,
clear FAILED reasons (tampered model, failing self-test, unsupported pixels), crash recovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from edge_agent.inference.reference_models import (
    CLS_NAME,
    SEG_NAME,
    reference_lesion_mask,
)
from edge_agent.samples import make_study
from hub_protocol.package import write_manifest_files
from tests.conftest import TEST_FILES, dciodvfy, make_config, storescu

pytestmark = pytest.mark.dcmtk


def _app(app_factory: Any, tmp_path: Path, models: list[Path]) -> Any:
    app = app_factory(make_config(tmp_path))
    for m in models:
        app.registry.install(m)
    return app


def _complete(app: Any, clock: Any) -> None:
    clock.advance(11)
    app.assembly.tick()


def _study_state(app: Any, uid: str) -> str:
    return str(app.store.query("SELECT state FROM studies WHERE study_uid = ?", (uid,))[0][0])


def test_ct_and_mr_studies_get_results(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _app(app_factory, tmp_path, [ref_models[SEG_NAME], ref_models[CLS_NAME]])
    ct = make_study(tmp_path / "ct", modality="CT", slices=6, size=128, seed="pipe-ct")
    mr = make_study(tmp_path / "mr", modality="MR", slices=3, size=64, seed="pipe-mr")
    assert storescu(app.listener.port, *ct.files, *mr.files).returncode == 0
    _complete(app, clock)
    assert app.inference.drain() == 3  # CT: segmenter + classifier; MR: classifier only
    assert _study_state(app, ct.study_uid) == "DONE"
    assert _study_state(app, mr.study_uid) == "DONE"
    rows = app.store.query(
        "SELECT * FROM results WHERE study_uid = ? ORDER BY model_name", (ct.study_uid,)
    )
    assert [r["model_name"] for r in rows] == [SEG_NAME, CLS_NAME]
    seg = json.loads(rows[0]["findings"])
    assert rows[0]["provider"] == "CPUExecutionProvider"
    assert rows[0]["model_sha256"] == app.registry.get(SEG_NAME, "1.0.0").model_sha256
    # independent check: numpy on the files as sent
    dss = sorted(
        (pydicom.dcmread(p) for p in ct.files),
        key=lambda d: (
            float(d.SliceLocation) if "SliceLocation" in d else float(d.ImagePositionPatient[2])
        ),
    )
    hu = np.stack(
        [
            d.pixel_array.astype(float) * float(d.RescaleSlope) + float(d.RescaleIntercept)
            for d in dss
        ]
    )
    masks = reference_lesion_mask(hu)
    px = float(dss[0].PixelSpacing[0]) * float(dss[0].PixelSpacing[1])
    assert seg["area_mm2_total"] == pytest.approx(masks.sum() * px, rel=1e-6)
    assert seg["max_slice_area_mm2"] == pytest.approx(masks.sum(axis=(1, 2)).max() * px, rel=1e-6)
    assert seg["volume_mm3"] == pytest.approx(masks.sum() * px * 2.5, rel=1e-6)
    assert seg["mean_intensity"] == pytest.approx(float(hu[masks.astype(bool)].mean()), abs=1e-3)
    cls = json.loads(rows[1]["findings"])
    assert sum(cls["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(cls["per_instance"]) == 6


def test_late_arrival_supersedes_never_overwrites(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _app(app_factory, tmp_path, [ref_models[SEG_NAME]])
    study = make_study(tmp_path / "ct", modality="CT", slices=5, size=96, seed="late")
    assert storescu(app.listener.port, *study.files[:4]).returncode == 0
    _complete(app, clock)
    app.inference.drain()
    (first,) = app.store.query("SELECT result_id, findings FROM results")
    assert storescu(app.listener.port, study.files[4]).returncode == 0  # late slice
    assert _study_state(app, study.study_uid) == "RECEIVING"
    _complete(app, clock)
    app.inference.drain()
    rows = app.store.query("SELECT * FROM results ORDER BY created_at, result_id")
    assert len(rows) == 2
    old, new = rows
    assert old["result_id"] == first["result_id"] and old["findings"] == first["findings"]
    assert old["superseded_by"] == new["result_id"] and new["supersedes"] == old["result_id"]
    assert json.loads(new["findings"])["slices"] == 5
    # the new SR names the one it replaces (Predecessor Documents Sequence)
    sr_of = {
        r["result_id"]: r for r in app.store.query("SELECT * FROM result_objects WHERE kind = 'SR'")
    }
    data_dir = Path(app.cfg.storage.data_dir)
    new_sr = pydicom.dcmread(data_dir / sr_of[new["result_id"]]["path"])
    (pred,) = new_sr.PredecessorDocumentsSequence
    assert pred.StudyInstanceUID == study.study_uid
    (ref,) = [i for se in pred.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert ref.ReferencedSOPInstanceUID == sr_of[old["result_id"]]["sop_instance_uid"]
    old_sr = pydicom.dcmread(data_dir / sr_of[old["result_id"]]["path"])
    assert "PredecessorDocumentsSequence" not in old_sr
    assert dciodvfy(data_dir / sr_of[new["result_id"]]["path"]) == []
    assert json.loads(old["findings"])["slices"] == 4
    assert _study_state(app, study.study_uid) == "DONE"


def _variant(src: Path, dest: Path, edit: Any) -> Path:
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    write_manifest_files(dest, m)
    return dest


def test_clear_failures_and_the_agent_keeps_serving(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    def bad_selftest(m: dict[str, Any]) -> None:
        m["name"] = "seg-bad-selftest"
        m["self_test"]["expect"]["mean"] += 0.3

    def for_ot(m: dict[str, Any]) -> None:
        m["name"] = "cls-for-ot"
        m["routing"] = {"modality": ["OT"]}

    app = _app(
        app_factory,
        tmp_path,
        [
            ref_models[SEG_NAME],
            _variant(ref_models[SEG_NAME], tmp_path / "v1", bad_selftest),
            _variant(ref_models[CLS_NAME], tmp_path / "v2", for_ot),
        ],
    )
    # damage the installed segmenter on disk after installation
    installed = app.registry.get(SEG_NAME, "1.0.0")
    onnx_path = app.registry.models_dir / installed.path / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-4] + b"\0\0\0\0")

    ct = make_study(tmp_path / "ct", modality="CT", slices=2, size=64, seed="fail")
    assert storescu(app.listener.port, *ct.files).returncode == 0
    rgb = TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm"
    assert storescu(app.listener.port, rgb, extra=("-R", "-xy")).returncode == 0
    _complete(app, clock)
    app.inference.drain()
    errors = {
        r["model_name"]: r["error"]
        for r in app.store.query(
            "SELECT model_name, error FROM inference_jobs WHERE state = 'FAILED'"
        )
    }
    assert "PackageError" in errors[SEG_NAME] and "SHA-256" in errors[SEG_NAME]
    assert "SelfTestFailed" in errors["seg-bad-selftest"]
    assert "UnsupportedPixels" in errors["cls-for-ot"] and "grayscale" in errors["cls-for-ot"]
    assert _study_state(app, ct.study_uid) == "FAILED"
    reason = app.store.query(
        "SELECT reason FROM study_events WHERE study_uid = ? ORDER BY id DESC LIMIT 1",
        (ct.study_uid,),
    )[0][0]
    assert "2 of 2 inference job(s) failed" in reason
    # still serving
    more = make_study(tmp_path / "ct2", modality="CT", slices=1, size=64, seed="after")
    assert storescu(app.listener.port, *more.files).returncode == 0


def _crashed_with_job_running(
    app_factory: Any, tmp_path: Path, clock: Any, package: Path
) -> tuple[Any, Any, str]:
    """A study scheduled, its job claimed (RUNNING, attempts 1), then the agent "crashes"
    (closed without finishing the job). Returns (config, restarted app, study uid)."""
    from functools import partial

    from edge_agent.inference.store import claim_job

    cfg = make_config(tmp_path)
    app = app_factory(cfg)
    app.registry.install(package)
    study = make_study(tmp_path / "ct", modality="CT", slices=2, size=64, seed="crash-job")
    assert storescu(app.listener.port, *study.files).returncode == 0
    _complete(app, clock)
    app.inference.schedule()
    app.store.writer.call(partial(claim_job, now=clock.now()))
    app.listener.stop(grace_s=1)
    app.close()
    return cfg, app_factory(cfg, start=False), study.study_uid  # recover() runs at start


def test_crash_mid_job_is_retried_then_failed_after_two_crashes(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    from functools import partial

    from edge_agent.inference.store import claim_job

    cfg, app2, study_uid = _crashed_with_job_running(
        app_factory, tmp_path, clock, ref_models[SEG_NAME]
    )
    (job,) = app2.store.query("SELECT state, attempts FROM inference_jobs")
    assert (job["state"], job["attempts"]) == ("PENDING", 1)
    # second crash: attempts reaches max_attempts (2) -> FAILED on the next restart
    app2.store.writer.call(partial(claim_job, now=clock.now()))
    app2.close()
    app3 = app_factory(cfg, start=False)
    (job,) = app3.store.query("SELECT state, attempts, error FROM inference_jobs")
    assert job["state"] == "FAILED" and "crashed 2 times" in job["error"]
    assert _study_state(app3, study_uid) == "FAILED"


def test_job_run_exactly_once_after_recovery(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    _, app2, study_uid = _crashed_with_job_running(
        app_factory, tmp_path, clock, ref_models[SEG_NAME]
    )
    assert app2.inference.drain() == 1
    assert app2.inference.drain() == 0
    assert app2.store.query("SELECT count(*) FROM results")[0][0] == 1
    assert _study_state(app2, study_uid) == "DONE"


def test_seg_and_sr_read_back_and_reference_the_source(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    import highdicom as hd

    app = _app(app_factory, tmp_path, [ref_models[SEG_NAME], ref_models[CLS_NAME]])
    ct = make_study(tmp_path / "ct", modality="CT", slices=4, size=96, seed="dicom-out")
    assert storescu(app.listener.port, *ct.files).returncode == 0
    _complete(app, clock)
    app.inference.drain()
    objs = {
        (r["model_name"], r["kind"]): r
        for r in app.store.query(
            "SELECT r.model_name, o.* FROM result_objects o JOIN results r USING (result_id)"
        )
    }
    assert set(objs) == {(SEG_NAME, "SEG"), (SEG_NAME, "SR"), (SEG_NAME, "KO"), (CLS_NAME, "SR")}
    data_dir = Path(app.cfg.storage.data_dir)
    source_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in ct.files}

    seg = hd.seg.segread(data_dir / objs[(SEG_NAME, "SEG")]["path"])
    assert seg.StudyInstanceUID == ct.study_uid
    assert seg.SOPInstanceUID == objs[(SEG_NAME, "SEG")]["sop_instance_uid"]
    refs = {
        r.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert refs == source_uids
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == (SEG_NAME, "1.0.0")
    # the SEG's mask equals the numpy reference on the sent pixels
    dss = sorted(
        (pydicom.dcmread(p) for p in ct.files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    expected = reference_lesion_mask(np.stack([d.pixel_array * 1.0 - 1024 for d in dss]))
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), 96, 96).astype(bool)
    by_source = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: frame
        for f, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True)
    }
    for d, mask in zip(dss, expected.astype(bool), strict=True):
        # slices without a finding have no frame (omitted, as is usual for SEG)
        got = by_source.get(d.SOPInstanceUID, np.zeros_like(mask))
        assert np.array_equal(got, mask)
    assert expected.sum() > 0 and 0 < len(by_source) <= len(dss)

    sr = pydicom.dcmread(data_dir / objs[(SEG_NAME, "SR")]["path"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == ct.study_uid
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    seg_uid = objs[(SEG_NAME, "SEG")]["sop_instance_uid"]
    assert evidence == source_uids | {seg_uid}  # the images and the SEG measured
    report = hd.sr.ComprehensiveSR.from_dataset(sr).content
    # the measurements are of the SEG's segment (a volumetric ROI group, TID 1411)
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg_uid
    assert group.referenced_segment.referenced_segment_numbers == [1]
    # the image library lists every source image (TID 1600)
    library = [
        item
        for c in sr.ContentSequence
        if c.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
        for g in c.ContentSequence
        for item in g.get("ContentSequence", [])
        if item.ValueType == "IMAGE"
    ]
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in library} == source_uids
    # the key images: the largest cross-section first, then where the finding starts and ends
    kos = pydicom.dcmread(data_dir / objs[(SEG_NAME, "KO")]["path"])
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    keyed = [
        c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for c in kos.ContentSequence
        if c.ValueType == "IMAGE"
    ]
    areas = expected.reshape(len(dss), -1).sum(axis=1)
    shown = [d.SOPInstanceUID for d, a in zip(dss, areas, strict=True) if a]
    largest = dss[int(np.argmax(areas))].SOPInstanceUID
    assert keyed == list(dict.fromkeys([largest, shown[0], shown[-1]]))
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    findings = json.loads(
        app.store.query("SELECT findings FROM results WHERE model_name = ?", (SEG_NAME,))[0][0]
    )
    assert values["Area"] == pytest.approx(findings["area_mm2_total"])
    assert values["Volume"] == pytest.approx(findings["volume_mm3"])
    assert values["Mean"] == pytest.approx(findings["mean_intensity"])
    texts: dict[str, set[str]] = {}

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                texts.setdefault(name, set()).add(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert texts["Algorithm Name"] == {SEG_NAME}
    assert texts["Algorithm Version"] == {"1.0.0"}
    # standard codes only: the finding is SNOMED CT "Lesion" in SEG and SR alike
    assert group.finding_type == hd.sr.CodedConcept("52988006", "SCT", "Lesion")
    prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodingSchemeDesignator, prop.CodeValue) == ("SCT", "52988006")
    (critical,) = group.get_qualitative_evaluations()
    assert critical.name.value == "73568-8" and critical.value.scheme_designator == "SCT"

    cls_sr = hd.sr.ComprehensiveSR.from_dataset(
        pydicom.dcmread(data_dir / objs[(CLS_NAME, "SR")]["path"])
    )
    groups = cls_sr.content.get_image_measurement_groups()
    top = json.loads(
        app.store.query("SELECT findings FROM results WHERE model_name = ?", (CLS_NAME,))[0][0]
    )
    assert len(groups) == 3  # one per label, the top label first, each with its probability
    assert groups[0].finding_type.meaning == {
        "normal": "Normal", "nodule": "Nodule", "effusion": "Pleural effusion"
    }[top["top_label"]]  # fmt: skip
    for g in groups:
        (m,) = g.get_measurements()
        assert (m.name.value, m.name.scheme_designator) == ("122157", "DCM")
        assert g.finding_type.scheme_designator == "SCT"
    # every object: titled, dated, a series number of its own, valid (dciodvfy: no error,
    # no warning at all: nothing private left to warn about)
    numbers = set()
    for (model, kind), row in objs.items():
        ds = pydicom.dcmread(data_dir / row["path"])
        assert ds.SeriesDescription.startswith("AI ") and model in ds.SeriesDescription
        assert len(ds.SeriesDate) == 8 and ds.SeriesTime
        assert "CodingSchemeIdentificationSequence" not in ds  # no private scheme used
        numbers.add(int(ds.SeriesNumber))
        assert dciodvfy(data_dir / row["path"]) == [], (model, kind)
    assert len(numbers) == 4


@pytest.fixture
def storescp_dest(tmp_path: Path) -> Any:
    import subprocess
    import time

    from tests.conftest import free_port, run_tool

    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+xa", "-dhl", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while run_tool("echoscu", "-aec", "PACS", "127.0.0.1", str(port)).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    yield port, out
    proc.terminate()
    proc.wait(10)


def test_results_forwarded_to_pacs_and_a_down_destination_is_retried_then_dead(
    app_factory: Any,
    tmp_path: Path,
    clock: Any,
    ref_models: dict[str, Path],
    storescp_dest: Any,
) -> None:
    from edge_agent.config import Destination
    from tests.conftest import free_port

    pacs_port, pacs_dir = storescp_dest
    down_port = free_port()  # nothing listens there
    cfg = make_config(
        tmp_path,
        results={
            "destinations": (
                Destination(ae_title="PACS", host="127.0.0.1", port=pacs_port),
                Destination(ae_title="DOWN", host="127.0.0.1", port=down_port),
            ),
            "max_attempts": 3,
            "retry_initial_s": 10.0,
            "retry_max_s": 40.0,
        },
    )
    app = app_factory(cfg)
    app.registry.install(ref_models[SEG_NAME])
    ct = make_study(tmp_path / "ct", modality="CT", slices=3, size=64, seed="fwd")
    assert storescu(app.listener.port, *ct.files).returncode == 0
    _complete(app, clock)
    app.inference.drain()
    sent, failed = app.forwarder.tick()
    assert (sent, failed) == (3, 3)  # SEG + SR + KOS to PACS; all fail for DOWN
    received = sorted(p.name[:2] for p in pacs_dir.iterdir())
    assert received == ["KO", "SG", "SR"]  # storescp names files by modality
    rows = app.store.query(
        "SELECT destination, state, attempts, next_attempt_at, last_error "
        "FROM forwards ORDER BY destination, kind"
    )
    down = [r for r in rows if r["destination"].startswith("DOWN")]
    assert all(r["state"] == "PENDING" and r["attempts"] == 1 for r in down)
    assert all(7.5 <= r["next_attempt_at"] - clock.now() <= 12.5 for r in down)  # 10 s +-25 %
    assert all("cannot connect" in r["last_error"] for r in down)
    assert app.forwarder.tick() == (0, 0)  # not due yet: nothing is hammered
    for _ in range(2):
        clock.advance(60)
        assert app.forwarder.tick() == (0, 3)
    states = {
        (r["destination"][:4], r["state"])
        for r in app.store.query("SELECT destination, state FROM forwards")
    }
    assert states == {("PACS", "SENT"), ("DOWN", "DEAD")}
    clock.advance(3600)
    assert app.forwarder.tick() == (0, 0)  # dead letters are not retried silently


def test_results_enter_the_outbox_in_the_same_transaction(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _app(app_factory, tmp_path, [ref_models[SEG_NAME], ref_models[CLS_NAME]])
    ct = make_study(tmp_path / "ct", modality="CT", slices=6, size=512, seed="outbox")
    assert storescu(app.listener.port, *ct.files).returncode == 0
    _complete(app, clock)
    app.inference.drain()
    results = {r["result_id"]: r for r in app.store.query("SELECT * FROM results")}
    rows = app.store.query("SELECT * FROM outbox ORDER BY lane, seq")
    assert {r["key"] for r in rows} == {f"result/{rid}" for rid in results}
    for r in rows:
        res = results[r["key"].split("/", 1)[1]]
        assert r["lane"] == ("urgent" if res["critical"] else "normal")
        assert json.loads(r["payload"])["findings"] == json.loads(res["findings"])
    hlcs = [r["hlc"] for r in app.store.query("SELECT hlc FROM outbox ORDER BY id")]
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == len(hlcs)
    (saved,) = app.store.query("SELECT value FROM sync_state WHERE name = 'hlc'")[0]
    assert saved == hlcs[-1]


def test_full_outbox_holds_results_back_without_failing_or_dropping(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    from edge_agent.sync import outbox
    from hub_protocol import HLC, Lane, PushReceipt, RecordType

    app = app_factory(make_config(tmp_path, sync={"outbox_max_mb": 1}))
    app.registry.install(ref_models[CLS_NAME])
    filler = {"pad": "x" * (2**20 - 200)}
    app.store.writer.call(
        lambda c: outbox.enqueue(
            c,
            key="heartbeat/filler",
            type=RecordType.HEARTBEAT,
            lane=Lane.BATCH,
            payload=filler,
            hlc=HLC(1, 0, "edge"),
            now=clock.now(),
        )
    )
    mr = make_study(tmp_path / "mr", modality="MR", slices=2, size=64, seed="full")
    assert storescu(app.listener.port, *mr.files).returncode == 0
    _complete(app, clock)
    app.inference.schedule()
    assert app.inference.run_one() is False  # could not store: paused, job kept
    (job,) = app.store.query("SELECT state, attempts, error FROM inference_jobs")
    assert (job["state"], job["attempts"]) == ("PENDING", 0) and "outbox full" in job["error"]
    assert _study_state(app, mr.study_uid) == "INFERRING"
    assert app.store.query("SELECT count(*) FROM results")[0][0] == 0  # nothing half-written
    # the hub takes the backlog: space again, and the job completes
    app.store.writer.call(
        lambda c: outbox.apply_receipt(
            c, PushReceipt(receipts=(), high_water={Lane.BATCH: 1}), now=clock.now()
        )
    )
    assert app.inference.drain() == 1
    assert _study_state(app, mr.study_uid) == "DONE"
    assert app.store.query("SELECT count(*) FROM outbox WHERE state = 'PENDING'")[0][0] == 1


def test_job_in_flight_finishes_on_the_version_it_started_with(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    """Activation of a new version between scheduling and running does not change the
    version a job uses; the result names that exact version and sha256."""
    app = _app(app_factory, tmp_path, [ref_models[SEG_NAME]])
    v1 = app.registry.get(SEG_NAME, "1.0.0")
    v2_pkg = _variant(ref_models[SEG_NAME], tmp_path / "v2", lambda m: m.update(version="1.1.0"))
    ct = make_study(tmp_path / "ct", modality="CT", slices=2, size=64, seed="inflight")
    assert storescu(app.listener.port, *ct.files).returncode == 0
    _complete(app, clock)
    app.inference.schedule()  # the job is bound to 1.0.0 now
    v2 = app.registry.install(v2_pkg, activate=True)  # ops activate 1.1.0 meanwhile
    assert v2.active
    app.inference.drain()
    (row,) = app.store.query("SELECT model_version, model_sha256 FROM results")
    assert (row["model_version"], row["model_sha256"]) == ("1.0.0", v1.model_sha256)
    assert v2.manifest_sha256 != v1.manifest_sha256


def test_results_go_out_under_our_ae_title_and_a_refusal_says_why(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    """A PACS that only accepts the AE titles it knows (here another agent, which accepts
    EDGE_TEST only): results are sent as the agent's own AE title (dicom.ae_title, with
    results.calling_ae_title left empty) and arrive; a PACS that refuses the association
    leaves the rejection's result, source and reason as the send's error."""
    import subprocess
    import time

    from edge_agent.config import AllowedCaller, Destination
    from tests.conftest import free_port, run_tool

    only_us = {"ae_title": "PACS", "allowed_callers": (AllowedCaller(ae_title="EDGE_TEST"),)}
    pacs = app_factory(make_config(tmp_path / "pacs", dicom=only_us))
    refusing_port = free_port()
    refusing = subprocess.Popen(
        ["storescp", "--refuse", "-aet", "REFUSER", str(refusing_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while run_tool("echoscu", "127.0.0.1", str(refusing_port)).stderr.find("Rejected") < 0:
            assert time.monotonic() < deadline, "storescp --refuse did not come up"
            time.sleep(0.1)
        cfg = make_config(
            tmp_path / "edge",
            results={
                "destinations": (
                    Destination(ae_title="PACS", host="127.0.0.1", port=pacs.listener.port),
                    Destination(ae_title="REFUSER", host="127.0.0.1", port=refusing_port),
                ),
            },
        )
        assert cfg.results.calling_ae_title == ""
        app = app_factory(cfg)
        app.registry.install(ref_models[SEG_NAME])
        ct = make_study(tmp_path / "ct", modality="CT", slices=3, size=64, seed="ae")
        assert storescu(app.listener.port, *ct.files).returncode == 0
        _complete(app, clock)
        app.inference.drain()
        assert app.forwarder.tick() == (3, 3)
        # (the forwarder's TCP probe before associating is audited too, with no AE title)
        got = pacs.store.query("SELECT calling_ae FROM associations WHERE calling_ae != ''")
        assert {r["calling_ae"] for r in got} == {"EDGE_TEST"}
        assert pacs.store.query("SELECT count(*) FROM instances")[0][0] == 3  # SEG, SR, KOS
        errors = {
            r["last_error"]
            for r in app.store.query("SELECT last_error FROM forwards WHERE state = 'PENDING'")
        }
        (error,) = errors
        assert "association rejected by REFUSER" in error and "as EDGE_TEST" in error
        assert "Rejected Permanent, Service User: No reason given" in error
    finally:
        refusing.terminate()
        refusing.wait(10)
