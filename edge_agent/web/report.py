"""The human-readable study report (HTML page and PDF) and the priors chart.

The report says what the Comprehensive SR says, from the same stored results: each current
result's model name, exact version and SHA-256, its findings and measurements (areas in mm²,
volumes in mL, mean intensity in HU for CT only), the critical flag, the review status of
each finding (latest accept/reject wins; "not reviewed" otherwise) and every review comment.
It is marked as an AI output to be confirmed by a radiologist. Names are shown as
``Family, Given``, DICOM dates as ISO dates, and times in the site zone with its name
(:class:`~edge_agent.times.SiteTime`). Every PDF page carries "page N of M" and the time the
report was generated. The PDF embeds DejaVu Sans (the TTF matplotlib ships), so any name in
Latin, Greek or Cyrillic script renders as it is.

Priors: for a patient with earlier studies here, each segmentation measurement (total area,
volume) per study over time, drawn as a small inline SVG line chart (no JavaScript).
"""

from __future__ import annotations

import html
import importlib.util
from pathlib import Path
from typing import Any

from fpdf import FPDF

from edge_agent.times import SiteTime, dicom_date, person_name

NOTICE = (
    "AI-generated findings for decision support. Not a diagnosis: every finding must be "
    "confirmed by a radiologist."
)
FONT = "DejaVuSans"


def font_dir() -> Path:
    """The folder of the DejaVu Sans TTFs shipped inside the matplotlib wheel (found without
    importing matplotlib). Raises ``FileNotFoundError`` when it is not installed."""
    spec = importlib.util.find_spec("matplotlib")
    for base in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(base) / "mpl-data" / "fonts" / "ttf"
        if (folder / f"{FONT}.ttf").is_file():
            return folder
    raise FileNotFoundError("DejaVu Sans not found: the matplotlib package is not installed")


def area(mm2: Any) -> str:
    """An area in mm² (one decimal)."""
    return "-" if not isinstance(mm2, int | float) else f"{mm2:,.1f} mm²"


def volume(mm3: Any) -> str:
    """A volume given in mm³, shown in mL with about three significant digits."""
    if not isinstance(mm3, int | float):
        return "-"
    ml = mm3 / 1000.0
    digits = 0 if abs(ml) >= 100 else 1 if abs(ml) >= 10 else 2 if abs(ml) >= 1 else 3
    return f"{ml:,.{digits}f} mL"


def result_modality(detail: dict[str, Any], result: dict[str, Any]) -> str:
    """The modality of the series a result was computed on (else the study's)."""
    for se in detail["series"]:
        if se["series_uid"] == result["series_uid"] and se["modality"]:
            return str(se["modality"])
    return str(detail["modality"])


def review_status(result: dict[str, Any], times: SiteTime) -> dict[str, str]:
    """finding -> latest decision with reviewer ("not reviewed" when none)."""
    out = dict.fromkeys(result["finding_names"], "not reviewed")
    for v in result["reviews"]:
        if v["decision"] in ("accept", "reject"):
            verb = "accepted" if v["decision"] == "accept" else "rejected"
            out[v["finding"]] = (
                f"{verb} by {v['username']} ({times.stamp(v['created_at'], seconds=False)})"
            )
    return out


def review_comments(result: dict[str, Any], times: SiteTime) -> list[tuple[str, str]]:
    """(finding, "user (time): text") for every review that carries a comment, oldest
    first (a comment given with an accept or reject too)."""
    return [
        (
            str(v["finding"]),
            f"{v['username']} ({times.stamp(v['created_at'], seconds=False)}): {v['comment']}",
        )
        for v in result["reviews"]
        if v.get("comment")
    ]


def measurements(result: dict[str, Any], modality: str) -> list[tuple[str, str]]:
    """(label, value with unit) rows of a result; ``modality`` of its series decides whether
    the mean intensity is in HU (CT) or unitless (the stored pixel values)."""
    f = result["findings"]
    if result["task"] == "segmentation":
        mean = f.get("mean_intensity")
        rows = [
            ("Finding", str(f.get("label", ""))),
            ("Slices with finding", f"{f.get('slices_with_finding')} of {f.get('slices')}"),
            ("Total area", area(f.get("area_mm2_total"))),
            ("Largest slice area", area(f.get("max_slice_area_mm2"))),
        ]
        if f.get("volume_mm3") is not None:
            rows.append(("Volume", volume(f["volume_mm3"])))
        rows.append(
            (
                "Mean intensity (HU)" if modality.upper() == "CT" else "Mean intensity",
                f"{mean:.1f}" if isinstance(mean, int | float) else "-",
            )
        )
        return rows
    probs = f.get("probabilities", {})
    return [("Top label", str(f.get("top_label", "")))] + [
        (label, f"{p:.3f}") for label, p in sorted(probs.items())
    ]


def header_rows(detail: dict[str, Any], times: SiteTime) -> list[tuple[str, str]]:
    """The patient and study lines of the report."""
    return [
        ("Patient", f"{person_name(detail['patient_name']) or '-'} ({detail['patient_id']})"),
        (
            "Study",
            f"{detail['modality']} {dicom_date(detail['study_date'])} {detail['description']}",
        ),
        ("Accession", detail["accession_number"] or "-"),
        ("Study UID", detail["study_uid"]),
        ("Received", times.stamp(detail["received_at"])),
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
        label = html.escape(dicom_date(p["study_date"]))
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


class _Report(FPDF):
    """An A4 report whose footer says where and when it was made, and "page N of M"."""

    def __init__(self, footer: str) -> None:
        super().__init__(format="A4")
        self._footer = footer
        folder = font_dir()
        for style, name in (("", FONT), ("B", f"{FONT}-Bold"), ("I", f"{FONT}-Oblique")):
            self.add_font(FONT, style, str(folder / f"{name}.ttf"))

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(FONT, "", 8)
        text = f"{self._footer} · page {self.page_no()} of {{nb}}"
        self.cell(0, 6, text, align="C")


def pdf(detail: dict[str, Any], *, site: str, times: SiteTime, now: float) -> bytes:
    """The report as PDF; ``now`` (epoch seconds) is printed as its generation time."""
    doc = _Report(f"{site} · generated {times.stamp(now, seconds=False)}")
    doc.set_auto_page_break(auto=True, margin=18)
    doc.add_page()
    doc.set_font(FONT, "B", 16)
    doc.cell(0, 10, "AI findings report", new_x="LMARGIN", new_y="NEXT")
    doc.set_font(FONT, "", 10)
    for label, value in [*header_rows(detail, times), ("Site", site)]:
        doc.cell(30, 6, label, new_x="RIGHT", new_y="TOP")
        doc.multi_cell(0, 6, value, new_x="LMARGIN", new_y="NEXT")
    doc.ln(2)
    doc.set_font(FONT, "I", 9)
    doc.multi_cell(0, 5, NOTICE, new_x="LMARGIN", new_y="NEXT")
    if not detail["results"]:
        doc.set_font(FONT, "", 10)
        doc.cell(0, 8, "No AI results for this study.", new_x="LMARGIN", new_y="NEXT")
    for r in detail["results"]:
        doc.ln(3)
        doc.set_font(FONT, "B", 12)
        flag = "   CRITICAL" if r["critical"] else ""
        title = f"{r['model_name']} {r['model_version']}{flag}"
        doc.cell(0, 8, title, new_x="LMARGIN", new_y="NEXT")
        doc.set_font(FONT, "", 8)
        doc.multi_cell(
            0,
            5,
            f"model sha256 {r['model_sha256']} on {r['provider']}, "
            f"{times.stamp(r['created_at'], seconds=False)}",
            new_x="LMARGIN",
            new_y="NEXT",
        )
        doc.set_font(FONT, "", 10)
        rows = [
            *measurements(r, result_modality(detail, r)),
            *((f"Review: {f}", st) for f, st in review_status(r, times).items()),
            *((f"Comment: {f}", text) for f, text in review_comments(r, times)),
        ]
        for label, value in rows:
            doc.cell(55, 6, label, new_x="RIGHT", new_y="TOP")
            doc.multi_cell(0, 6, value, new_x="LMARGIN", new_y="NEXT")
    return bytes(doc.output())
