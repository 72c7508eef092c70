"""The assembly worker: moves RECEIVING studies to COMPLETE by the completeness rules.

Everything it needs is in the database, so after a crash it simply carries on: a study whose
quiet period passed while the agent was down completes on the first tick after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from edge_agent.clock import Clock
from edge_agent.config import StudiesConfig
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from edge_agent.studies.rules import completion_reason
from edge_agent.studies.store import complete_study, rebase_study_clock, receiving_studies

log = logging.getLogger(__name__)

#: A wall clock this far behind a study's last arrival is treated as having jumped back.
CLOCK_SKEW_TOLERANCE_S = 1.0


class AssemblyWorker:
    def __init__(self, cfg: StudiesConfig, *, store: Store, clock: Clock, metrics: Metrics) -> None:
        self._cfg = cfg
        self._store = store
        self._clock = clock
        self._metrics = metrics

    def tick(self) -> int:
        """One pass over RECEIVING studies; returns how many became COMPLETE."""
        now = self._clock.now()
        completed = 0
        with self._store.read() as conn:
            studies = receiving_studies(conn)
        for row in studies:
            uid, last = str(row["study_uid"]), float(row["last_received_at"])
            if now < last - CLOCK_SKEW_TOLERANCE_S:
                if self._store.writer.call(
                    partial(rebase_study_clock, study_uid=uid, seen_last_received_at=last, now=now)
                ):
                    log.warning(
                        "wall clock went backwards; quiet period restarted",
                        extra={"study_uid": uid, "behind_s": round(last - now, 3)},
                    )
                continue
            reason = completion_reason(
                now=now,
                last_received_at=last,
                quiet_period_s=self._cfg.quiet_period_for(str(row["modality"])),
                instance_count=int(row["instance_count"]),
                expected_instances=row["expected_instances"],
            )
            if reason is None:
                continue
            moved = self._store.writer.call(
                partial(
                    complete_study,
                    study_uid=uid,
                    seen_last_received_at=last,
                    now=now,
                    reason=reason.value,
                )
            )
            if moved:
                completed += 1
                self._metrics.studies_completed.labels(reason.value).inc()
                log.info(
                    "study complete",
                    extra={
                        "study_uid": uid,
                        "reason": reason.value,
                        "instances": int(row["instance_count"]),
                    },
                )
        return completed

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``check_interval_s`` until ``stop`` is set; errors are logged, not fatal."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("assembly tick failed; retrying next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._cfg.check_interval_s)
