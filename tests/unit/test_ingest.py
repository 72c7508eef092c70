"""The ingest path without networking: file header encoding, floor, quarantine records."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from edge_agent.studies.ingest import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Origin,
    Outcome,
    file_header,
)
from edge_agent.studies.parse import InstanceInfo
from tests.conftest import TEST_FILES, make_config, split_part10


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "ts", "ae"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "STORESCU"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2", "ODD"),
        ("1.2.840.10008.5.1.4.1.1.7", "2.25." + "9" * 39, "1.2.840.10008.1.2.4.90", ""),
        ("1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.840.10008.1.2.5", "SIXTEEN_CHARS_AE"),
    ],
)
def test_file_header_matches_pydicom(sop_class: str, sop_instance: str, ts: str, ae: str) -> None:
    info = InstanceInfo(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_uid="1.2",
        series_uid="1.2.1",
        transfer_syntax=ts,
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae:
        meta.SourceApplicationEntityTitle = ae
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    assert file_header(info, ae) == b"\x00" * 128 + b"DICM" + buf.getvalue()


def _ct() -> tuple[str, bytes, str]:
    ts, data = split_part10((TEST_FILES / "CT_small.dcm").read_bytes())
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm", stop_before_pixels=True)
    return ts, data, str(ds.SOPInstanceUID)


def test_receive_store_duplicate_and_floor(app_factory: Any, tmp_path: Path) -> None:
    app = app_factory(make_config(tmp_path), start=False)
    ts, data, uid = _ct()
    origin = Origin(association_id=None, calling_ae="UNIT")
    kw = {
        "transfer_syntax": ts,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": uid,
        "origin": origin,
    }
    first = app.ingestor.receive(data, **kw)
    assert (first.status, first.outcome) == (0, Outcome.STORED)
    again = app.ingestor.receive(data, **kw)
    assert (again.status, again.outcome) == (0, Outcome.DUPLICATE)
    stored = app.spool.locate(app.spool.relpath(hashlib.sha256(data).hexdigest())).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(stored))
    assert ds.file_meta.SourceApplicationEntityTitle == "UNIT"
    assert ds.SOPInstanceUID == uid

    app.ingestor.min_free_bytes = 2**62
    refused = app.ingestor.receive(data[:-10], **kw)  # floor is checked before anything else
    assert refused.status == 0xA700 and refused.outcome is Outcome.REFUSED
    assert "below the floor" in refused.comment
    assert app.store.query("SELECT count(*) FROM quarantine")[0][0] == 0


def test_internal_store_failure_is_out_of_resources_not_a_crash(
    app_factory: Any, tmp_path: Path
) -> None:
    app = app_factory(make_config(tmp_path), start=False)
    ts, data, uid = _ct()
    app.store.writer.close()  # the store is gone (e.g. disk error): answer, never raise
    result = app.ingestor.receive(
        data,
        transfer_syntax=ts,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        origin=Origin(association_id=None, calling_ae="UNIT"),
    )
    assert result.status == 0xA700 and result.outcome is Outcome.REFUSED
    assert "cannot store" in result.comment
