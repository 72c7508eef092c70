"""`make demo` must keep working: run it and read what the user sees."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dcmtk

DEMO = Path(__file__).parents[2] / "examples" / "demo.py"


def test_demo_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(DEMO), "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "CT: storescu exit 0" in out and "MR: storescu exit 0" in out
    assert "Calling AE Title Not Recognized" in out
    listing = out.split("==> edge-agent studies", 1)[1].split("==>", 1)[0]
    assert listing.count("DONE") == 4  # complete, inferred
    assert "DEMO-CT-1" in listing and "DEMO-MR-1" in listing
    results = out.split("==> edge-agent results", 1)[1].split("==>", 1)[0]
    assert results.count("ct-lesion-seg 1.0.0 on CPUExecutionProvider") == 1
    assert results.count("resnet-mini 1.0.0 on CPUExecutionProvider") == 3  # CT, 2 x MR (not NM)
    assert "lesion: 19/40 slices" in results
    assert "PACS received 6 object(s): 1 x KOS, 1 x SEG, 4 x SR" in out
    assert "the hub holds 4 result(s) of this site" in out
    down = out.split("the WAN goes down", 1)[1].split("==>", 1)[0]
    assert "pending: urgent 0, normal 1, batch 0" in down
    assert "the hub now holds 5 result(s) (5 distinct), 1 new" in out
    late = out.split("the study re-opens", 1)[1].split("==>", 1)[0]
    assert "RECEIVING" in late and " 41    1 DEMO-CT-1" in late
    assert late.count("(superseded)") == 2 and "lesion: 19/41 slices" in late
    assert "C-STORE status 0xC000: malformed or truncated dataset" in out
    shadow = out.split("==> shadow mode", 1)[1].split("==>", 1)[0]
    assert "shadow: agreement 1.000 over 1 series" in shadow
    assert "s ct-lesion-seg            1.1.0" in shadow
    rollout = out.split("==> staged rollout", 1)[1].split("==>", 1)[0]
    assert "ct-lesion-seg 1.1.0: percent" in rollout and "ct-lesion-seg 1.1.0: all" in rollout
    assert "* ct-lesion-seg            1.1.0" in rollout
    rogue = out.split("not trust", 1)[1].split("==>", 1)[0]
    assert "ct-lesion-seg 1.2.0  refused: unknown_key" in rogue
    assert "active now: 1.0.0 installed, 1.1.0 active" in rogue
    web = out.split("==> the web UI answers", 1)[1].split("==>", 1)[0]
    assert "GET /readyz: 200" in web and "6 studies; the newest 5 of them" in web
    assert "DEMO^CT^THREE    CT  DONE     2 result(s) CRITICAL" in web
    assert "agent exited with 0" in out
    # where to look, with what login, and what the results are not
    assert re.search(r"web UI: http://127\.0\.0\.1:\d+/ \(radiologist / \S+\)", out)
    assert re.search(r"fleet: http://127\.0\.0\.1:\d+/fleet \(any user name / \S+\)", out)
    assert "reference models, not for clinical use" in results_heading(out)
    assert "make demo DEMO_ARGS=--serve" in out.rsplit("Done.", 1)[1]
    assert "{'" not in out  # no Python dict reprs
    assert re.search(r"GET http://127\.0\.0\.1:\d+/fleet as ops: 200, Fleet: 1 site\(s\)", out)


def results_heading(out: str) -> str:
    return out.split("==> edge-agent results", 1)[1].split("\n", 1)[0]
