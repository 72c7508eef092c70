"""``edge-agent results`` and ``forwards``: inference results, and the result objects (SEG,
SR) queued for or sent to PACS."""

from __future__ import annotations

import argparse
import json
import sys

from edge_agent.cli.common import (
    EXIT_OK,
    add_command,
    config_arg,
    fmt_time,
    load,
    open_store,
    truncation_note,
)
from edge_agent.config import Config
from edge_agent.errors import EdgeError


def add_results(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "results",
        "inference results (current ones; --all includes superseded)",
        "edge-agent results 1.2.840.113619.2.55.3 --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.add_argument("study_uid", nargs="?", help="only this study")
    sp.add_argument("--all", action="store_true", help="include superseded results")
    sp.add_argument("--limit", type=int, default=50, help="at most this many, newest first")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(
        func=lambda a: show(
            load(a), study_uid=a.study_uid, include_superseded=a.all, limit=a.limit, as_json=a.json
        )
    )


def add_forwards(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "forwards",
        "result objects (SEG, SR) queued for or sent to PACS, with attempts and errors",
        "edge-agent forwards --state DEAD --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.add_argument("--state", choices=["PENDING", "SENT", "DEAD"])
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=lambda a: forwards(load(a), state=a.state, limit=a.limit, as_json=a.json))


def show(
    cfg: Config,
    *,
    study_uid: str | None = None,
    include_superseded: bool = False,
    limit: int = 50,
    as_json: bool = False,
) -> int:
    """Print the newest ``limit`` results (of ``study_uid`` only, if given) with a summary of
    their findings. Raises :class:`EdgeError` when ``study_uid`` names no study this agent
    holds."""
    from edge_agent.results.store import count_results, list_results
    from edge_agent.studies.store import get_study

    store = open_store(cfg)
    try:
        with store.snapshot() as conn:
            study = get_study(conn, study_uid) if study_uid else None
            results = list_results(
                conn, study_uid=study_uid, include_superseded=include_superseded, limit=limit
            )
            total = count_results(conn, study_uid=study_uid, include_superseded=include_superseded)
    finally:
        store.close()
    if study_uid and study is None and not results:
        raise EdgeError(f"no study {study_uid} on this agent (edge-agent studies lists them)")
    note = truncation_note(len(results), total, "results")
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
        if note:
            print(note, file=sys.stderr)  # stdout stays valid JSON
        return EXIT_OK
    if not results:
        if study is not None:
            print(
                f"no results for study {study_uid} yet (state {study.state.value}; "
                "edge-agent studies show UID says why)"
            )
        else:
            print("no results yet")
    for r in results:
        f = r.findings
        if r.task == "segmentation":
            summary = (
                f"{f['label']}: {f['slices_with_finding']}/{f['slices']} slices, "
                f"max area {f['max_slice_area_mm2']} mm2, volume {f['volume_mm3']} mm3, "
                f"mean {f['mean_intensity']}"
            )
        else:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in f["probabilities"].items())
            summary = f"top {f['top_label']} ({probs})"
        flags = (" CRITICAL" if r.critical else "") + (" (superseded)" if r.superseded_by else "")
        print(
            f"{fmt_time(r.created_at)}  {r.model_name} {r.model_version} on {r.provider}"
            f"{flags}\n    study {r.study_uid}\n    series {r.series_uid}\n    {summary}"
            f"\n    result {r.result_id}, {r.instances} instance(s), "
            f"inference {r.inference_ms:.0f} ms"
        )
    if note:
        print(note)
    return EXIT_OK


def forwards(
    cfg: Config, *, state: str | None = None, limit: int = 50, as_json: bool = False
) -> int:
    """Print the newest ``limit`` forwards to PACS (only those in ``state`` if given)."""
    from edge_agent.results.store import list_forwards

    store = open_store(cfg)
    try:
        with store.read() as conn:
            rows = [dict(r) for r in list_forwards(conn, state=state, limit=limit)]
    finally:
        store.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("nothing queued or sent")
    for r in rows:
        when = (
            fmt_time(r["sent_at"])
            if r["state"] == "SENT"
            else (f"next try {fmt_time(r['next_attempt_at'])}" if r["state"] == "PENDING" else "-")
        )
        err = f"  last error: {r['last_error']}" if r["last_error"] else ""
        print(
            f"{r['state']:<8} {r['kind']:<4} -> {r['destination']:<28} attempts "
            f"{r['attempts']:<3} {when}  result {r['result_id']}{err}"
        )
    return EXIT_OK
