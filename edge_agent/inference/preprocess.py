"""DICOM pixels -> model input, per the manifest's preprocessing.

Order: decode (compressed syntaxes via pylibjpeg; never on an association thread) ->
modality LUT (rescale slope/intercept or a Modality LUT Sequence) -> window (PS3.3
C.11.2.1.2.1 linear function, to 0..1) -> clip -> resize (bilinear) -> normalise
((x - mean) / std) -> channel replication. Output is float32 [C, H, W] per frame.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from edge_agent.errors import PermanentError
from hub_protocol.manifest import Preprocessing

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class UnsupportedPixels(PermanentError):
    """The instance's pixel data cannot be used by a model (colour, missing, undecodable)."""


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) mapped to [0, 1]."""
    if width < 1:
        raise ValueError("window width must be >= 1")
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0)


def resize_bilinear(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a 2-D array (half-pixel centres, like most imaging libraries)."""
    h, w = img.shape
    if (h, w) == (rows, cols):
        return img
    ys = np.clip((np.arange(rows) + 0.5) * h / rows - 0.5, 0, h - 1)
    xs = np.clip((np.arange(cols) + 0.5) * w / cols - 0.5, 0, w - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    out: np.ndarray = top * (1 - wy) + bottom * wy
    return out


def frames(ds: Dataset) -> Iterator[np.ndarray]:
    """Decoded frames of ``ds`` as stored values (2-D each). Raises UnsupportedPixels."""
    if "PixelData" not in ds:
        raise UnsupportedPixels("instance has no pixel data")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in GRAYSCALE or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedPixels(f"only grayscale images are supported, not {pi or 'unknown'}")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable data
        raise UnsupportedPixels(f"pixel data cannot be decoded: {exc}") from exc
    if arr.ndim == 2:
        yield arr
    else:
        yield from arr


def preprocess_frame(ds: Dataset, stored: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """One decoded frame of ``ds`` -> float32 [C, H, W]."""
    x = stored.astype(np.float32)
    if pre.modality_lut:
        if "ModalityLUTSequence" in ds:
            x = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        else:  # the common case, done in float32 (apply_modality_lut works in float64)
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            if slope != 1 or intercept != 0:
                x = x * np.float32(slope) + np.float32(intercept)
    if pre.window is not None:
        x = window_linear(x, *pre.window)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            x = 1.0 - x  # keep "brighter = denser" whatever the display polarity
    if pre.clip is not None:
        x = np.clip(x, *pre.clip)
    if pre.resize is not None:
        x = resize_bilinear(x, *pre.resize)
    if pre.normalize is not None:
        mean, std = pre.normalize
        x = (x - mean) / std
    out = np.repeat(x[None, :, :], pre.channels, axis=0)
    return out.astype(np.float32)


def preprocess_instance(ds: Dataset, pre: Preprocessing) -> list[np.ndarray]:
    """Every frame of ``ds`` preprocessed: a list of float32 [C, H, W]."""
    return [preprocess_frame(ds, f, pre) for f in frames(ds)]
