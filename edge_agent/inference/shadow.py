"""Shadow mode: how far a candidate version agrees with the active one on live series.

A shadow version is installed and self-tested like any other, but never activated: after the
active version has run a job, the shadow runs on the same series and its output is compared
with the active version's; nothing it computes is stored as a result, sent to PACS or to the
hub. Only the comparison is kept (``shadow_runs``) and the agreement rate is reported to the
hub, so ops can decide to promote it with evidence from their own sites.

Agreement per series:

- segmentation: Dice coefficient of the two thresholded masks over the whole series (both
  empty = 1.0); the masks must have the same shape;
- classification: the fraction of instances whose top-1 label (by name, so a version that
  reorders or adds labels is still comparable) is the same.

A series *agrees* when its score is at least ``inference.shadow_agreement``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hub_protocol.manifest import Manifest


class ShadowMismatch(ValueError):
    """The two outputs cannot be compared (different task or mask shape)."""


def _masks(manifest: Manifest, out: np.ndarray) -> np.ndarray:
    m = np.asarray(out)
    return m.reshape(m.shape[0], m.shape[-2], m.shape[-1]) >= manifest.output.threshold


def score(active: Manifest, a_out: np.ndarray, shadow: Manifest, s_out: np.ndarray) -> float:
    """Agreement score in [0, 1] of two outputs for the same series."""
    if active.task != shadow.task:
        raise ShadowMismatch(f"tasks differ ({active.task} vs {shadow.task})")
    if active.task == "segmentation":
        a, s = _masks(active, a_out), _masks(shadow, s_out)
        if a.shape != s.shape:
            raise ShadowMismatch(f"mask shapes differ ({a.shape} vs {s.shape})")
        total = int(a.sum()) + int(s.sum())
        return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, s).sum()) / total
    a2 = np.asarray(a_out).reshape(len(a_out), -1)
    s2 = np.asarray(s_out).reshape(len(s_out), -1)
    if len(a2) != len(s2):
        raise ShadowMismatch(f"instance counts differ ({len(a2)} vs {len(s2)})")
    if not len(a2):
        return 1.0
    a_top = [active.output.labels[i] for i in np.argmax(a2, axis=1)]
    s_top = [shadow.output.labels[i] for i in np.argmax(s2, axis=1)]
    return float(sum(x == y for x, y in zip(a_top, s_top, strict=True)) / len(a_top))


@dataclass(frozen=True)
class Agreement:
    name: str
    version: str
    series: int
    agreeing: int
    errors: int
    mean_score: float

    @property
    def rate(self) -> float:
        return self.agreeing / self.series if self.series else 0.0

    def summary(self) -> str:
        if not self.series:
            return "shadow: no series compared yet"
        return (
            f"shadow: agreement {self.rate:.3f} over {self.series} series "
            f"({self.agreeing} agree, {self.errors} shadow errors, "
            f"mean score {self.mean_score:.3f})"
        )
