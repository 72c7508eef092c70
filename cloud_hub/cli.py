"""The ``cloud-hub`` command.

The hub's service (enrollment, push/pull sync, fleet status) is built by the sync issue; until
then this command only reports its version and says so, rather than pretending to serve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cloud_hub import __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="cloud-hub",
        description="Central hub for edge agents. Not implemented yet in this version: "
        "only --version is available.",
    )
    p.add_argument("--version", action="version", version=f"cloud-hub {__version__}")
    p.parse_args(argv)
    print("cloud-hub: no service in this version yet (see README, 'Status')", file=sys.stderr)
    return 2
