"""Completeness rules, as pure functions so property tests can pin them."""

from __future__ import annotations

from enum import StrEnum


class CompleteReason(StrEnum):
    EXPECTED_COUNT = "expected_count"
    QUIET_PERIOD = "quiet_period"


def completion_reason(
    *,
    now: float,
    last_received_at: float,
    quiet_period_s: float,
    instance_count: int,
    expected_instances: int | None,
) -> CompleteReason | None:
    """Why a RECEIVING study is complete at ``now``, or None if it is not (yet).

    Complete when the expected instance count is met, or when nothing arrived for
    ``quiet_period_s`` seconds. A clock that went backwards (``now < last_received_at``) never
    completes a study by quiet period; the worker re-bases such studies on ``now``.
    """
    if (
        expected_instances is not None
        and expected_instances > 0
        and (instance_count >= expected_instances)
    ):
        return CompleteReason.EXPECTED_COUNT
    if now >= last_received_at and now - last_received_at >= quiet_period_s:
        return CompleteReason.QUIET_PERIOD
    return None
