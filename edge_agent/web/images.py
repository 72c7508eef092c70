"""Server-side slice rendering for the viewer: window/level presets and the AI overlay.

The image is the stored instance (any tier) with its modality LUT and a window preset; the
overlay is the frame of the result's DICOM SEG that references that instance (SEG frames
name their source instance in the per-frame Derivation Image sequence; slices without a
finding have no frame). Output: an 8-bit PNG, the mask blended in red.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

#: name -> (center, width); "auto" uses the image's own window, else its min..max
PRESETS: dict[str, tuple[float, float] | None] = {
    "auto": None,
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (300.0, 1500.0),
    "brain": (40.0, 80.0),
}


def _window(ds: Dataset, pixels: np.ndarray, preset: str) -> tuple[float, float]:
    chosen = PRESETS.get(preset)
    if chosen is not None:
        return chosen
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is not None and w is not None:
        c = c[0] if isinstance(c, pydicom.multival.MultiValue) else c
        w = w[0] if isinstance(w, pydicom.multival.MultiValue) else w
        return float(c), max(float(w), 1.0)
    lo, hi = float(pixels.min()), float(pixels.max())
    return (lo + hi) / 2, max(hi - lo, 1.0)


def render(ds: Dataset, *, preset: str = "auto", mask: np.ndarray | None = None) -> bytes:
    """PNG bytes of the first frame of ``ds`` windowed by ``preset``, ``mask`` in red."""
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = pixels[0]
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0
        )
        c, w = _window(ds, pixels, preset)
        grey = np.clip((pixels - (c - w / 2)) / w, 0, 1) * 255
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            grey = 255 - grey
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:
        rgb = pixels[..., :3]
    if mask is not None and mask.shape == rgb.shape[:2]:
        red = np.array([255.0, 40.0, 40.0])
        m = mask.astype(bool)
        rgb[m] = rgb[m] * 0.55 + red * 0.45
    out = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(out, format="PNG", optimize=False)
    return out.getvalue()


def seg_mask(seg_path: Path, sop_instance_uid: str) -> np.ndarray | None:
    """The SEG frame (all segments merged) that references ``sop_instance_uid``."""
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    merged: np.ndarray | None = None
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        refs = {
            str(src.ReferencedSOPInstanceUID)
            for d in fg.get("DerivationImageSequence", [])
            for src in d.get("SourceImageSequence", [])
        }
        if sop_instance_uid in refs:
            frame = frames[i].astype(bool)
            merged = frame if merged is None else (merged | frame)
    return merged
