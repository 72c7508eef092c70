"""The README's quick-start blocks work as written: every ```sh block that follows a
``<!-- quickstart -->`` comment is taken from README.md in order and run, unchanged, as one
bash script in a scratch folder. Only what the README itself leaves to the reader is set: its
folders (``AGENT_DIR``, ``HUB_DIR``) and ports (``DICOM_PORT``, ``WEB_PORT``, ``HUB_PORT``),
through the environment; ``.venv`` in the scratch folder is this test's virtualenv."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.dcmtk

ROOT = Path(__file__).parents[2]
MARK = "<!-- quickstart -->"


def quickstart_blocks(readme: str) -> list[str]:
    """The body of every ```sh block right after a quick-start mark, in README order."""
    return re.findall(re.escape(MARK) + r"\n```sh\n(.*?)\n```", readme, flags=re.S)


def test_the_marks_are_on_sh_blocks() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = quickstart_blocks(readme)
    assert len(blocks) == readme.count(MARK)  # no mark lost on the way to a block
    script = "\n".join(blocks)
    for step in ("edge-agent init", "models install", "users add", "make-samples", "storescu"):
        assert step in script, step
    assert "cloud-hub run" in script and "--tls-cert" in script and "https://" in script


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_group(pgid: int) -> None:
    """SIGTERM what the script left running in the background (the agent, the hub), then
    SIGKILL whatever is still there after a minute."""
    if _group_gone(pgid):
        return
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _group_gone(pgid):
        time.sleep(0.2)
    if not _group_gone(pgid):
        os.killpg(pgid, signal.SIGKILL)


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "edge-agent").exists():
        pytest.skip("the edge-agent command is not installed beside this Python")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(venv)
    script = "set -euo pipefail\n" + "\n".join(
        quickstart_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    )
    (work / "quickstart.sh").write_text(script)
    agent_dir, hub_dir = tmp_path / "edge", tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "HUB_"))}
    env.update(
        AGENT_DIR=str(agent_dir),
        HUB_DIR=str(hub_dir),
        DICOM_PORT=str(free_port()),
        WEB_PORT=str(free_port()),
        HUB_PORT=str(free_port()),
    )
    # output to a file, not a pipe: the agent and the hub left in the background keep the
    # script's stdout open after the script ended
    transcript = tmp_path / "quickstart.out"
    with transcript.open("w") as fh:
        proc = subprocess.Popen(
            ["bash", "quickstart.sh"],
            cwd=work,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the agent and hub it starts stay in this process group
        )
    try:
        code = proc.wait(timeout=280)
        out = transcript.read_text()
        log = (agent_dir / "agent.log").read_text() if (agent_dir / "agent.log").exists() else ""
        assert code == 0, f"{out}\n--- agent log ---\n{log[-3000:]}"
        # the models and the account are there, the samples are where the README sends from
        assert "installed ct-lesion-seg" in out and "installed resnet-mini" in out
        assert "added alice (radiologist)" in out
        study_uids = re.findall(r"^study (\S+)$", out, flags=re.M)
        assert len(study_uids) == 2  # CT and MR
        listing = out.split("STUDY INSTANCE UID", 1)[1]
        for uid in study_uids:
            assert uid[:46] in listing, uid
        # the site enrolled over HTTPS, trusting the hub's certificate through hub_ca_file
        hub_port = env["HUB_PORT"]
        assert f"with https://localhost:{hub_port}; credential in" in out
        assert f"-> https://localhost:{hub_port}:" in out  # edge-agent sync status
        # and the restarted agent syncs with the hub over that TLS connection
        run_env = dict(
            env,
            EDGE_CONFIG=str(agent_dir / "edge-agent.toml"),
            EDGE_SYNC_HUB_CA_FILE=str(agent_dir / "hub-ca.pem"),
        )
        deadline, state = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            r = subprocess.run(
                [str(venv / "bin" / "edge-agent"), "sync", "status", "--json"],
                env=run_env,
                capture_output=True,
                text=True,
                check=True,
            )
            state = json.loads(r.stdout)["connectivity"]
            if state == "online":
                break
            time.sleep(0.5)
        assert state == "online", (agent_dir / "agent.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _stop_group(proc.pid)
