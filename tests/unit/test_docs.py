"""The README stays true: every setting is documented, every documented one exists, and
every command in its command table exists in the CLI."""

from __future__ import annotations

import re
from pathlib import Path

from edge_agent.cli import _parser
from edge_agent.config import Config, _env_names

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def _settings() -> set[str]:
    return {".".join(path) for _, path in _env_names(Config, ())}


def test_every_setting_is_in_the_configuration_reference() -> None:
    section = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cell = row.split("|")[1]
        names = re.findall(r"`([a-z_.]+)`", cell)
        prefix = names[0].rsplit(".", 1)[0] if names and "." in names[0] else ""
        for name in names:
            documented.add(name if "." in name else f"{prefix}.{name}")
    assert documented == _settings()


def test_default_config_template_mentions_every_setting() -> None:
    from importlib import resources

    text = resources.files("edge_agent").joinpath("default_config.toml").read_text("utf-8")
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.M))
    leaf_names = {s.rsplit(".", 1)[1] for s in _settings()}
    assert leaf_names <= keys | {"allowed_callers", "quiet_period_by_modality"}


def test_commands_in_readme_exist() -> None:
    table = README.split("### Commands", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"\| `edge-agent ([a-z-]+)", table))
    actions = [a for a in _parser()._actions if a.dest == "==SUPPRESS==" or a.choices]
    commands = set().union(*(set(a.choices or ()) for a in actions if isinstance(a.choices, dict)))
    assert documented == commands
