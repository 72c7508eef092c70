"""Times and names as people see them: one labelled site zone, ISO dates, ``Family, Given``."""

from __future__ import annotations

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.times import SiteTime, dicom_date, local_zone_name, person_name

JAN_1_2026 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
JUL_1_2026 = 1_782_864_000.0  # 2026-07-01T00:00:00Z


def test_stamps_are_24_hour_in_the_site_zone_and_labelled() -> None:
    warsaw = SiteTime.named("Europe/Warsaw")
    assert warsaw.stamp(JAN_1_2026 + 13 * 3600 + 5) == "2026-01-01 14:00:05 Europe/Warsaw"
    assert warsaw.stamp(JUL_1_2026 + 13 * 3600) == "2026-07-01 15:00:00 Europe/Warsaw"  # DST
    assert warsaw.stamp(JAN_1_2026, seconds=False) == "2026-01-01 01:00 Europe/Warsaw"
    assert warsaw.bare(JAN_1_2026) == "2026-01-01 01:00:00"
    assert warsaw.clock(JAN_1_2026 + 13 * 3600) == "14:00:00 Europe/Warsaw"
    assert SiteTime.named("UTC").stamp(JAN_1_2026) == "2026-01-01 00:00:00 UTC"
    assert warsaw.stamp(None) == "-" and warsaw.bare(0) == "-"


def test_an_empty_zone_is_the_machines_named_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    assert local_zone_name() == "America/New_York"
    assert SiteTime.named("").stamp(JAN_1_2026) == "2025-12-31 19:00:00 America/New_York"
    monkeypatch.setenv("TZ", "not/a zone")
    assert local_zone_name() != "not/a zone"  # falls back to what the system says, else UTC


def test_the_zone_is_a_validated_setting() -> None:
    base = {"EDGE_DICOM_ALLOW_ANY_CALLER": "true"}
    assert load_config(None, env=base).site.time_zone == ""
    cfg = load_config(None, env={**base, "EDGE_SITE_TIME_ZONE": "Europe/Warsaw"})
    assert cfg.site.time_zone == "Europe/Warsaw"
    with pytest.raises(ConfigError) as err:
        load_config(None, env={**base, "EDGE_SITE_TIME_ZONE": "Mars/Olympus"})
    assert err.value.field == "site.time_zone"
    assert "site.time_zone" in str(err.value)


@pytest.mark.parametrize(
    ("da", "shown"),
    [("20260105", "2026-01-05"), ("", "-"), ("2026", "2026"), ("20261399", "20261399")],
)
def test_dicom_dates_are_iso(da: str, shown: str) -> None:
    assert dicom_date(da) == shown


@pytest.mark.parametrize(
    ("pn", "shown"),
    [
        ("Żółkiewski^Łukasz", "Żółkiewski, Łukasz"),
        ("DOE^JANE^Q^Dr.^Jr.", "DOE, Dr. JANE Q, Jr."),
        ("DOE", "DOE"),
        ("DOE^", "DOE"),
        ("^JANE", "JANE"),
        ("Yamada^Tarou=山田^太郎", "Yamada, Tarou"),
        ("", ""),
    ],
)
def test_person_names_are_family_comma_given(pn: str, shown: str) -> None:
    assert person_name(pn) == shown
