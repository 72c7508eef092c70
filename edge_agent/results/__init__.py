"""Results: immutable, versioned rows per (study, series, model); DICOM SR/SEG encodings."""
