"""The ``edge-agent`` command.

Examples::

    edge-agent init /srv/edge --port 11112 --ae-title EDGE --allow PACS@10.1.2.0/24
    edge-agent check-config --config /srv/edge/edge-agent.toml
    edge-agent run --config /srv/edge/edge-agent.toml
    edge-agent studies --config /srv/edge/edge-agent.toml --state COMPLETE
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from edge_agent import __version__
from edge_agent.cli import (
    backup,
    ingest,
    models,
    results,
    run,
    setup,
    storage,
    studies,
    sync,
    users,
)
from edge_agent.cli.common import CONFIG_NAME, EXIT_CONFIG, EXIT_ERROR, EXIT_OK
from edge_agent.errors import ConfigError, EdgeError
from edge_agent.perms import private_umask

__all__ = ["CONFIG_NAME", "EXIT_CONFIG", "EXIT_ERROR", "EXIT_OK", "main"]

# the order `edge-agent --help` lists them in; each module owns its flags and examples
_COMMANDS = (
    setup.add_init,
    run.add_run,
    setup.add_check_config,
    studies.add_studies,
    storage.add_storage,
    ingest.add_quarantine,
    setup.add_make_samples,
    models.add_models,
    results.add_results,
    backup.add_backup,
    backup.add_restore,
    users.add_users,
    sync.add_sync,
    results.add_forwards,
    ingest.add_associations,
)


#: what a process stopped by SIGPIPE reports (128 + the signal), as ``git log | head`` does
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 error, 2 bad config/usage, 141
    when the reader of our output went away, as in ``edge-agent studies | head``)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # stop quietly, like a Unix tool killed by SIGPIPE; point stdout at /dev/null so the
        # interpreter's own flush at exit does not report the same broken pipe again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        with private_umask():  # stores, backups, keys, credentials: this user's only
            code: int = args.func(args)
    except ConfigError as exc:
        print(f"edge-agent: configuration error in {exc.field}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgeError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # main() ends quietly
    except OSError as exc:  # e.g. a data folder that cannot be created or written
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"edge-agent: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Hospital edge agent: receives DICOM, assembles studies, keeps them safe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return p
