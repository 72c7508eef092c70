"""``edge-agent studies``: list studies; restore an archived or cold one to hot."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from edge_agent.cli.common import (
    EXIT_ERROR,
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


def add_studies(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "studies",
        "list studies with their state and counts",
        "edge-agent studies --config /srv/edge/edge-agent.toml --state FAILED\n"
        "  edge-agent studies show 1.2.840.113619.2.55.3 --config /srv/edge/edge-agent.toml\n"
        "  edge-agent studies rerun 1.2.840.113619.2.55.3 --model ct-lesion-seg",
    )
    config_arg(sp)
    sp.add_argument(
        "action",
        nargs="?",
        choices=["list", "show", "rerun", "restore"],
        default="list",
        help="show UID: one study, its jobs (why one failed), results and sends to PACS; "
        "rerun UID [--model NAME]: run its inference again (new results supersede); "
        "restore UID: bring an archived/cold study back to hot",
    )
    sp.add_argument("uid", nargs="?", help="study instance UID (show, rerun, restore)")
    sp.add_argument("--model", help="rerun: only this model (default: every model that applies)")
    sp.add_argument(
        "--state",
        type=str.upper,  # --state failed is FAILED
        choices=["RECEIVING", "COMPLETE", "INFERRING", "DONE", "FAILED"],
        help="only studies in this state",
    )
    sp.add_argument("--limit", type=int, default=100, help="at most this many, newest first")
    sp.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="restore: wait")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=_cmd_studies)


def _cmd_studies(args: argparse.Namespace) -> int:
    if args.action == "restore":
        return restore(load(args), args.uid, wait_s=args.wait)
    if args.action == "show":
        return detail(load(args), args.uid, as_json=args.json)
    if args.action == "rerun":
        return rerun(load(args), args.uid, model=args.model)
    return show(load(args), state=args.state, limit=args.limit, as_json=args.json)


def show(cfg: Config, *, state: str | None = None, limit: int = 100, as_json: bool = False) -> int:
    """Print the newest ``limit`` studies (only those in ``state`` if given)."""
    from edge_agent.studies.models import StudyState
    from edge_agent.studies.store import count_studies, list_studies

    wanted = StudyState(state) if state else None
    store = open_store(cfg)
    try:
        with store.snapshot() as conn:
            studies = list_studies(conn, state=wanted, limit=limit)
            matching = count_studies(conn, state=wanted)
            total = count_studies(conn) if wanted else matching
    finally:
        store.close()
    what = f"{wanted.value} studies" if wanted else "studies"
    note = truncation_note(len(studies), matching, what)
    if as_json:
        print(json.dumps([s.__dict__ for s in studies], indent=2, default=str))
        if note:
            print(note, file=sys.stderr)  # stdout stays valid JSON
        return EXIT_OK
    if not studies:
        if wanted and total:
            print(f"no {what} ({total} studies in other states; edge-agent studies lists them)")
        else:
            print("no studies yet")
        return EXIT_OK
    w = max(len("STUDY INSTANCE UID"), *(len(s.study_uid) for s in studies))  # never cut
    header = (
        f"{'STUDY INSTANCE UID':<{w}} {'STATE':<10} {'MOD':<4} {'SER':>3} {'INST':>5} "
        f"{'LATE':>4} {'PATIENT ID':<12} {'LAST RECEIVED':<19}"
    )
    print(header)
    for s in studies:
        print(
            f"{s.study_uid:<{w}} {s.state.value:<10} {s.modality[:4]:<4} "
            f"{s.series_count:>3} {s.instance_count:>5} {s.late_arrivals:>4} "
            f"{s.patient_id[:12]:<12} {fmt_time(s.last_received_at):<19}"
        )
    if note:
        print(note)
    return EXIT_OK


def rerun(cfg: Config, uid: str | None, *, model: str | None = None) -> int:
    """Ask the running agent to run study ``uid``'s inference again (every model that
    applies, or ``model`` only); audited. Raises EdgeError (exit 1) if it cannot."""
    from edge_agent.actions.models import Actor
    from edge_agent.actions.rerun import rerun as rerun_study

    if not uid:
        raise EdgeError("studies rerun needs a study instance UID")
    store = open_store(cfg)
    try:
        round_ = rerun_study(store, uid, model=model, actor=Actor.cli(), now=time.time())
    finally:
        store.close()
    what = f"model {model}" if model else "every model that applies"
    print(
        f"re-run of {uid} ({what}) requested as round {round_}; the running agent schedules "
        "it, and edge-agent studies show UID follows it"
    )
    return EXIT_OK


def restore(cfg: Config, uid: str | None, *, wait_s: float = 0.0) -> int:
    """Ask the running agent to bring study ``uid`` back to hot; wait up to ``wait_s`` seconds
    for it. Returns 1 if it failed, or did not finish while waiting."""
    from edge_agent.lifecycle.manager import request_restore, restore_outcome

    if not uid:
        raise EdgeError("studies restore needs a study instance UID")
    store = open_store(cfg)
    try:
        by = f"cli:{os.environ.get('USER', '?')}"
        request_restore(store, uid, by=by, now=time.time())
        print(f"restore of {uid} requested; the running agent brings it back to hot")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            finished, error = restore_outcome(store, uid)
            if finished:
                if error:
                    print(f"restore failed: {error}", file=sys.stderr)
                    return EXIT_ERROR
                print("restored: every instance is on the hot tier")
                return EXIT_OK
            time.sleep(0.5)
    finally:
        store.close()
    if wait_s:
        print("not finished yet (is the agent running?); edge-agent storage status shows it")
        return EXIT_ERROR
    return EXIT_OK


def detail(cfg: Config, uid: str | None, *, as_json: bool = False) -> int:
    """Print one study: its state, series, inference jobs (a failed job's model, version,
    stage, error and time), current results and sends to PACS. Raises EdgeError (exit 1)
    for an unknown UID."""
    from edge_agent.web.queries import study_detail

    if not uid:
        raise EdgeError("studies show needs a study instance UID")
    store = open_store(cfg)
    try:
        with store.read() as conn:
            d = study_detail(conn, uid)
    finally:
        store.close()
    if d is None:
        raise EdgeError(f"no study {uid}")
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return EXIT_OK
    print(
        f"study {d['study_uid']}\n  {d['state']}, {d['modality']} {d['study_date']} "
        f"{d['description']}, {d['instances']} instance(s) in {len(d['series'])} series, "
        f"last received {fmt_time(d['received_at'])}"
    )
    if d["failures"]:
        print("why it failed:")
        for f in d["failures"]:
            print(
                f"  {f['model_name']} {f['model_version']} on series {f['series_uid']}: "
                f"stage {f['stage'] or '-'} at {fmt_time(f['at'])} after {f['attempts']} "
                f"attempt(s)\n    {f['error']}"
            )
    print("jobs:" if d["jobs"] else "jobs: none (no model applied, or not scheduled yet)")
    for j in d["jobs"]:
        err = f"\n    {j['error_stage'] or '-'}: {j['error']}" if j["error"] else ""
        print(
            f"  round {j['round']} {j['state']:<9} {j['model_name']} {j['model_version']} "
            f"series {j['series_uid']} attempts {j['attempts']} "
            f"finished {fmt_time(j['finished_at'])}{err}"
        )
    print("results:" if d["results"] else "results: none current")
    for r in d["results"]:
        flag = " CRITICAL" if r["critical"] else ""
        print(f"  {r['result_id']} {r['model_name']} {r['model_version']}{flag}")
    for f in d["forwards"]:
        err = f"  last error: {f['last_error']}" if f["last_error"] else ""
        print(
            f"  sent {f['kind']} -> {f['destination']}: {f['state']} after "
            f"{f['attempts']} attempt(s){err}"
        )
    return EXIT_OK
