"""``edge-agent demo``: the end-to-end demo behind ``make demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.cli.common import add_command


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "demo",
        "run the end-to-end demo: agent + sample studies sent with storescu",
        "edge-agent demo --dir ./demo-run",
    )
    sp.add_argument("--dir", type=Path, default=Path("demo-run"), help="scratch folder (recreated)")
    sp.add_argument(
        "--serve", action="store_true", help="keep the agent, hub and web UI running at the end"
    )
    sp.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo

    return run_demo(args.dir.resolve(), serve=args.serve)
