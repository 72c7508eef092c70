"""The human-readable study report (HTML page and PDF) and the priors chart.

The report says what the Comprehensive SR says, from the same stored results: each current
result's model name, exact version and SHA-256, its findings and measurements, the critical
flag, and the review status of each finding (latest review wins; "not reviewed" otherwise).
It is marked as an AI output to be confirmed by a radiologist.

Priors: for a patient with earlier studies here, each segmentation measurement (total area,
volume) per study over time, drawn as a small inline SVG line chart (no JavaScript).
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

from fpdf import FPDF

NOTICE = (
    "AI-generated findings for decision support. Not a diagnosis: every finding must be "
    "confirmed by a radiologist."
)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def review_status(result: dict[str, Any]) -> dict[str, str]:
    """finding -> latest decision with reviewer ("not reviewed" when none)."""
    out = dict.fromkeys(result["finding_names"], "not reviewed")
    for v in result["reviews"]:
        if v["decision"] in ("accept", "reject"):
            verb = "accepted" if v["decision"] == "accept" else "rejected"
            out[v["finding"]] = f"{verb} by {v['username']} ({_when(v['created_at'])})"
    return out


def measurements(result: dict[str, Any]) -> list[tuple[str, str]]:
    f = result["findings"]
    if result["task"] == "segmentation":
        rows = [
            ("Finding", str(f.get("label", ""))),
            ("Slices with finding", f"{f.get('slices_with_finding')} of {f.get('slices')}"),
            ("Total area", f"{f.get('area_mm2_total')} mm2"),
            ("Largest slice area", f"{f.get('max_slice_area_mm2')} mm2"),
            ("Mean intensity", str(f.get("mean_intensity"))),
        ]
        if f.get("volume_mm3") is not None:
            rows.append(("Volume", f"{f['volume_mm3']} mm3"))
        return rows
    probs = f.get("probabilities", {})
    return [("Top label", str(f.get("top_label", "")))] + [
        (label, f"{p:.3f}") for label, p in sorted(probs.items())
    ]


def priors_svg(points: list[dict[str, Any]], key: str, current: str, *, w: int = 420) -> str:
    """A line chart of ``key`` per study (the current study's point ringed). Every text
    from the data is HTML-escaped here: the result is inserted into the page as markup."""
    pts = [p for p in points if isinstance(p.get(key), int | float)]
    if len(pts) < 2:
        return ""
    h, pad = 160, 36
    values = [float(p[key]) for p in pts]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    xs = [pad + i * (w - 2 * pad) / (len(pts) - 1) for i in range(len(pts))]
    ys = [h - pad - (v - lo) / span * (h - 2 * pad) for v in values]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    dots = []
    for p, x, y, v in zip(pts, xs, ys, values, strict=True):
        ring = ' stroke="#c62828" stroke-width="3"' if p["study_uid"] == current else ""
        label = html.escape(str(p["study_date"] or _when(p["received_at"])[:10]))
        dots.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#1f3a5f"{ring}>'
            f"<title>{label}: {v:g}</title></circle>"
            f'<text x="{x:.1f}" y="{h - 10}" font-size="10" text-anchor="middle">{label}</text>'
            f'<text x="{x:.1f}" y="{y - 8:.1f}" font-size="10" text-anchor="middle">{v:g}</text>'
        )
    return (
        f'<svg class="priors" data-key="{html.escape(key)}" width="{w}" height="{h}" role="img" '
        f'viewBox="0 0 {w} {h}"><polyline fill="none" stroke="#1f3a5f" stroke-width="2" '
        f'points="{line}"/>{"".join(dots)}</svg>'
    )


def pdf(detail: dict[str, Any], *, site: str) -> bytes:
    """The report as PDF (core fonts: text is reduced to Latin-1)."""

    def t(text: Any) -> str:
        return str(text).encode("latin-1", "replace").decode("latin-1")

    doc = FPDF(format="A4")
    doc.set_auto_page_break(auto=True, margin=15)
    doc.add_page()
    doc.set_font("Helvetica", "B", 16)
    doc.cell(0, 10, t("AI findings report"), new_x="LMARGIN", new_y="NEXT")
    doc.set_font("Helvetica", "", 10)
    for label, value in (
        ("Patient", f"{detail['patient_name']} ({detail['patient_id']})"),
        ("Study", f"{detail['modality']} {detail['study_date']} {detail['description']}"),
        ("Accession", detail["accession_number"] or "-"),
        ("Study UID", detail["study_uid"]),
        ("Received", _when(detail["received_at"])),
        ("Site", site),
    ):
        doc.cell(30, 6, t(label), new_x="RIGHT", new_y="TOP")
        doc.cell(0, 6, t(value), new_x="LMARGIN", new_y="NEXT")
    doc.ln(2)
    doc.set_font("Helvetica", "I", 9)
    doc.multi_cell(0, 5, t(NOTICE))
    if not detail["results"]:
        doc.set_font("Helvetica", "", 10)
        doc.cell(0, 8, t("No AI results for this study."), new_x="LMARGIN", new_y="NEXT")
    for r in detail["results"]:
        doc.ln(3)
        doc.set_font("Helvetica", "B", 12)
        flag = "   CRITICAL" if r["critical"] else ""
        doc.cell(
            0, 8, t(f"{r['model_name']} {r['model_version']}{flag}"), new_x="LMARGIN", new_y="NEXT"
        )
        doc.set_font("Helvetica", "", 8)
        doc.cell(
            0,
            5,
            t(f"model sha256 {r['model_sha256']} on {r['provider']}"),
            new_x="LMARGIN",
            new_y="NEXT",
        )
        doc.set_font("Helvetica", "", 10)
        for label, value in measurements(r):
            doc.cell(55, 6, t(label), new_x="RIGHT", new_y="TOP")
            doc.cell(0, 6, t(value), new_x="LMARGIN", new_y="NEXT")
        for finding, status in review_status(r).items():
            doc.cell(55, 6, t(f"Review: {finding}"), new_x="RIGHT", new_y="TOP")
            doc.cell(0, 6, t(status), new_x="LMARGIN", new_y="NEXT")
    return bytes(doc.output())
