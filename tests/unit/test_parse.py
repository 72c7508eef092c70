"""inspect_dataset: strict structural walk of received bytes + extraction of indexed attributes."""

from __future__ import annotations

import functools
import io
import warnings
import zlib

import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from edge_agent.errors import InvalidInstance
from edge_agent.studies.parse import (
    STATUS_CANNOT_PARSE,
    STATUS_INVALID_UID,
    STATUS_MISSING_ATTRIBUTE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_UID_MISMATCH,
    InstanceInfo,
    inspect_dataset,
)
from tests.conftest import TEST_FILES, split_part10

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

# pydicom test files that have file meta and a dataset that is valid for its transfer syntax
# (determined empirically: every other bundled file lacks file meta, lacks a UID we need, or
# is encoded against its declared transfer syntax; see test_known_bad_pydicom_files below).
VALID_FILES = (
    # explicit VR little endian
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_padded.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "badVR.dcm",
    "examples_overlay.dcm",
    "examples_palette.dcm",
    "examples_rgb_color.dcm",
    "liver_1frame.dcm",
    "reportsi.dcm",  # SR: nested undefined-length sequences
    "reportsi_with_empty_number_tags.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    # implicit VR little endian
    "MR_small_implicit.dcm",
    "SC_rgb_jpeg_dcmd.dcm",
    "rtdose.dcm",
    "rtdose_1frame.dcm",
    "rtplan.dcm",
    # explicit VR big endian
    "ExplVR_BigEnd.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "liver_expb_1frame.dcm",
    "rtdose_expb.dcm",
    "rtdose_expb_1frame.dcm",
    # deflated explicit VR little endian
    "image_dfl.dcm",
    # JPEG baseline / extended / lossless
    "SC_jpeg_no_color_transform.dcm",
    "SC_jpeg_no_color_transform_2.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "SC_rgb_dcmtk_+eb+cy+n2.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_jpeg_app14_dcmd.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "examples_ybr_color.dcm",
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    # JPEG-LS
    "MR_small_jpeg_ls_lossless.dcm",
    # JPEG 2000
    "693_J2KI.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "examples_jpeg2k.dcm",
    # RLE
    "MR_small_RLE.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_32bit.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "rtdose_rle.dcm",
    "rtdose_rle_1frame.dcm",
)

# Each transfer syntax family the brief names must really be covered by the list above.
REQUIRED_SYNTAXES = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
}

# Small files for the prefix property: defined lengths, implicit VR, big endian, undefined-
# length sequences (reportsi) and encapsulated pixel data (JPEG2000, RLE).
PREFIX_FILES = (
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "reportsi.dcm",
    "rtplan.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
)

UID_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)


@functools.cache
def dataset_of(name: str) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes) of a pydicom test file."""
    return split_part10((TEST_FILES / name).read_bytes())


@functools.cache
def layout(name: str) -> tuple[frozenset[int], int]:
    """Independent oracle (pydicom's own reader): the byte offsets where top-level elements
    end, and the offset by which all four required UIDs have been read."""
    ts, data = dataset_of(name)
    uid = pydicom.uid.UID(ts)
    fp = io.BytesIO(data)
    ends = {0}
    uids_end = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for elem in data_element_generator(fp, uid.is_implicit_VR, uid.is_little_endian):
            ends.add(fp.tell())
            if elem.tag in UID_TAGS:
                uids_end = max(uids_end, fp.tell())
    assert max(ends) == len(data)
    return frozenset(ends), uids_end


def read_with_pydicom(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(TEST_FILES / name)


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about invalid UIDs
        write_dataset(fp, ds)
    return fp.getvalue()


def minimal(**overrides: str) -> Dataset:
    ds = Dataset()
    values = {
        "SOPClassUID": CT_IMAGE,
        "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.1.1",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",
        "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1.2",
        "Modality": "CT",
        "PatientID": "PID-1",
    }
    values.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for keyword, value in values.items():
            if value is not None:
                setattr(ds, keyword, value)
    return ds


def add_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Add an element with a value pydicom would warn about (it is what some senders send)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.add(DataElement(tag, vr, value))


def rejected(data: bytes, ts: str = ExplicitVRLittleEndian, **kwargs: str) -> InvalidInstance:
    with pytest.raises(InvalidInstance) as info:
        inspect_dataset(data, ts, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Valid files


def test_valid_file_list_covers_every_syntax_family() -> None:
    assert {dataset_of(name)[0] for name in VALID_FILES} >= REQUIRED_SYNTAXES


@pytest.mark.parametrize("name", VALID_FILES)
def test_valid_pydicom_file_parses_and_agrees_with_pydicom(name: str) -> None:
    ts, data = dataset_of(name)
    ds = read_with_pydicom(name)
    info = inspect_dataset(
        data,
        ts,
        expected_sop_class=str(ds.SOPClassUID),
        expected_sop_instance=str(ds.SOPInstanceUID),
    )
    assert info.transfer_syntax == ts
    assert info.sop_class_uid == ds.SOPClassUID
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.study_uid == ds.StudyInstanceUID
    assert info.series_uid == ds.SeriesInstanceUID
    assert info.modality == str(ds.get("Modality", "")).strip().upper()
    assert info.patient_id == str(ds.get("PatientID", "")).strip()
    assert info.patient_name == str(ds.get("PatientName", "")).strip()
    assert info.study_date == str(ds.get("StudyDate", "")).strip()
    assert info.accession_number == str(ds.get("AccessionNumber", "")).strip()


def test_extracted_fields_of_ct_small() -> None:
    ts, data = dataset_of("CT_small.dcm")
    info = inspect_dataset(data, ts)
    assert info == InstanceInfo(
        sop_class_uid=CT_IMAGE,
        sop_instance_uid="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        study_uid="1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
        series_uid="1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322",
        transfer_syntax=ExplicitVRLittleEndian,
        modality="CT",
        patient_id="1CT1",
        patient_name="CompressedSamples^CT1",
        study_date="20040119",
        accession_number="",
        study_description="e+1",
        series_description="",
        series_number="1",
        instance_number="1",
        body_part="",
        expected_study_instances=None,
    )


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("JPEGLSNearLossless_08.dcm", STATUS_MISSING_ATTRIBUTE),  # no Study Instance UID
        ("SC_rgb_jls_lossy_line.dcm", STATUS_MISSING_ATTRIBUTE),
        ("priv_SQ.dcm", STATUS_MISSING_ATTRIBUTE),  # no SOP Class UID
        ("SC_rgb_jpeg.dcm", STATUS_CANNOT_PARSE),  # implicit VR data under an explicit syntax
        ("MR_truncated.dcm", STATUS_CANNOT_PARSE),
        ("rtplan_truncated.dcm", STATUS_CANNOT_PARSE),
    ],
)
def test_known_bad_pydicom_files(name: str, status: int) -> None:
    ts, data = dataset_of(name)
    err = rejected(data, ts)
    assert err.status == status
    assert err.reason


def test_truncated_files_say_what_was_cut() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        ts, data = dataset_of(name)
        err = rejected(data, ts)
        assert err.status == STATUS_CANNOT_PARSE
        assert "remain" in err.reason or "cut short" in err.reason


# ---------------------------------------------------------------------------------------------
# Truncation: every prefix that cuts inside an element is rejected


def check_prefix(name: str, cut: int) -> None:
    ts, data = dataset_of(name)
    ends, uids_end = layout(name)
    prefix = data[:cut]
    if cut not in ends:
        err = rejected(prefix, ts)
        assert err.status == STATUS_CANNOT_PARSE, (name, cut, err.reason)
    elif cut < uids_end:
        # A structurally valid, shorter dataset that stops before some required UID.
        err = rejected(prefix, ts)
        assert err.status == STATUS_MISSING_ATTRIBUTE, (name, cut, err.reason)
    else:
        full = inspect_dataset(data, ts)
        info = inspect_dataset(prefix, ts)
        assert (info.sop_instance_uid, info.study_uid, info.series_uid) == (
            full.sop_instance_uid,
            full.study_uid,
            full.series_uid,
        )


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_strict_prefix_is_rejected_unless_on_an_element_boundary(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(PREFIX_FILES), label="file")
    size = len(dataset_of(name)[1])
    header_region = min(size - 1, 2048)  # most elements live before the pixel data
    cut = data.draw(st.one_of(st.integers(1, header_region), st.integers(1, size - 1)), label="cut")
    check_prefix(name, cut)


@pytest.mark.parametrize("name", PREFIX_FILES)
def test_prefixes_at_and_next_to_every_element_boundary(name: str) -> None:
    size = len(dataset_of(name)[1])
    ends, _ = layout(name)
    cuts = {c + d for c in ends for d in (-2, -1, 0, 1, 2)}
    checked = 0
    for cut in sorted(cuts):
        if 0 < cut < size:
            check_prefix(name, cut)
            checked += 1
    assert checked > len(ends)  # boundaries and their neighbours were all exercised


def test_empty_dataset_is_rejected() -> None:
    assert rejected(b"").status == STATUS_CANNOT_PARSE


def test_trailing_bytes_after_the_last_element_are_rejected() -> None:
    ts, data = dataset_of("CT_small.dcm")
    for extra in (b"\x00", b"\x00" * 7, b"\xe0\x7f\x10\x00OB"):
        assert rejected(data + extra, ts).status == STATUS_CANNOT_PARSE


# ---------------------------------------------------------------------------------------------
# Deflate


def deflate_stream_end(data: bytes) -> int:
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    d.decompress(data)
    assert d.eof
    return len(data) - len(d.unused_data)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_deflated_dataset_cut_short_is_rejected(cut: int) -> None:
    ts, data = dataset_of("image_dfl.dcm")
    end = deflate_stream_end(data)
    cut = cut % end  # anywhere strictly before the end of the deflate stream
    err = rejected(data[:cut], ts)
    assert err.status == STATUS_CANNOT_PARSE


def test_deflated_dataset_cut_in_its_last_bytes_is_rejected() -> None:
    ts, data = dataset_of("image_dfl.dcm")
    end = deflate_stream_end(data)
    for cut in range(end - 16, end):
        assert rejected(data[:cut], ts).status == STATUS_CANNOT_PARSE
    inspect_dataset(data[:end], ts)  # the stream itself, without trailing padding, is fine


def test_deflated_garbage_is_rejected() -> None:
    err = rejected(b"\xff\x00not a deflate stream", DeflatedExplicitVRLittleEndian)
    assert err.status == STATUS_CANNOT_PARSE
    assert "inflate" in err.reason


def test_deflated_stream_of_a_truncated_dataset_is_rejected() -> None:
    # The deflate stream is complete, but what it inflates to is cut inside an element.
    _, data = dataset_of("CT_small.dcm")
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = c.compress(data[:-5]) + c.flush()
    err = rejected(stream, DeflatedExplicitVRLittleEndian)
    assert err.status == STATUS_CANNOT_PARSE
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    info = inspect_dataset(c.compress(data) + c.flush(), DeflatedExplicitVRLittleEndian)
    assert info.patient_id == "1CT1"


# ---------------------------------------------------------------------------------------------
# Sequences and delimiters


def with_undefined_length_sequence(*, implicit: bool = False) -> bytes:
    ds = minimal()
    item = Dataset()
    item.CodeMeaning = "finding"
    item.is_undefined_length_sequence_item = True
    ds.ContentSequence = Sequence([item])  # (0040,A730): the last element
    ds["ContentSequence"].is_undefined_length = True
    return encode(ds, implicit=implicit)


SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
ITEM_DELIM = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


@pytest.mark.parametrize("implicit", [False, True])
def test_undefined_length_sequence_missing_its_delimiter(implicit: bool) -> None:
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    data = with_undefined_length_sequence(implicit=implicit)
    assert data.endswith(ITEM_DELIM + SEQ_DELIM)
    assert inspect_dataset(data, ts).modality == "CT"  # the intact encoding is fine

    no_seq_delim = data[: -len(SEQ_DELIM)]
    err = rejected(no_seq_delim, ts)
    assert err.status == STATUS_CANNOT_PARSE
    assert "delimiter" in err.reason

    no_item_delim = data[: -len(SEQ_DELIM) - len(ITEM_DELIM)]
    err = rejected(no_item_delim, ts)
    assert err.status == STATUS_CANNOT_PARSE
    assert "delimiter" in err.reason


def test_stray_delimiter_at_top_level_is_rejected() -> None:
    data = encode(minimal()) + SEQ_DELIM
    assert rejected(data).status == STATUS_CANNOT_PARSE


def test_undefined_length_on_a_non_sequence_vr_is_rejected() -> None:
    # (0010,4000) as UT (a VR with a 4-byte length field) claiming undefined length.
    bad = b"\x10\x00\x00\x40UT\x00\x00\xff\xff\xff\xff"
    data = encode(minimal()) + bad
    err = rejected(data)
    assert err.status == STATUS_CANNOT_PARSE
    assert "undefined length" in err.reason


def test_undefined_length_un_is_walked_as_implicit_sequence() -> None:
    # PS3.5 6.2.2: undefined-length UN holds an implicit VR little endian sequence.
    item = b"\x08\x00\x00\x01\x02\x00\x00\x00AB"  # (0008,0100) implicit, 2 bytes
    un = (
        b"\x09\x00\x10\x10UN\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        + item
        + ITEM_DELIM
        + SEQ_DELIM
    )
    head = encode(minimal())
    info = inspect_dataset(head + un, ExplicitVRLittleEndian)
    assert info.modality == "CT"
    assert rejected(head + un[: -len(SEQ_DELIM)]).status == STATUS_CANNOT_PARSE


def test_sequences_nested_too_deep_are_rejected() -> None:
    # 40 nested undefined-length sequences (implicit VR), each in an undefined-length item.
    seq = b"\x08\x00\x15\x11\xff\xff\xff\xff"  # (0008,1115) undefined length
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    depth = 40
    nested = (seq + item) * depth + (ITEM_DELIM + SEQ_DELIM) * depth
    head = encode(minimal(), implicit=True)
    err = rejected(head + nested, ImplicitVRLittleEndian)
    assert err.status == STATUS_CANNOT_PARSE
    assert "deeper" in err.reason
    shallow = (seq + item) * 5 + (ITEM_DELIM + SEQ_DELIM) * 5
    assert inspect_dataset(head + shallow, ImplicitVRLittleEndian).modality == "CT"


# ---------------------------------------------------------------------------------------------
# Garbage

TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    "1.2.826.0.1.3680043.8.498.99",  # a private syntax: explicit VR little endian
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), ts=st.sampled_from(TRANSFER_SYNTAXES))
def test_random_garbage_only_ever_raises_invalid_instance(data: bytes, ts: str) -> None:
    with warnings.catch_warnings():
        # Garbage that happens to hold a Specific Character Set pydicom does not know makes
        # pydicom warn (and fall back); that is not an exception in production.
        warnings.simplefilter("ignore", UserWarning)
        try:
            inspect_dataset(data, ts)
        except InvalidInstance as exc:
            assert exc.status in (
                STATUS_CANNOT_PARSE,
                STATUS_MISSING_ATTRIBUTE,
                STATUS_INVALID_UID,
            )
            assert exc.reason


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(("CT_small.dcm", "MR_small_implicit.dcm", "reportsi.dcm")),
    edits=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_corrupted_bytes_only_ever_raise_invalid_instance(
    name: str, edits: list[tuple[int, int]]
) -> None:
    ts, original = dataset_of(name)
    buf = bytearray(original)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    assume(bytes(buf) != original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see the garbage test above
        try:
            inspect_dataset(bytes(buf), ts)
        except InvalidInstance as exc:
            assert 0xC000 <= exc.status <= 0xC0FF
            assert exc.reason


def test_private_transfer_syntax_is_read_as_explicit_little_endian() -> None:
    # Regression: an unknown/private syntax UID used to escape as pydicom's ValueError
    # ("UID is not a transfer syntax") instead of being read as explicit VR little endian.
    _, data = dataset_of("CT_small.dcm")
    info = inspect_dataset(data, "1.2.826.0.1.3680043.8.498.99")
    assert info.patient_id == "1CT1"
    assert info.transfer_syntax == "1.2.826.0.1.3680043.8.498.99"
    _, implicit = dataset_of("MR_small_implicit.dcm")
    assert rejected(implicit, "1.2.826.0.1.3680043.8.498.99").status == STATUS_CANNOT_PARSE


# ---------------------------------------------------------------------------------------------
# UIDs: missing, malformed, mismatched


def test_minimal_dataset_parses() -> None:
    info = inspect_dataset(
        encode(minimal()),
        ExplicitVRLittleEndian,
        expected_sop_class=CT_IMAGE,
        expected_sop_instance="1.2.826.0.1.3680043.8.498.1.1",
    )
    assert info.sop_class_uid == CT_IMAGE
    assert info.modality == "CT"
    assert info.patient_id == "PID-1"


def test_expected_uids_tolerate_dicom_padding() -> None:
    info = inspect_dataset(
        encode(minimal()),
        ExplicitVRLittleEndian,
        expected_sop_class=CT_IMAGE + "\x00",
        expected_sop_instance="1.2.826.0.1.3680043.8.498.1.1 ",
    )
    assert info.sop_instance_uid == "1.2.826.0.1.3680043.8.498.1.1"


def test_sop_instance_mismatch() -> None:
    err = rejected(
        encode(minimal()),
        expected_sop_class=CT_IMAGE,
        expected_sop_instance="1.2.826.0.1.3680043.8.498.1.2",
    )
    assert err.status == STATUS_UID_MISMATCH == 0xC003
    assert "1.2.826.0.1.3680043.8.498.1.2" in err.reason


def test_sop_class_mismatch() -> None:
    err = rejected(
        encode(minimal()),
        expected_sop_class=MR_IMAGE,
        expected_sop_instance="1.2.826.0.1.3680043.8.498.1.1",
    )
    assert err.status == STATUS_SOP_CLASS_MISMATCH == 0xA900
    assert MR_IMAGE in err.reason


@pytest.mark.parametrize(
    "keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
def test_missing_uid(keyword: str) -> None:
    err = rejected(encode(minimal(**{keyword: None})))  # type: ignore[arg-type]
    assert err.status == STATUS_MISSING_ATTRIBUTE == 0xC001
    assert "missing" in err.reason


@pytest.mark.parametrize(
    "keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
def test_empty_uid_counts_as_missing(keyword: str) -> None:
    err = rejected(encode(minimal(**{keyword: ""})))
    assert err.status == STATUS_MISSING_ATTRIBUTE


@pytest.mark.parametrize(
    "value",
    [
        "1.2.abc",
        "1.02.3",  # leading zero in a component
        "1..2",
        ".1.2",
        "1.2.",
        "1.2.3 4",
        "1." + "2" * 63,  # 65 characters
    ],
)
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_malformed_uid(keyword: str, value: str) -> None:
    err = rejected(encode(minimal(**{keyword: value})))
    assert err.status == STATUS_INVALID_UID == 0xC002
    assert "malformed" in err.reason


def test_uid_of_exactly_64_characters_is_accepted() -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64
    assert inspect_dataset(encode(minimal(SOPInstanceUID=uid)), ExplicitVRLittleEndian)


# ---------------------------------------------------------------------------------------------
# Character sets and other fields


def test_utf8_patient_name_is_decoded() -> None:
    ds = minimal()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDescription = "Schädel nativ"
    data = encode(ds)
    assert "Müller^Jürgen".encode() in data
    info = inspect_dataset(data, ExplicitVRLittleEndian)
    assert info.patient_name == "Müller^Jürgen"
    assert info.study_description == "Schädel nativ"


def test_latin1_patient_name_is_decoded() -> None:
    ds = minimal()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    data = encode(ds)
    assert "Müller^Jürgen".encode("latin-1") in data
    assert inspect_dataset(data, ExplicitVRLittleEndian).patient_name == "Müller^Jürgen"


def test_iso2022_japanese_patient_name_is_decoded() -> None:
    # The PS3.5 H.3.1 example: alphabetic, ideographic and phonetic groups.
    ds = minimal()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    raw = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
    ds.add(DataElement(0x00100010, "PN", raw))
    info = inspect_dataset(encode(ds), ExplicitVRLittleEndian)
    assert info.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_unknown_character_set_warns_and_falls_back() -> None:
    ds = minimal()
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.add(DataElement(0x00100010, "PN", b"Doe^John"))
    data = encode(ds)
    with pytest.warns(UserWarning, match="ISO_IR 999"):
        info = inspect_dataset(data, ExplicitVRLittleEndian)
    assert info.patient_name == "Doe^John"


def test_optional_fields_are_extracted_and_normalised() -> None:
    ds = minimal()
    # Lower case is invalid for CS, but senders do it; we upper-case modality and body part.
    add_raw(ds, 0x00080060, "CS", b"mr")
    add_raw(ds, 0x00180015, "CS", b"head")
    ds.StudyDate = "20240229"
    ds.AccessionNumber = "ACC42"
    ds.SeriesDescription = "t1 axial"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 17
    ds.add(DataElement(0x00201208, "IS", "120"))  # Number of Study Related Instances
    info = inspect_dataset(encode(ds), ExplicitVRLittleEndian)
    assert info.modality == "MR"
    assert info.body_part == "HEAD"
    assert info.study_date == "20240229"
    assert info.accession_number == "ACC42"
    assert info.series_description == "t1 axial"
    assert info.series_number == "3"
    assert info.instance_number == "17"
    assert info.expected_study_instances == 120


@pytest.mark.parametrize("value", ["0", "-3", "many", ""])
def test_unusable_study_instance_count_is_ignored(value: str) -> None:
    ds = minimal()
    # Encoded as LO: pydicom refuses to hold "many" as IS; the parser reads the bytes anyway.
    add_raw(ds, 0x00201208, "LO", value.encode())
    info = inspect_dataset(encode(ds), ExplicitVRLittleEndian)
    assert info.expected_study_instances is None


def test_nested_attributes_are_not_mistaken_for_top_level_ones() -> None:
    # A Modality inside a sequence item must not be reported as the instance's modality.
    ds = minimal(Modality="SR")
    inner = minimal(Modality="CT", PatientID="OTHER")
    ds.ReferencedSeriesSequence = Sequence([inner])
    info = inspect_dataset(encode(ds), ExplicitVRLittleEndian)
    assert info.modality == "SR"
    assert info.patient_id == "PID-1"
