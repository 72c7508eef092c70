"""What every command module shares: exit codes, the ``--config`` flag, loading the config,
opening the store, and how times are shown."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.config import Config, load_config

if TYPE_CHECKING:
    from edge_agent.store import Store

CONFIG_NAME = "edge-agent.toml"
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_: str,
    example: str,
) -> argparse.ArgumentParser:
    """A subcommand whose description is its help text and one example."""
    return sub.add_parser(
        name,
        help=help_,
        description=f"{help_}\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def config_arg(sp: argparse.ArgumentParser) -> None:
    """The ``--config``/``-c`` flag."""
    sp.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"config file (default: $EDGE_CONFIG, else ./{CONFIG_NAME})",
    )


def load(args: argparse.Namespace) -> Config:
    """The config named by ``--config``, else $EDGE_CONFIG, else ./edge-agent.toml."""
    path = args.config or os.environ.get("EDGE_CONFIG") or Path(CONFIG_NAME)
    return load_config(path)


def open_store(cfg: Config) -> Store:
    """The agent's store; raises EdgeError when the agent has not created it yet."""
    from edge_agent import compose

    return compose.open_store(cfg)


def fmt_time(t: float | None) -> str:
    """Local time to the second, or "-"."""
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def parse_time(text: str) -> float:
    """A point in time for a flag such as ``--since``: Unix seconds (``1764547200``) or an ISO
    8601 date or date-time (``2026-12-01``, ``2026-12-01T08:30``, ``2026-12-01T08:30Z``,
    ``2026-12-01 08:30+01:00``); without an offset it is local time, as the listings show.
    Returns Unix seconds; raises :class:`argparse.ArgumentTypeError` (a usage error) on
    anything else."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use 2026-12-01, 2026-12-01T08:30, 2026-12-01T08:30Z "
            "or Unix seconds)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is local time
    return when.timestamp()


def truncation_note(shown: int, total: int, what: str) -> str | None:
    """``"showing 100 of 250 studies (newest first; --limit N shows more)"``, or None when
    nothing was left out."""
    if total <= shown:
        return None
    return f"showing {shown} of {total} {what} (newest first; --limit N shows more)"
