"""Study actions against a real agent (store, listener, inference; studies sent with
storescu): why a study failed (per job: model, version, stage, error, time) in the API, the
page and the CLI; re-run; purge; restore progress; the node's recent errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from edge_agent.cli import results as results_cli
from edge_agent.cli import studies as studies_cli
from edge_agent.errors import EdgeError
from edge_agent.inference.reference_models import CLS_NAME, SEG_NAME
from edge_agent.samples import make_study
from hub_protocol.package import write_manifest_files
from tests.conftest import TEST_FILES, make_config, storescu
from tests.integration.test_web_api import PASSWORD, _login, _run

pytestmark = pytest.mark.dcmtk


def _users(app: Any, clock: Any) -> None:
    for name, role in (("rad", "radiologist"), ("ops", "operator"), ("root", "admin")):
        app.accounts.add_user(name, role, PASSWORD, now=clock.now())


def _variant(src: Path, dest: Path, name: str, routing: dict[str, Any] | None = None) -> Path:
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["name"] = name
    if routing is not None:
        m["routing"] = routing
    write_manifest_files(dest, m)
    return dest


def _state(app: Any, uid: str) -> str:
    return str(app.store.query("SELECT state FROM studies WHERE study_uid = ?", (uid,))[0][0])


def test_why_a_study_failed_in_the_api_the_page_and_the_cli(
    app_factory: Any,
    tmp_path: Path,
    clock: Any,
    ref_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = app_factory(make_config(tmp_path))
    app.registry.install(ref_models[SEG_NAME])
    app.registry.install(
        _variant(ref_models[CLS_NAME], tmp_path / "ot", "cls-for-ot", {"modality": ["OT"]})
    )
    # the installed segmenter is damaged on disk: its jobs fail loading the model
    installed = app.registry.get(SEG_NAME, "1.0.0")
    onnx = app.registry.models_dir / installed.path / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-4] + b"\0\0\0\0")
    ct = make_study(tmp_path / "ct", modality="CT", slices=2, size=64, seed="why")
    assert storescu(app.listener.port, *ct.files).returncode == 0
    # an RGB secondary capture: the OT classifier fails preprocessing it (not grayscale)
    rgb = TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm"
    assert storescu(app.listener.port, rgb, extra=("-R", "-xy")).returncode == 0
    clock.advance(11)
    app.assembly.tick()
    app.inference.drain()
    assert _state(app, ct.study_uid) == "FAILED"
    rgb_uid = str(app.store.query("SELECT study_uid FROM studies WHERE modality = 'OT'")[0][0])
    assert _state(app, rgb_uid) == "FAILED"

    # the CLI: studies show UID says which model, version, stage, error and when
    assert studies_cli.detail(app.cfg, ct.study_uid) == 0
    out = capsys.readouterr().out
    assert "why it failed:" in out and f"{SEG_NAME} 1.0.0" in out
    assert "stage model" in out and "PackageError" in out and "SHA-256" in out
    assert studies_cli.detail(app.cfg, rgb_uid, as_json=True) == 0
    (failure,) = json.loads(capsys.readouterr().out)["failures"]
    assert failure["model_name"] == "cls-for-ot" and failure["stage"] == "preprocess"
    assert "UnsupportedPixels" in failure["error"] and failure["at"] == pytest.approx(clock.now())
    with pytest.raises(EdgeError, match=r"no study 1\.2\.3\.999"):
        studies_cli.detail(app.cfg, "1.2.3.999")

    # studies --state filters; an empty filter does not claim there are no studies
    assert studies_cli.show(app.cfg, state="FAILED") == 0
    out = capsys.readouterr().out
    assert ct.study_uid in out and rgb_uid in out
    assert studies_cli.show(app.cfg, state="DONE") == 0
    assert capsys.readouterr().out.strip() == "no study is DONE (2 in other states)"

    # results UID: an unknown study is an error (exit 1 through main), a known one says why
    with pytest.raises(EdgeError, match=r"no study 1\.2\.3\.999"):
        results_cli.show(app.cfg, study_uid="1.2.3.999")
    assert results_cli.show(app.cfg, study_uid=ct.study_uid) == 0
    assert "no results for study" in capsys.readouterr().out

    _users(app, clock)

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        await _login(client, "rad")
        detail = json.loads(await (await client.get(f"/api/v1/studies/{ct.study_uid}")).text())
        (f,) = detail["failures"]
        assert (f["model_name"], f["model_version"], f["stage"]) == (SEG_NAME, "1.0.0", "model")
        assert "PackageError" in f["error"] and f["at"] is not None
        (job,) = detail["jobs"]
        assert job["state"] == "FAILED" and job["error_stage"] == "model"
        page = await (await client.get(f"/studies/{ct.study_uid}")).text()
        assert "Why it failed" in page and "PackageError" in page

    _run(app, body)
