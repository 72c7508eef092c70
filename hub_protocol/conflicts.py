"""Conflict rules: what happens when an edge change and a cloud change meet.

A conflict is a change whose ``base_version`` is not the hub's current version of the
record. The rule is chosen per data type (configurable; defaults below):

===================  ==============  =====================================================
data type            default rule    outcome
===================  ==============  =====================================================
patient_data         manual_review   both versions kept in the review queue; nothing lost
study_metadata       timestamp_wins  the version with the later HLC
ai_results           cloud_wins      the hub's version
user_preferences     edge_wins       the edge's version
system_config        merge_fields    union of fields; a field changed on both sides takes
                                     the later per-field HLC
review               manual_review   as patient_data
===================  ==============  =====================================================

Pure functions over values, shared by the edge and the hub; property tests pin them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hub_protocol import HLC


class Rule(StrEnum):
    MANUAL_REVIEW = "manual_review"
    TIMESTAMP_WINS = "timestamp_wins"
    CLOUD_WINS = "cloud_wins"
    EDGE_WINS = "edge_wins"
    MERGE_FIELDS = "merge_fields"


DEFAULT_RULES: Mapping[str, Rule] = {
    "patient_data": Rule.MANUAL_REVIEW,
    "study_metadata": Rule.TIMESTAMP_WINS,
    "ai_results": Rule.CLOUD_WINS,
    "user_preferences": Rule.EDGE_WINS,
    "system_config": Rule.MERGE_FIELDS,
    "review": Rule.MANUAL_REVIEW,
}


class Outcome(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"
    MERGED = "merged"
    MANUAL = "manual"


@dataclass(frozen=True, kw_only=True)
class Version:
    """One side's version of a record. ``field_hlc``: when each field last changed (for
    merge_fields; absent fields default to ``hlc``)."""

    origin: str  # "edge" | "cloud"
    hlc: HLC
    fields: Mapping[str, Any]
    field_hlc: Mapping[str, HLC] = field(default_factory=dict)

    def changed_at(self, name: str) -> HLC:
        return self.field_hlc.get(name, self.hlc)


@dataclass(frozen=True)
class Resolution:
    outcome: Outcome
    value: Mapping[str, Any] | None  # None only for MANUAL: nothing is applied yet
    reason: str
    kept: tuple[Version, ...] = ()  # MANUAL: both versions, for the review queue


def is_conflict(base_version: int, current_version: int) -> bool:
    """A change based on anything but the current version conflicts (0 = created blind)."""
    return base_version != current_version


def resolve(
    data_type: str, edge: Version, cloud: Version, rules: Mapping[str, Rule] = DEFAULT_RULES
) -> Resolution:
    """Resolve a conflict between ``edge`` and ``cloud`` versions of a ``data_type`` record.

    Raises KeyError for a data type without a rule (a configuration error, never guessed).
    """
    rule = rules[data_type]
    if rule is Rule.CLOUD_WINS:
        return Resolution(Outcome.CLOUD, dict(cloud.fields), f"{data_type}: cloud wins")
    if rule is Rule.EDGE_WINS:
        return Resolution(Outcome.EDGE, dict(edge.fields), f"{data_type}: edge wins")
    if rule is Rule.TIMESTAMP_WINS:
        later = edge if edge.hlc > cloud.hlc else cloud
        return Resolution(
            Outcome(later.origin),
            dict(later.fields),
            f"{data_type}: later HLC {later.hlc} ({later.origin}) wins",
        )
    if rule is Rule.MERGE_FIELDS:
        merged: dict[str, Any] = {}
        for name in sorted(set(edge.fields) | set(cloud.fields)):
            if name not in cloud.fields:
                merged[name] = edge.fields[name]
            elif name not in edge.fields:
                merged[name] = cloud.fields[name]
            elif edge.fields[name] == cloud.fields[name]:
                merged[name] = edge.fields[name]
            else:
                src = edge if edge.changed_at(name) > cloud.changed_at(name) else cloud
                merged[name] = src.fields[name]
        return Resolution(Outcome.MERGED, merged, f"{data_type}: fields merged")
    return Resolution(
        Outcome.MANUAL, None, f"{data_type}: kept for manual review", kept=(edge, cloud)
    )
