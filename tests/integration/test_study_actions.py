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
    assert capsys.readouterr().out.strip() == (
        "no DONE studies (2 studies in other states; edge-agent studies lists them)"
    )

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


def _done_study(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path], seed: str
) -> tuple[Any, Any]:
    """An agent with the segmenter and the classifier, and a CT study they both ran on."""
    app = app_factory(make_config(tmp_path))
    app.registry.install(ref_models[SEG_NAME])
    app.registry.install(ref_models[CLS_NAME])
    ct = make_study(tmp_path / "ct", modality="CT", slices=3, size=64, seed=seed)
    assert storescu(app.listener.port, *ct.files).returncode == 0
    clock.advance(11)
    app.assembly.tick()
    assert app.inference.drain() == 2
    assert _state(app, ct.study_uid) == "DONE"
    _users(app, clock)
    return app, ct


def _current(app: Any, uid: str) -> dict[str, str]:
    return {
        str(r[0]): str(r[1])
        for r in app.store.query(
            "SELECT model_name, result_id FROM results WHERE study_uid = ? "
            "AND superseded_by IS NULL",
            (uid,),
        )
    }


def test_rerun_one_model_or_all_supersedes_and_is_audited(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app, ct = _done_study(app_factory, tmp_path, clock, ref_models, "rerun")
    first = _current(app, ct.study_uid)
    assert set(first) == {SEG_NAME, CLS_NAME}

    # the CLI re-runs one model: one new job, its result supersedes; the other one stays
    assert studies_cli.rerun(app.cfg, ct.study_uid, model=SEG_NAME) == 0
    assert _state(app, ct.study_uid) == "COMPLETE"
    assert app.inference.drain() == 1
    assert _state(app, ct.study_uid) == "DONE"
    second = _current(app, ct.study_uid)
    assert second[CLS_NAME] == first[CLS_NAME] and second[SEG_NAME] != first[SEG_NAME]
    (old,) = app.store.query(
        "SELECT superseded_by FROM results WHERE result_id = ?", (first[SEG_NAME],)
    )
    assert old[0] == second[SEG_NAME]
    rounds = app.store.query(
        "SELECT round, model_name, state FROM inference_jobs WHERE study_uid = ? ORDER BY id",
        (ct.study_uid,),
    )
    assert [tuple(r) for r in rounds][-1] == (1, SEG_NAME, "DONE")  # the history stays
    with pytest.raises(EdgeError, match="no active version"):
        studies_cli.rerun(app.cfg, ct.study_uid, model="no-such-model")

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        csrf = await _login(client, "rad")
        url = f"/api/v1/studies/{ct.study_uid}/rerun"
        assert (await client.post(url, json={})).status == 403  # no CSRF token
        r = await client.post(url, json={"model": "nope"}, headers={"X-CSRF-Token": csrf})
        assert r.status == 400 and "no active version" in await r.text()
        r = await client.post(url, json={}, headers={"X-CSRF-Token": csrf})
        assert r.status == 202, await r.text()
        assert json.loads(await r.text())["round"] == 2
        # while it waits or runs, a second re-run is refused (its results are coming)
        r = await client.post(url, json={}, headers={"X-CSRF-Token": csrf})
        assert r.status == 409 and json.loads(await r.text())["error"]["code"] == "busy"
        r = await client.post("/api/v1/studies/1.2.3.999/rerun", headers={"X-CSRF-Token": csrf})
        assert r.status == 404
        page = await (await client.get(f"/studies/{ct.study_uid}")).text()
        assert 'id="rerun"' in page

    _run(app, body)
    assert app.inference.drain() == 2
    third = _current(app, ct.study_uid)
    assert all(third[m] != second[m] for m in (SEG_NAME, CLS_NAME))
    audit = app.store.query(
        "SELECT username, detail, remote FROM audit_log WHERE action = 'study.rerun' "
        "AND target = ? ORDER BY id",
        (ct.study_uid,),
    )
    assert [(r[0].split(":")[0], r[1]) for r in audit] == [
        ("cli", f"model {SEG_NAME}"),
        ("rad", "every model that applies"),
    ]
