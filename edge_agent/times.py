"""How the agent shows times and dates to people: in one site time zone, always labelled.

Stored times are seconds since the Unix epoch (UTC). People see them in the site zone
(``site.time_zone``; empty = this machine's zone), 24-hour, with the zone's name beside them
(``2026-01-05 14:30:00 Europe/Warsaw``), on every surface: worklist, study page, reports, CLI.
DICOM dates (DA, ``YYYYMMDD``) carry no zone: they are the modality's local date and are
shown as ISO dates (``2026-01-05``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_ZONEINFO_DIRS = ("/usr/share/zoneinfo/", "/usr/lib/zoneinfo/", "/usr/share/lib/zoneinfo/")


def local_zone_name() -> str:
    """The IANA name of this machine's time zone: ``$TZ`` if it names one, else
    ``/etc/timezone``, else where ``/etc/localtime`` links to; ``"UTC"`` when none says."""
    candidates = [os.environ.get("TZ", "").removeprefix(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text(encoding="utf-8").strip())
    try:
        target = str(Path("/etc/localtime").resolve())
    except OSError:
        target = ""
    for base in _ZONEINFO_DIRS:
        if target.startswith(base):
            candidates.append(target.removeprefix(base))
    for name in candidates:
        if name and _known(name):
            return "UTC" if name in ("Etc/UTC", "Etc/Universal", "UCT", "Zulu") else name
    return "UTC"


def _known(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def check_zone_name(name: str) -> str | None:
    """Why ``name`` is not a usable time zone (``None`` if it is; empty means local)."""
    if not name or _known(name):
        return None
    return f"not an IANA time zone name (e.g. Europe/Warsaw, UTC): {name!r}"


@dataclass(frozen=True)
class SiteTime:
    """Formats times in one zone, labelled with its name. Build with :meth:`named`."""

    name: str
    zone: ZoneInfo

    @classmethod
    def named(cls, name: str) -> SiteTime:
        """The zone ``name`` (IANA, e.g. ``Europe/Warsaw``; empty = this machine's zone).
        Raises ``ValueError`` for an unknown name (config validation reports it first)."""
        resolved = name or local_zone_name()
        try:
            return cls(resolved, ZoneInfo(resolved))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {resolved!r}") from exc

    def local(self, ts: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(ts, self.zone)

    def stamp(self, ts: float | None, *, seconds: bool = True) -> str:
        """``2026-01-05 14:30:00 Europe/Warsaw`` (24-hour); ``-`` for no time."""
        if not ts:
            return "-"
        return f"{self.local(ts).strftime(self._fmt(seconds))} {self.name}"

    def bare(self, ts: float | None, *, seconds: bool = True) -> str:
        """The same without the zone label, for a column whose header names the zone."""
        if not ts:
            return "-"
        return self.local(ts).strftime(self._fmt(seconds))

    def clock(self, ts: float) -> str:
        """``14:30:05 Europe/Warsaw``: a time of day (e.g. "updated ...")."""
        return f"{self.local(ts).strftime('%H:%M:%S')} {self.name}"

    @staticmethod
    def _fmt(seconds: bool) -> str:
        return "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"


def dicom_date(da: str | None) -> str:
    """A DICOM DA (``YYYYMMDD``) as ISO (``YYYY-MM-DD``); a value that is not one is shown as
    it is, and an empty one as ``-``."""
    value = (da or "").strip()
    if len(value) == 8 and value.isdigit():
        try:
            return dt.date(int(value[:4]), int(value[4:6]), int(value[6:])).isoformat()
        except ValueError:
            return value
    return value or "-"


def dicom_date_ordinal(da: str | None) -> int | None:
    """Days since 0001-01-01 of a DICOM DA, or ``None`` when it is not a valid date."""
    iso = dicom_date(da)
    try:
        return dt.date.fromisoformat(iso).toordinal()
    except ValueError:
        return None


def person_name(pn: str | None) -> str:
    """A DICOM PN for people: ``Family^Given^Middle^Prefix^Suffix`` -> ``Family, Prefix Given
    Middle, Suffix`` (only the alphabetic group; empty parts left out). A name without a
    ``^`` is returned as it is."""
    value = (pn or "").split("=", 1)[0].strip()
    if "^" not in value:
        return value
    parts = [p.strip() for p in value.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    rest = " ".join(p for p in (prefix, given, middle) if p)
    out = ", ".join(p for p in (family, rest) if p)
    return f"{out}, {suffix}" if suffix else out
