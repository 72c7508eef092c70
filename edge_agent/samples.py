"""Synthetic sample studies for the demo, tests and benchmarks (no patient data, no downloads).

A CT study is a stack of 512x512 (or smaller) slices of a water-filled cylinder in air with
a denser sphere in it (a "lesion", useful to later segmentation models); an MR study is a
stack of small 64x64 slices. Every file is a valid DICOM Part 10 file in Explicit VR Little
Endian, with fresh UIDs derived from a seed so runs are reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from edge_agent.studies.ingest import IMPLEMENTATION_CLASS_UID

UID_ROOT = "2.25."


def seeded_uid(*parts: object) -> str:
    """A deterministic 2.25 UID from ``parts`` (max 64 characters)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class SampleStudy:
    study_uid: str
    series_uid: str
    modality: str
    files: tuple[Path, ...]


def make_study(
    out_dir: Path,
    *,
    modality: str = "CT",
    slices: int = 20,
    size: int = 512,
    seed: str = "demo",
    patient_id: str = "DEMO001",
    patient_name: str = "DEMO^PATIENT",
    study_date: str = "20261125",
    expected_instances: int | None = None,
) -> SampleStudy:
    """Write one single-series study of ``slices`` images (``size`` x ``size``) to ``out_dir``.
    A ``patient_name`` outside Latin-1 is written in UTF-8 (ISO_IR 192)."""
    modality = modality.upper()
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = seeded_uid(seed, "study")
    series_uid = seeded_uid(seed, "series")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    files = []
    try:
        patient_name.encode("latin-1")
        charset = "ISO_IR 100"
    except UnicodeEncodeError:
        charset = "ISO_IR 192"
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r2 = (xx - c) ** 2 + (yy - c) ** 2
    for i in range(slices):
        z = (i - slices / 2) / max(slices / 2, 1)
        if modality == "CT":
            img = np.full((size, size), -1000.0, dtype=np.float32)  # air
            img[r2 <= (0.42 * size) ** 2] = 0.0  # water cylinder
            lesion_r = 0.12 * size * max(0.0, 1 - z * z * 4) ** 0.5
            lc = (c + 0.1 * size, c - 0.08 * size)
            img[(xx - lc[0]) ** 2 + (yy - lc[1]) ** 2 <= lesion_r**2] = 60.0  # soft-tissue lesion
            img += rng.normal(0, 8, (size, size)).astype(np.float32)
            pixels = np.clip(img + 1024, 0, 4095).astype(np.uint16)  # stored = HU + 1024
        else:
            img = 400 * np.exp(-r2 / (2 * (0.3 * size) ** 2)) * (1 - 0.3 * abs(z))
            img += rng.normal(0, 10, (size, size))
            pixels = np.clip(img, 0, 4095).astype(np.uint16)
        sop_uid = seeded_uid(seed, "instance", i)
        ds = Dataset()
        ds.SpecificCharacterSet = charset
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = UID(sop_uid)
        ds.StudyDate = study_date
        ds.StudyTime = "120000"
        ds.AccessionNumber = f"ACC{seed[:10]}"
        ds.Modality = modality
        ds.Manufacturer = "EdgeAgent Synthetic"
        ds.StudyDescription = f"Synthetic {modality} study"
        ds.SeriesDescription = f"Synthetic {modality} series"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
        ds.SliceThickness = "2.5"
        ds.StudyInstanceUID = UID(study_uid)
        ds.SeriesInstanceUID = UID(series_uid)
        ds.StudyID = "1"
        ds.SeriesNumber = "1"
        ds.InstanceNumber = str(i + 1)
        ds.ImagePositionPatient = [0.0, 0.0, round(i * 2.5, 2)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = UID(seeded_uid(seed, "frame"))
        if expected_instances is not None:
            ds.NumberOfStudyRelatedInstances = str(expected_instances)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [0.7, 0.7]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if modality == "CT":
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
        ds.PixelData = pixels.tobytes()
        ds.file_meta = _file_meta(sop_class, sop_uid)
        path = out_dir / f"{modality}_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return SampleStudy(study_uid, series_uid, modality, tuple(files))


def make_multiframe(path: Path, megabytes: int, *, size: int = 512, seed: str = "mf") -> Path:
    """One synthetic multiframe MR instance of about ``megabytes`` MB of 16-bit pixel data
    (``size`` x ``size`` frames), for large-instance tests and benchmarks."""
    frames = max(1, megabytes * 10**6 // (size * size * 2))
    sop_uid = seeded_uid(seed, "instance", megabytes)
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyInstanceUID = UID(seeded_uid(seed, "study"))
    ds.SeriesInstanceUID = UID(seeded_uid(seed, "series"))
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "SYNTHETIC^MULTIFRAME", "DEMO-MF"
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    ds.PixelData = rng.integers(0, 4096, frames * size * size, dtype=np.uint16).tobytes()
    ds.file_meta = _file_meta(MRImageStorage, sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    return meta
