"""``edge-agent init``, ``check-config`` and ``make-samples``: a new site's first steps."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

from edge_agent.cli.common import (
    CONFIG_NAME,
    EXIT_ERROR,
    EXIT_OK,
    add_command,
    config_arg,
    load,
)
from edge_agent.config import Config, load_config


def add_init(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "init",
        "write a commented default config and create the data folders",
        "edge-agent init /srv/edge --port 11112 --ae-title EDGE --allow PACS@10.0.0.0/8",
    )
    sp.add_argument("dir", type=Path, help="folder for the config file and data")
    sp.add_argument("--port", type=int, default=11112, help="DICOM port")
    sp.add_argument("--web-port", type=int, default=8080, help="web UI and REST API port")
    sp.add_argument("--ae-title", default="EDGE_AGENT")
    sp.add_argument("--bind-address", default="0.0.0.0")
    sp.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="AE[@HOST]",
        help="allowed calling AE title, optionally @IP or @CIDR (repeatable; "
        "default: STORESCU and ECHOSCU from anywhere)",
    )
    sp.add_argument("--quiet-period", type=float, default=10.0, metavar="SECONDS")
    sp.add_argument("--min-free-mb", type=int, default=1024)
    sp.add_argument("--force", action="store_true", help="overwrite an existing config file")
    sp.set_defaults(
        func=lambda a: init(
            a.dir,
            port=a.port,
            web_port=a.web_port,
            ae_title=a.ae_title,
            bind_address=a.bind_address,
            allow=a.allow,
            quiet_period_s=a.quiet_period,
            min_free_mb=a.min_free_mb,
            force=a.force,
        )
    )


def add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "check-config",
        "validate a config file (and EDGE_* overrides); name the bad field",
        "edge-agent check-config --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.set_defaults(func=lambda a: check_config(load(a)))


def add_make_samples(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "make-samples",
        "write synthetic sample studies (no patient data) to a folder",
        "edge-agent make-samples ./samples --modality CT --slices 40",
    )
    sp.add_argument("dir", type=Path)
    sp.add_argument("--modality", choices=["CT", "MR"], default="CT")
    sp.add_argument("--slices", type=int, default=20)
    sp.add_argument("--size", type=int, default=512, help="rows and columns")
    sp.add_argument("--seed", default="sample")
    sp.set_defaults(
        func=lambda a: make_samples(
            a.dir, modality=a.modality, slices=a.slices, size=a.size, seed=a.seed
        )
    )


def init(
    root: Path,
    *,
    port: int = 11112,
    web_port: int = 8080,
    ae_title: str = "EDGE_AGENT",
    bind_address: str = "0.0.0.0",
    allow: Sequence[str] = (),
    quiet_period_s: float = 10.0,
    min_free_mb: int = 1024,
    force: bool = False,
) -> int:
    """Write ``root/edge-agent.toml`` from the commented default, create the data folders and
    the migrated database, so every command (``users add``, ``models install``, ``storage
    status``) works before the first ``run``. Returns 1 (and writes nothing) if the file exists
    and not ``force``."""
    cfg_path = root / CONFIG_NAME
    if cfg_path.exists() and not force:
        print(f"edge-agent: {cfg_path} exists (use --force to overwrite)", file=sys.stderr)
        return EXIT_ERROR
    callers = allow or ["STORESCU", "ECHOSCU"]
    lines = []
    for c in callers:
        ae, _, host = c.partition("@")
        entry = f'ae_title = "{ae}"' + (f', host = "{host}"' if host else "")
        lines.append(f"  {{ {entry} }},")
    template = Template(
        resources.files("edge_agent").joinpath("default_config.toml").read_text("utf-8")
    )
    text = template.substitute(
        ae_title=ae_title,
        bind_address=bind_address,
        port=port,
        web_port=web_port,
        allowed_callers="\n".join(lines),
        data_dir="data",
        min_free_mb=min_free_mb,
        quiet_period_s=float(quiet_period_s),
    )
    root.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text, encoding="utf-8")
    cfg = load_config(cfg_path)  # validate what we wrote
    from edge_agent import compose
    from edge_agent.app import prepare_dirs

    prepare_dirs(cfg)
    compose.open_store(cfg, must_exist=False, fsync_dirs=cfg.storage.fsync).close()
    print(f"wrote {cfg_path}")
    print(f"data folders and database under {cfg.storage.data_dir}")
    print(f"start with: edge-agent run --config {cfg_path}")
    return EXIT_OK


def check_config(cfg: Config) -> int:
    """Print what ``cfg`` (already validated by loading it) sets up."""
    d, s = cfg.dicom, cfg.storage
    callers = (
        "any"
        if d.allow_any_caller
        else ", ".join(c.ae_title + (f"@{c.host}" if c.host else "") for c in d.allowed_callers)
    )
    print("configuration OK")
    print(
        f"  AE title {d.ae_title} on {d.bind_address}:{d.port}, TLS "
        f"{'on' if d.tls.enabled else 'off'}, up to {d.max_associations} associations"
    )
    print(f"  allowed callers: {callers}")
    print(f"  data: {s.data_dir} (hot {s.path('hot_dir')}, floor {s.min_free_mb} MiB)")
    print(f"  studies complete after {cfg.studies.quiet_period_s:g} s quiet")
    return EXIT_OK


def make_samples(root: Path, *, modality: str, slices: int, size: int, seed: str) -> int:
    """Write one synthetic study (no patient data) to ``root``."""
    from edge_agent.samples import make_study

    study = make_study(root, modality=modality, slices=slices, size=size, seed=seed)
    print(f"wrote {len(study.files)} {study.modality} instances to {root}")
    print(f"study {study.study_uid}")
    return EXIT_OK
