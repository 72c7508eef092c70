"""Hospital edge agent: DICOM ingest, study assembly, and (later) inference and sync."""

__version__ = "0.1.0"
