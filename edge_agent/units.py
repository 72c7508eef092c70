"""Quantities as people read them (the CLI, job details, the demo)."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """A size in decimal units: ``512 B``, ``34.5 kB``, ``1.2 MB``, ``3.4 GB``, ``1.5 TB``."""
    value, unit = float(n), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
