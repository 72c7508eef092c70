"""``edge-agent run``: the agent in the foreground until SIGTERM."""

from __future__ import annotations

import argparse

from edge_agent.cli.common import add_command, config_arg, load
from edge_agent.config import Config


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "run",
        "run the agent in the foreground until SIGTERM",
        "edge-agent run --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.set_defaults(func=lambda a: run(load(a)))


def run(cfg: Config) -> int:
    """Set up logging from ``cfg`` and run the agent; returns its exit code."""
    from edge_agent.app import run as run_agent
    from edge_agent.logs import setup_logging

    setup_logging(cfg.logging.level, json_format=cfg.logging.json)
    return run_agent(cfg)
