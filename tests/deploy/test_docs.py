"""The deployment files and deploy/OPERATIONS.md stay true to the code: the paths they name
exist, the commands they show are real CLI commands, and every EDGE_* / HUB_* variable they
set is one the agent or the hub reads."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cloud_hub.cli import _parser as hub_parser
from edge_agent.cli import _parser as agent_parser
from edge_agent.config import Config, _env_names
from tests.deploy.conftest import DEPLOY, ROOT

OPERATIONS = DEPLOY / "OPERATIONS.md"
TEXT_SUFFIXES = {".md", ".yaml", ".toml", ".sh", ".Dockerfile", ".py"}
# EDGE_* words that are not settings: AE titles and placeholders in examples, and the
# variables the agent reads outside the config sections
NOT_SETTINGS = {"EDGE_AGENT", "EDGE_MAIN", "EDGE_NAME"}
AGENT_SPECIAL = {"EDGE_CONFIG", "EDGE_COLD_KEYS", "EDGE_USER_PASSWORD"}


def deploy_files() -> list[Path]:
    return [
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name.endswith(".Dockerfile"))
    ]


def commands(parser: argparse.ArgumentParser) -> set[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set().union(*(set(a.choices) for a in subs))


def test_paths_named_in_deploy_files_exist() -> None:
    for f in [*deploy_files(), OPERATIONS]:
        # "deploy/edge-agent" alone is a kubectl name (kubectl exec deploy/edge-agent)
        refs = re.findall(r"\bdeploy/(?:k3s|docker|monitoring)/[\w./-]*\w", f.read_text())
        for ref in refs:
            assert (ROOT / ref).exists(), f"{f.relative_to(ROOT)} names {ref}, which is missing"


def test_operations_commands_exist() -> None:
    text = OPERATIONS.read_text()
    # "kubectl -n edge-agent exec" names the namespace, not a command
    agent = set(re.findall(r"(?<!-n )(?<![/-])\bedge-agent ([a-z][a-z-]+)", text))
    hub = set(re.findall(r"(?<!-n )\bcloud-hub ([a-z][a-z-]+)", text))
    assert {"backup", "restore", "sync", "users"} <= agent
    assert agent <= commands(agent_parser()), sorted(agent - commands(agent_parser()))
    assert hub <= commands(hub_parser()), sorted(hub - commands(hub_parser()))


def test_edge_variables_are_settings_the_agent_reads() -> None:
    known = {name for name, _ in _env_names(Config, ())} | AGENT_SPECIAL
    source = "\n".join(p.read_text() for p in (ROOT / "edge_agent").rglob("*.py"))
    for special in AGENT_SPECIAL:
        assert special in source, f"{special} is no longer read by the agent"
    for f in deploy_files():
        for name in set(re.findall(r"\bEDGE_[A-Z0-9_]+\b", f.read_text())) - NOT_SETTINGS:
            assert name in known, f"{f.relative_to(ROOT)}: {name} is not a setting of the agent"


def test_hub_variables_are_read_by_the_hub() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "cloud_hub").rglob("*.py"))
    for f in deploy_files():
        for name in set(re.findall(r"\bHUB_[A-Z0-9_]+\b", f.read_text())):
            assert f'"{name}"' in source, f"{f.relative_to(ROOT)}: the hub never reads {name}"
