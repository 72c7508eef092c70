"""Which models apply to which series: the manifest's routing rule against series facts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hub_protocol.manifest import RoutingRule


@dataclass(frozen=True, kw_only=True)
class SeriesFacts:
    """What routing looks at, for one series."""

    series_uid: str
    modality: str
    body_part: str
    sop_classes: frozenset[str]
    series_description: str
    rows: int
    columns: int
    slices: int


def matches(rule: RoutingRule, s: SeriesFacts) -> bool:
    """True if every condition present in ``rule`` holds for ``s`` (absent = any)."""
    if rule.modality and s.modality.upper() not in rule.modality:
        return False
    if rule.body_part and s.body_part.upper() not in rule.body_part:
        return False
    if rule.sop_class and not (s.sop_classes & set(rule.sop_class)):
        return False
    if rule.series_description is not None and not re.search(
        rule.series_description, s.series_description, flags=re.IGNORECASE
    ):
        return False
    if rule.min_rows is not None and s.rows < rule.min_rows:
        return False
    if rule.min_columns is not None and s.columns < rule.min_columns:
        return False
    if rule.min_slices is not None and s.slices < rule.min_slices:
        return False
    return rule.max_slices is None or s.slices <= rule.max_slices
