"""Model outputs -> findings (JSON-able), critical flag.

Segmentation: per-slice mask area (mm², from Pixel Spacing, scaled back if the input was
resized), perimeter (mm, 4-connected boundary edges), mean intensity inside the mask (in the
model's input units, e.g. HU), and volume (mm³, areas x slice spacing) when slice positions
allow. Classification: per-instance probabilities and their mean over the series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from hub_protocol.manifest import Manifest


@dataclass(frozen=True)
class Findings:
    findings: dict[str, Any]
    critical: bool


def pixel_area_mm2(ds: Dataset, rows: int, cols: int) -> float | None:
    """Area of one pixel of a ``rows`` x ``cols`` output for ``ds`` (None if unknown)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing:
        return None
    dy, dx = float(spacing[0]), float(spacing[1])
    return dy * (int(ds.Rows) / rows) * dx * (int(ds.Columns) / cols)


def slice_spacing_mm(dss: Sequence[Dataset]) -> float | None:
    """Distance between consecutive slices: median of position differences along the normal,
    else Spacing Between Slices, else Slice Thickness."""
    zs = []
    for ds in dss:
        pos = ds.get("ImagePositionPatient")
        if pos is not None and len(pos) == 3:
            zs.append(float(pos[2]))
    if len(zs) == len(dss) and len(zs) > 1:
        diffs = np.abs(np.diff(sorted(zs)))
        diffs = diffs[diffs > 1e-6]
        if diffs.size:
            return float(np.median(diffs))
    if not dss:
        return None
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = dss[0].get(key)
        if value:
            return float(value)
    return None


def perimeter_px(mask: np.ndarray) -> int:
    """4-connected boundary edges of a binary 2-D mask (pixel-edge count)."""
    m = np.pad(mask.astype(bool), 1)
    return int((m[1:, :] != m[:-1, :]).sum() + (m[:, 1:] != m[:, :-1]).sum())


def segmentation_findings(
    manifest: Manifest, dss: Sequence[Dataset], inputs: Sequence[np.ndarray], masks: np.ndarray
) -> Findings:
    """``masks``: [N, 1, H, W] (or [N, H, W]) probabilities/binary; ``inputs``: the
    preprocessed [C, H, W] items (for mean intensity)."""
    label = manifest.output.labels[0]
    thr = manifest.output.threshold
    m = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]) >= thr
    per_slice: list[dict[str, Any]] = []
    total_area = 0.0
    known = True
    inside_sum, inside_n = 0.0, 0
    for ds, x, mk in zip(dss, inputs, m, strict=True):
        px = pixel_area_mm2(ds, mk.shape[0], mk.shape[1])
        n = int(mk.sum())
        area = n * px if px is not None else None
        edge = (px**0.5) if px is not None else None
        per_slice.append(
            {
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "pixels": n,
                "area_mm2": round(area, 3) if area is not None else None,
                "perimeter_mm": round(perimeter_px(mk) * edge, 3) if edge is not None else None,
            }
        )
        if area is None:
            known = False
        else:
            total_area += area
        if n:
            inside_sum += float(x[0][mk].sum())
            inside_n += n
    spacing = slice_spacing_mm(dss)
    areas = [float(s["area_mm2"]) for s in per_slice if s["area_mm2"] is not None]
    max_area = max(areas) if areas else None
    volume = total_area * spacing if (known and spacing is not None and len(dss) > 1) else None
    findings: dict[str, Any] = {
        "label": label,
        "slices": len(dss),
        "slices_with_finding": sum(1 for s in per_slice if s["pixels"]),
        "area_mm2_total": round(total_area, 3) if known else None,
        "max_slice_area_mm2": round(max_area, 3) if max_area is not None else None,
        "volume_mm3": round(volume, 3) if volume is not None else None,
        "mean_intensity": round(inside_sum / inside_n, 3) if inside_n else None,
        "slice_spacing_mm": spacing,
        "per_slice": per_slice,
    }
    limit = manifest.output.critical.get(label)
    critical = limit is not None and max_area is not None and max_area >= limit
    return Findings(findings, critical)


def classification_findings(
    manifest: Manifest, dss: Sequence[Dataset], probs: np.ndarray
) -> Findings:
    """``probs``: [N, classes]; softmax is applied here only if the manifest says the model
    outputs logits (activation none)."""
    p = probs.astype(np.float64)
    if manifest.output.activation == "none":
        e = np.exp(p - p.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    elif manifest.output.activation == "sigmoid":
        p = 1 / (1 + np.exp(-p))
    labels = manifest.output.labels
    mean = p.mean(axis=0)
    findings: dict[str, Any] = {
        "probabilities": {lab: round(float(v), 6) for lab, v in zip(labels, mean, strict=True)},
        "top_label": labels[int(np.argmax(mean))],
        "instances": len(dss),
        "per_instance": [
            {
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "probabilities": [round(float(v), 6) for v in row],
            }
            for ds, row in zip(dss, p, strict=True)
        ],
    }
    critical = any(
        float(mean[labels.index(lab)]) >= thr for lab, thr in manifest.output.critical.items()
    )
    return Findings(findings, critical)
