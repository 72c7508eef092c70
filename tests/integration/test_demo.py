"""`make demo` must keep working: run it and read what the user sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dcmtk


def test_demo_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", "--dir", str(tmp_path / "demo")],
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
    assert listing.count("COMPLETE") == 4
    assert "DEMO-CT-1" in listing and "DEMO-MR-1" in listing
    late = out.split("the study re-opens", 1)[1].split("==>", 1)[0]
    assert "RECEIVING" in late and " 41    1 DEMO-CT-1" in late
    assert "C-STORE status 0xC000: malformed or truncated dataset" in out
    assert "agent exited with 0" in out
