"""The web app's API and pages against a real agent (store, listener, inference; studies
sent with storescu): auth on every route, roles, CSRF, lockout, session fixation, bad and
hostile input, the OpenAPI document, probes, metrics, audit."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from edge_agent.inference.reference_models import SEG_NAME
from edge_agent.samples import make_study
from edge_agent.web import api
from edge_agent.web.app import create_app as create_web_app
from edge_agent.web.http import COOKIE
from tests.conftest import make_config, storescu

pytestmark = pytest.mark.dcmtk

PASSWORD = "correct horse battery staple"
PUBLIC = {"/healthz", "/readyz"}


def _agent(
    app_factory: Any,
    tmp_path: Path,
    clock: Any,
    ref_models: dict[str, Path],
    *,
    patient_name: str = "DOE^JANE",
    **sections: dict[str, Any],
) -> Any:
    app = app_factory(
        make_config(tmp_path, web={"lockout_attempts": 3, "lockout_s": 600.0}, **sections)
    )
    app.registry.install(ref_models[SEG_NAME])
    s = make_study(
        tmp_path / "ct",
        modality="CT",
        slices=4,
        size=128,
        seed="web",
        patient_id="WEB-1",
        patient_name=patient_name,
    )
    assert storescu(app.listener.port, *s.files).returncode == 0
    clock.advance(11)
    app.assembly.tick()
    app.inference.drain()
    for name, role in (("rad", "radiologist"), ("ops", "operator"), ("root", "admin")):
        app.accounts.add_user(name, role, PASSWORD, now=clock.now())
    app.study_uid = s.study_uid
    return app


Body = Callable[[TestClient[Any, Any], Any], Awaitable[None]]


def _run(app: Any, body: Body) -> None:
    async def go() -> None:
        async with TestClient(TestServer(create_web_app(app.web_deps()))) as client:
            await body(client, app)

    asyncio.run(go())


async def _login(client: TestClient[Any, Any], user: str, password: str = PASSWORD) -> str:
    """Log in through the form; returns the session's CSRF token (from the page meta)."""
    r = await client.post(
        "/login", data={"username": user, "password": password}, allow_redirects=False
    )
    assert r.status == 302, await r.text()
    page = await (await client.get("/worklist" if user != "ops" else "/status")).text()
    return page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


async def _json(r: ClientResponse) -> Any:
    return json.loads(await r.text())


def test_every_route_needs_auth_except_the_probes(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)
    uid = app.study_uid

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        for method, path, _ in api.ROUTES:
            url = (
                path.replace("{study_uid}", uid)
                .replace("{series_uid}", "1.2.3")
                .replace("{result_id}", "00000000-0000-7000-8000-000000000000")
                .replace("{kind}", "SR")
            )
            r = await client.request(method, url, allow_redirects=False)
            if path in PUBLIC:
                assert r.status in (200, 503), (path, r.status)
                continue
            assert r.status == 401, (method, path, r.status)
            err = (await _json(r))["error"]
            assert err["code"] == "unauthenticated" and err["request_id"]
        for page in ("/worklist", f"/studies/{uid}", "/status"):
            r = await client.get(page, allow_redirects=False)
            assert r.status == 302 and r.headers["Location"].startswith("/login?next=")
        r = await client.get("/api/v1/studies", headers={"Authorization": "Bearer nope"})
        assert r.status == 401 and "token" in (await _json(r))["error"]["message"]

    _run(app, body)


def test_roles_csrf_reviews_and_audit(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)
    uid = app.study_uid

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        csrf = await _login(client, "rad")
        studies = await _json(await client.get("/api/v1/studies"))
        assert studies["total"] == 1
        row = studies["studies"][0]
        assert (row["patient_name"], row["patient_id"], row["state"]) == (
            "DOE^JANE",
            "WEB-1",
            "DONE",
        )
        assert row["ai_status"] == "1 result(s)"
        # a radiologist cannot manage users or read node status
        for method, path in (
            ("GET", "/api/v1/users"),
            ("GET", "/api/v1/status"),
            ("GET", "/metrics"),
        ):
            r = await client.request(method, path, headers={"X-CSRF-Token": csrf})
            assert r.status == 403 and (await _json(r))["error"]["code"] == "forbidden", path
        detail = await _json(await client.get(f"/api/v1/studies/{uid}"))
        (result,) = detail["results"]
        rid = result["result_id"]
        url = f"/api/v1/results/{rid}/reviews"
        review = {"finding": "lesion", "decision": "reject", "comment": "calcification"}
        r = await client.post(url, json=review)  # no CSRF token
        assert r.status == 403 and (await _json(r))["error"]["code"] == "csrf"
        r = await client.post(url, json=review, headers={"X-CSRF-Token": "wrong"})
        assert r.status == 403
        r = await client.post(url, data=review, headers={"X-CSRF-Token": csrf})  # a form
        assert r.status == 415
        r = await client.post(url, json=review, headers={"X-CSRF-Token": csrf})
        assert r.status == 201, await r.text()
        made = await _json(r)
        assert made["reviewer"] == "rad" and made["decision"] == "reject"
        out = app.store.query("SELECT type, payload FROM outbox WHERE key LIKE 'review/%'")
        assert out[0][0] == "review" and json.loads(out[0][1])["result_id"] == rid
        for bad, code in (
            ({"finding": "tumour", "decision": "reject"}, 400),
            ({"finding": "lesion", "decision": "maybe"}, 400),
            ({"finding": "lesion", "decision": "comment"}, 400),  # a comment needs text
            ({"finding": "lesion", "decision": "accept", "comment": "x" * 3000}, 400),
        ):
            r = await client.post(url, json=bad, headers={"X-CSRF-Token": csrf})
            assert r.status == code, bad
        # domain errors of the review rules answer as HTTP errors with their codes
        unknown = url.replace(rid, "00000000-0000-7000-8000-000000000000")
        r = await client.post(unknown, json=review, headers={"X-CSRF-Token": csrf})
        assert r.status == 404 and (await _json(r))["error"]["code"] == "not_found"

        def supersede(by: str | None) -> None:
            app.store.writer.call(
                lambda c: c.execute(
                    "UPDATE results SET superseded_by = ? WHERE result_id = ?", (by, rid)
                )
            )

        supersede("newer")
        r = await client.post(url, json=review, headers={"X-CSRF-Token": csrf})
        assert r.status == 409 and (await _json(r))["error"]["code"] == "superseded"
        supersede(None)
        r = await client.post(
            url,
            data=b"{not json",
            headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
        )
        assert r.status == 400 and (await _json(r))["error"]["code"] == "bad_request"
        # the operator sees the node, not patients
        client.session.cookie_jar.clear()
        csrf_ops = await _login(client, "ops")
        assert (await client.get("/api/v1/studies")).status == 403
        status = await _json(await client.get("/api/v1/status"))
        assert status["models"][0]["name"] == SEG_NAME and "storage" in status
        assert "CPUExecutionProvider" in status["execution_providers"]
        page = await (await client.get("/status")).text()
        assert "CPUExecutionProvider" in page and "Hub connectivity" in page
        metrics = await (await client.get("/metrics")).text()
        assert "edge_dicom_instances_total" in metrics and "edge_storage_tier_bytes" in metrics
        r = await client.post(
            "/api/v1/users",
            json={"username": "x", "role": "admin", "password": PASSWORD},
            headers={"X-CSRF-Token": csrf_ops},
        )
        assert r.status == 403
        # the admin: users, tokens, audit export
        client.session.cookie_jar.clear()
        csrf_root = await _login(client, "root")
        r = await client.post(
            "/api/v1/users",
            json={"username": "newrad", "role": "radiologist", "password": "short"},
            headers={"X-CSRF-Token": csrf_root},
        )
        assert r.status == 400 and "12 characters" in (await _json(r))["error"]["message"]
        r = await client.post(
            "/api/v1/tokens",
            json={"name": "prometheus", "username": "ops"},
            headers={"X-CSRF-Token": csrf_root},
        )
        token = (await _json(r))["token"]
        client.session.cookie_jar.clear()
        r = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200
        r = await client.get("/api/v1/studies", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 403  # the token acts as its user (operator)
        await _login(client, "root")
        csv_text = await (await client.get("/api/v1/audit?format=csv")).text()
        lines = csv_text.strip().splitlines()
        assert lines[0].startswith("id,at,username,action,target,remote")
        actions = [ln.split(",")[3] for ln in lines[1:]]
        assert "study.view" in actions and "review.create" in actions and "login" in actions
        view = next(ln for ln in lines[1:] if ",study.view," in ln)
        assert ",rad," in view and uid in view and "127.0.0.1" in view

    _run(app, body)


def test_lockout_session_fixation_and_logout(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        for _ in range(3):
            r = await client.post("/login", data={"username": "rad", "password": "wrong password!"})
            assert r.status == 401
        r = await client.post("/login", data={"username": "rad", "password": PASSWORD})
        assert r.status == 401  # locked: even the right password
        assert "wrong username or password, or the account is locked" in await r.text()
        r = await client.post("/login", data={"username": "nobody", "password": PASSWORD})
        assert r.status == 401  # same answer for an unknown user
        clock.advance(601)
        # a session id planted before login is not adopted
        client.session.cookie_jar.update_cookies({COOKIE: "planted-by-attacker"})
        csrf = await _login(client, "rad")
        issued = {c.value for c in client.session.cookie_jar if c.key == COOKIE}
        issued.discard("planted-by-attacker")
        (cookie,) = issued  # the server set a new id of its own
        assert len(cookie) >= 40
        assert app.accounts.session("planted-by-attacker", now=clock.now()) is None
        r = await client.post("/logout", data={"csrf_token": "wrong"}, allow_redirects=False)
        assert r.status == 403  # logout is a form with the CSRF token too
        r = await client.post("/logout", data={"csrf_token": csrf}, allow_redirects=False)
        assert r.status == 302
        client.session.cookie_jar.clear()
        client.session.cookie_jar.update_cookies({COOKIE: cookie})  # replay the old cookie
        assert (await client.get("/api/v1/studies")).status == 401
        # open redirect refused, whatever a browser would make of it
        for evil in (
            "//evil.example/x",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\\evil.example",
            "https://evil.example",
            " //evil.example",
        ):
            r = await client.post(
                "/login",
                data={"username": "rad", "password": PASSWORD, "next": evil},
                allow_redirects=False,
            )
            assert r.headers["Location"] == "/worklist", evil
        r = await client.post(
            "/login",
            data={"username": "rad", "password": PASSWORD, "next": "/studies/1.2.3?x=1"},
            allow_redirects=False,
        )
        assert r.headers["Location"] == "/studies/1.2.3?x=1"  # a local page is kept

    _run(app, body)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/studies/..%2F..%2Fetc%2Fpasswd", 400),
        ("/api/v1/studies/1.2.3'%20OR%201=1--", 400),
        ("/api/v1/studies/1.2.840.99999", 404),
        ("/api/v1/studies?limit=-1", 400),
        ("/api/v1/studies?limit=abc", 400),
        ("/api/v1/studies?state=DROP%20TABLE", 400),
        ("/api/v1/series/1.2.3/image?index=-1", 400),
        ("/api/v1/series/1.2.3/image?preset=../../x", 400),
        ("/api/v1/series/1.2.3/image", 404),
        ("/api/v1/results/..%2F..%2Fx/objects/SR", 400),
        ("/api/v1/results/00000000-0000-7000-8000-000000000000/objects/..%2Fkey", 400),
        ("/static/..%2F..%2Fapp.py", 404),
        ("/static/../accounts.py", 404),
    ],
)
def test_hostile_parameters_get_a_clear_json_error(
    app_factory: Any,
    tmp_path: Path,
    clock: Any,
    ref_models: dict[str, Path],
    path: str,
    status: int,
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        await _login(client, "root")
        r = await client.get(path, allow_redirects=False)
        assert r.status == status, (path, r.status, await r.text())
        if path.startswith("/api/"):
            assert (await _json(r))["error"]["code"]

    _run(app, body)


def test_search_is_not_injectable_and_filters_work(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        await _login(client, "rad")
        for q, n in (
            ("doe", 1),
            ("WEB-1", 1),
            ("' OR 1=1 --", 0),
            ("%", 0),
            ("_", 0),
            ("smith", 0),
        ):
            data = await _json(await client.get("/api/v1/studies", params={"q": q}))
            assert data["total"] == n, q
        assert (await _json(await client.get("/api/v1/studies?critical=true")))["total"] in (0, 1)
        assert (await _json(await client.get("/api/v1/studies?state=FAILED")))["total"] == 0

    _run(app, body)


def test_openapi_document_is_valid_and_matches_the_routes(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    from openapi_spec_validator import validate

    app = _agent(app_factory, tmp_path, clock, ref_models)

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        await _login(client, "rad")
        doc = await _json(await client.get("/api/v1/openapi.json"))
        validate(doc)
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        served = {(m, p) for m, p, _ in api.ROUTES}
        assert documented == served
        for method, path, handler in api.ROUTES:  # roles in the document = roles enforced
            desc = doc["paths"][path][method.lower()]["description"]
            roles = getattr(handler, "roles", None)
            if roles is None:
                assert "public" in desc, path
            else:
                assert desc == "Roles: " + ", ".join((*roles, "admin")), path

    _run(app, body)


def test_probes(app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]) -> None:
    app = app_factory(make_config(tmp_path))

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        assert (await _json(await client.get("/healthz")))["status"] == "ok"
        r = await client.get("/readyz")
        assert r.status == 503
        assert (await _json(r))["checks"]["models"] == "no active model installed"
        app.registry.install(ref_models[SEG_NAME])
        r = await client.get("/readyz")
        assert r.status == 200 and (await _json(r))["checks"] == {
            "store": "ok",
            "listener": "ok",
            "models": "ok",
        }

    _run(app, body)


def test_priors_chart_report_and_pdf(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)
    # an earlier-or-later study of the same patient, with a hostile name to check escaping
    s = make_study(
        tmp_path / "ct2",
        modality="CT",
        slices=6,
        size=128,
        seed="web-2",
        patient_id="WEB-1",
        patient_name="<script>alert(1)</script>^X",
    )
    assert storescu(app.listener.port, *s.files).returncode == 0
    clock.advance(11)
    app.assembly.tick()
    app.inference.drain()

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        csrf = await _login(client, "rad")
        pri = (await _json(await client.get(f"/api/v1/studies/{s.study_uid}/priors")))["priors"]
        assert [p["study_uid"] for p in pri].count(s.study_uid) == 1 and len(pri) == 2
        assert all(p["area_mm2_total"] is not None for p in pri)
        page = await (await client.get(f"/studies/{s.study_uid}")).text()
        assert '<svg class="priors" data-key="area_mm2_total"' in page
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
        report = await (await client.get(f"/studies/{s.study_uid}/report")).text()
        assert "lesion: not reviewed" in report and SEG_NAME in report
        rid = (await _json(await client.get(f"/api/v1/studies/{s.study_uid}")))["results"][0][
            "result_id"
        ]
        r = await client.post(
            f"/api/v1/results/{rid}/reviews",
            json={"finding": "lesion", "decision": "accept"},
            headers={"X-CSRF-Token": csrf},
        )
        assert r.status == 201
        report = await (await client.get(f"/studies/{s.study_uid}/report")).text()
        assert "lesion: accepted by rad" in report
        r = await client.get(f"/api/v1/studies/{s.study_uid}/report.pdf")
        assert r.status == 200 and r.content_type == "application/pdf"
        data = await r.read()
        assert data.startswith(b"%PDF-") and len(data) > 1000
        lone = (await _json(await client.get("/api/v1/studies?q=other")))["total"]
        assert lone == 0

    _run(app, body)


def test_conflict_queue_is_resolvable_from_the_ui_api(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    from cloud_hub.app import HubConfig
    from cloud_hub.app import create_app as create_hub_app
    from cloud_hub.store import HubStore, connect
    from edge_agent.sync.client import Credential, HttpHubClient
    from hub_protocol import RecordType
    from tests.integration.test_hub import _push, enrolled, mutable

    app = _agent(app_factory, tmp_path, clock, ref_models)
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    hub_store = HubStore(connect(url))

    async def go() -> None:
        hub_app = create_hub_app(HubConfig(database_url=url), store=hub_store)
        async with TestClient(TestServer(hub_app)) as hub:
            site, auth = await enrolled(hub, hub_store, "edge")
            for seq, hlc, verdict in ((1, 10, "accept"), (2, 20, "reject")):
                rec = mutable("review/x1", seq, RecordType.REVIEW, 0, hlc, {"verdict": verdict})
                await hub.post("/v1/push", data=_push(site, rec), headers=auth)
            cred = Credential(str(hub.make_url("")).rstrip("/"), site, auth["Authorization"][7:])
            app.hub_client = HttpHubClient(cred)
            try:
                async with TestClient(TestServer(create_web_app(app.web_deps()))) as client:
                    csrf = await _login(client, "rad")
                    queue = (await _json(await client.get("/api/v1/conflicts")))["conflicts"]
                    assert len(queue) == 1 and queue[0]["key"] == "review/x1"
                    assert queue[0]["edge_payload"] == {"verdict": "reject"}
                    assert queue[0]["cloud_payload"] == {"verdict": "accept"}
                    page = await (await client.get("/conflicts")).text()
                    assert 'data-start="conflicts"' in page
                    path = f"/api/v1/conflicts/{queue[0]['id']}/resolve"
                    r = await client.post(
                        path, json={"take": "sideways"}, headers={"X-CSRF-Token": csrf}
                    )
                    assert r.status == 400
                    r = await client.post(
                        path, json={"take": "edge"}, headers={"X-CSRF-Token": csrf}
                    )
                    assert r.status == 200, await r.text()
                    assert (await _json(r))["version"] == 2
                    r = await client.post(
                        path, json={"take": "edge"}, headers={"X-CSRF-Token": csrf}
                    )
                    # already resolved: 409 with the first decision (not a silent second one)
                    assert r.status == 409, await r.text()
                    err = (await _json(r))["error"]
                    assert (
                        err["code"] == "already_resolved"
                        and "edge version kept by rad" in (err["message"])
                    )
                    assert (await _json(await client.get("/api/v1/conflicts")))["conflicts"] == []
                    resolved = hub_store.conflicts(site, open_only=False)[0]
                    assert resolved["resolved_by"] == "rad"
            finally:
                await app.hub_client.close()
        # the hub gone: a clear 503, not a stack trace
        async with TestClient(TestServer(create_web_app(app.web_deps()))) as client:
            await _login(client, "rad")
            r = await client.get("/api/v1/conflicts")
            assert r.status == 503 and (await _json(r))["error"]["code"] == "hub_unreachable"
        await app.hub_client.close()

    asyncio.run(go())


def test_login_throttle_per_address_answers_429_and_is_audited(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    app = app_factory(make_config(tmp_path, web={"login_throttle_attempts": 3}))
    app.accounts.add_user("rad", "radiologist", PASSWORD, now=clock.now())

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        for i in range(3):  # three different names: no account is locked by it
            r = await client.post("/login", data={"username": f"u{i}", "password": "guess!"})
            assert r.status == 401
        r = await client.post("/login", data={"username": "rad", "password": PASSWORD})
        assert r.status == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 300
        assert "too many failed logins from this address" in await r.text()
        clock.advance(301)
        await _login(client, "rad")  # the window passed: the right password works again
        text = app.metrics.registry
        assert text.get_sample_value("edge_web_logins_total", {"outcome": "throttled"}) == 1

    _run(app, body)
    rows = app.store.query("SELECT action, target FROM audit_log ORDER BY id")
    actions = [(r["action"], r["target"]) for r in rows]
    assert actions[:5] == [
        ("login.failed", "u0"),
        ("login.failed", "u1"),
        ("login.failed", "u2"),
        ("login.throttled", "rad"),
        ("login", "rad"),
    ]


def test_pdf_report_has_the_unicode_name_units_reviews_and_page_numbers(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    import io
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from pypdf import PdfReader

    app = _agent(
        app_factory,
        tmp_path,
        clock,
        ref_models,
        patient_name="Żółkiewski^Łukasz",
        site={"time_zone": "Europe/Warsaw"},
    )
    uid = app.study_uid

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        csrf = await _login(client, "rad")
        (result,) = (await _json(await client.get(f"/api/v1/studies/{uid}")))["results"]
        url = f"/api/v1/results/{result['result_id']}/reviews"
        reviews = [{"finding": "lesion", "decision": "accept", "comment": "żółta plama"}]
        # enough comments for a second page
        reviews += [
            {"finding": "lesion", "decision": "comment", "comment": f"note {i}"} for i in range(40)
        ]
        for review in reviews:
            r = await client.post(url, json=review, headers={"X-CSRF-Token": csrf})
            assert r.status == 201, await r.text()
        r = await client.get(f"/api/v1/studies/{uid}/report.pdf")
        assert r.status == 200 and r.content_type == "application/pdf"
        pages = [p.extract_text() for p in PdfReader(io.BytesIO(await r.read())).pages]
        text = "\n".join(pages)
        assert "Patient Żółkiewski, Łukasz (WEB-1)" in text
        assert "?" not in text.split("Study UID", 1)[0]  # nothing replaced by "?"
        assert "Study CT 2026-11-25 Synthetic CT study" in text
        area = result["findings"]["area_mm2_total"]
        assert f"Total area {area:,.1f} mm²" in text
        ml = result["findings"]["volume_mm3"] / 1000
        shown = re.search(r"Volume ([0-9.,]+) mL", text)
        assert shown is not None and float(shown[1]) == pytest.approx(ml, abs=0.0005), text
        assert "Mean intensity (HU)" in text
        assert "mm2" not in text and "mm3" not in text and "mm³" not in text
        assert "Review: lesion accepted by rad" in text
        assert "Comment: lesion rad (" in text and "): żółta plama" in text
        assert "note 39" in text
        zone = ZoneInfo("Europe/Warsaw")
        generated = datetime.fromtimestamp(clock.now(), zone).strftime("%Y-%m-%d %H:%M")
        received = datetime.fromtimestamp(
            app.store.query("SELECT last_received_at FROM studies")[0][0], zone
        ).strftime("%Y-%m-%d %H:%M:%S")
        assert f"Received {received} Europe/Warsaw" in text
        assert len(pages) >= 2
        for n, page in enumerate(pages, 1):
            assert f"generated {generated} Europe/Warsaw" in page, n
            assert f"page {n} of {len(pages)}" in page, n
        # the HTML report says the same
        page = await (await client.get(f"/studies/{uid}/report")).text()
        assert "Żółkiewski, Łukasz (WEB-1)" in page and "Mean intensity (HU)" in page
        assert f"{area:,.1f} mm²" in page and " mL</td>" in page
        assert "lesion: rad (" in page and "żółta plama" in page
        assert f"Generated {generated}" in page and "Europe/Warsaw" in page

    _run(app, body)


def test_reads_of_patient_data_are_audited_chained_and_exported_safely(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    from edge_agent import audit as audit_log

    app = _agent(app_factory, tmp_path, clock, ref_models)
    uid = app.study_uid

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        # a login attempt with a spreadsheet formula as its username ends up in the log
        r = await client.post(
            "/login", data={"username": '=HYPERLINK("http://x.example","y")', "password": "p"}
        )
        assert r.status == 401
        await _login(client, "rad")
        assert (await client.get("/api/v1/studies?q=doe&state=DONE")).status == 200
        detail = await _json(await client.get(f"/api/v1/studies/{uid}"))
        series = detail["series"][0]["series_uid"]
        assert (await client.get(f"/api/v1/series/{series}/image?index=1")).status == 200
        assert (await client.get(f"/api/v1/studies/{uid}/priors")).status == 200
        client.session.cookie_jar.clear()
        await _login(client, "root")
        assert (await client.get("/api/v1/users")).status == 200
        csv_text = await (await client.get("/api/v1/audit?format=csv")).text()
        assert "'=HYPERLINK(" in csv_text and ',"=HYPERLINK' not in csv_text
        assert csv_text.splitlines()[0].endswith(",prev_sha256,sha256")

    _run(app, body)
    rows = {
        r["action"]: r
        for r in app.store.query("SELECT action, username, target, detail FROM audit_log")
    }
    worklist = rows["worklist.query"]
    assert (worklist["username"], worklist["target"]) == ("rad", "doe")
    assert json.loads(worklist["detail"]) == {
        "q": "doe",
        "state": "DONE",
        "offset": 0,
        "shown": 1,
        "total": 1,
    }
    assert rows["image.view"]["target"] and rows["image.view"]["detail"].startswith("slice 1")
    assert rows["priors.view"]["target"] == uid
    assert rows["users.list"]["username"] == "root"
    with app.store.read() as conn:
        verdict = audit_log.verify(conn)
    assert verdict.intact and verdict.rows == len(app.store.query("SELECT id FROM audit_log"))


class _Browser:
    """Another client of the same test server, with a cookie jar of its own."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self._url = client.make_url

    def get(self, path: str, **kw: Any) -> Any:
        return self._session.get(self._url(path), **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self._session.post(self._url(path), **kw)

    async def close(self) -> None:
        await self._session.close()


def test_account_controls_forced_change_disable_reset_and_tokens(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = _agent(app_factory, tmp_path, clock, ref_models)
    new_password = "violet staple 42 orbit"

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        root_csrf = await _login(client, "root")
        hdr = {"X-CSRF-Token": root_csrf}
        r = await client.post(
            "/api/v1/users",
            json={"username": "newrad", "role": "radiologist", "password": "Password2026!"},
            headers=hdr,
        )
        assert r.status == 400 and "too easy" in (await _json(r))["error"]["message"]
        r = await client.post(
            "/api/v1/users",
            json={"username": "newrad", "role": "radiologist", "password": PASSWORD},
            headers=hdr,
        )
        assert r.status == 201
        r = await client.post(
            "/api/v1/tokens", json={"name": "ris", "username": "rad", "ttl_days": 1}, headers=hdr
        )
        token = (await _json(r))["token"]
        bearer = {"Authorization": f"Bearer {token}"}

        # the new radiologist must choose a password before anything else
        other = _Browser(client)  # a second browser, with cookies of its own
        try:
            r = await other.post(
                "/login", data={"username": "newrad", "password": PASSWORD}, allow_redirects=False
            )
            assert r.status == 302 and r.headers["Location"] == "/account/password"
            r = await other.get("/worklist", allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "/account/password"
            r = await other.get("/api/v1/studies")
            assert r.status == 403
            assert (await _json(r))["error"]["code"] == "password_change_required"
            page = await (await other.get("/account/password")).text()
            assert 'id="password-forced"' in page
            csrf = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            form = {"csrf_token": csrf, "current": PASSWORD, "new": new_password}
            r = await other.post("/account/password", data={**form, "again": "typo"})
            assert r.status == 400 and "differ" in await r.text()
            r = await other.post("/account/password", data={**form, "again": new_password})
            assert r.status == 200 and 'id="password-done"' in await r.text()
            assert (await other.get("/api/v1/studies")).status == 200
            # the admin disables the account: its session ends at once
            r = await client.post("/api/v1/users/newrad/disable", headers=hdr)
            assert r.status == 200 and (await _json(r))["sessions_ended"] == 1
            assert (await other.get("/api/v1/studies")).status == 401
            r = await other.post("/login", data={"username": "newrad", "password": new_password})
            assert r.status == 401
            assert (await client.post("/api/v1/users/newrad/enable", headers=hdr)).status == 200
            # an admin's reset forces a change again
            r = await client.post(
                "/api/v1/users/newrad/password", json={"password": PASSWORD}, headers=hdr
            )
            assert r.status == 200
            r = await other.post(
                "/login", data={"username": "newrad", "password": PASSWORD}, allow_redirects=False
            )
            assert r.headers["Location"] == "/account/password"
        finally:
            await other.close()
        assert (await client.post("/api/v1/users/nobody/disable", headers=hdr)).status == 404

        # API tokens: listed without secrets, expire, are revoked
        listed = (await _json(await client.get("/api/v1/tokens")))["tokens"]
        assert [t["name"] for t in listed] == ["ris"] and "token" not in listed[0]
        assert (await client.get("/api/v1/studies", headers=bearer)).status == 200
        clock.advance(86401)
        r = await client.get("/api/v1/studies", headers=bearer)
        assert r.status == 401 and "expired" in (await _json(r))["error"]["message"]
        hdr = {"X-CSRF-Token": await _login(client, "root")}  # its session expired too
        r = await client.post(
            "/api/v1/tokens", json={"name": "ris2", "username": "rad"}, headers=hdr
        )
        bearer = {"Authorization": f"Bearer {(await _json(r))['token']}"}
        assert (await client.get("/api/v1/studies", headers=bearer)).status == 200
        assert (await client.post("/api/v1/tokens/ris2/revoke", headers=hdr)).status == 200
        assert (await client.get("/api/v1/studies", headers=bearer)).status == 401
        r = await client.post("/api/v1/account/password", json={}, headers=bearer)
        assert r.status == 401

    _run(app, body)
    actions = [r["action"] for r in app.store.query("SELECT action FROM audit_log")]
    for expected in (
        "user.create",
        "password.change_failed",
        "password.change",
        "user.disable",
        "user.enable",
        "user.password",
        "token.create",
        "token.revoke",
    ):
        assert expected in actions, expected


def test_security_headers_and_non_ascii_csrf_tokens(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    app = app_factory(make_config(tmp_path))
    app.accounts.add_user("rad", "radiologist", PASSWORD, now=clock.now())

    async def body(client: TestClient[Any, Any], app: Any) -> None:
        await _login(client, "rad")
        page = await client.get("/worklist")
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in await page.text()  # nothing inline for the CSP to allow
        assert "Strict-Transport-Security" not in page.headers  # plain HTTP: not sent
        for bad in ("jeton-\u00e9", "\u0442\u043e\u043a\u0435\u043d"):
            r = await client.post("/logout", data={"csrf_token": bad}, allow_redirects=False)
            assert r.status == 403, bad
            r = await client.post(
                "/api/v1/account/password", json={}, headers={"X-CSRF-Token": bad}
            )
            assert r.status == 403, bad

    _run(app, body)
