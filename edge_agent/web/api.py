"""REST API ``/api/v1``: what the pages show and do, as JSON (see ``openapi.py``)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
from functools import partial
from typing import Any

import pydicom
from aiohttp import web

from edge_agent import audit as audit_log
from edge_agent import status
from edge_agent.actions.rerun import rerun
from edge_agent.results import reviews
from edge_agent.results.reviews import check_decision
from edge_agent.sync.client import HttpHubClient, HubRejected, HubUnavailable
from edge_agent.web import queries
from edge_agent.web.accounts import AccountError
from edge_agent.web.http import DEPS, SESSION, USER, ApiError, WebDeps, actor, audit, require
from edge_agent.web.images import PRESETS, render, seg_mask
from edge_agent.web.report import pdf as report_pdf

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
STATES = ("RECEIVING", "COMPLETE", "INFERRING", "DONE", "FAILED")
RESULT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uid(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if len(value) > 64 or not UID.fullmatch(value):
        raise ApiError(400, "bad_request", f"{name} is not a DICOM UID")
    return value


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(400, "bad_request", f"{name} must be {lo}..{hi}")
    return value


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str:
    value = request.query.get(name, "")
    if value and value not in allowed:
        raise ApiError(400, "bad_request", f"{name} must be one of {', '.join(allowed)}")
    return value


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send application/json")
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise ApiError(400, "bad_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _str(body: dict[str, Any], name: str, *, max_len: int = 200, required: bool = True) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or (required and not value) or len(value) > max_len:
        raise ApiError(400, "bad_request", f"{name} must be a string of 1..{max_len} characters")
    return value


# -- worklist and studies -------------------------------------------------------------------


def _ai_status(row: sqlite3.Row) -> str:
    state = row["state"]
    if state in ("RECEIVING", "COMPLETE"):
        return "waiting"
    if state == "INFERRING":
        return "running"
    if state == "FAILED":
        return "failed"
    return f"{row['results']} result(s)" if row["results"] else "no model applies"


@require("radiologist")
async def list_studies(request: web.Request) -> web.Response:
    """Worklist: studies, critical first then newest; filter by text, state, modality."""
    deps = request.app[DEPS]
    q = request.query.get("q", "")[:100]
    params: dict[str, str | int] = {
        "q": q,
        "pat": queries.like(q),
        "state": _choice(request, "state", STATES),
        "modality": request.query.get("modality", "")[:16].upper(),
    }
    critical = _choice(request, "critical", ("true", "false"))
    params["critical"] = {"": -1, "true": 1, "false": 0}[critical]
    limit, offset = _int(request, "limit", 100, 1, 500), _int(request, "offset", 0, 0, 10**9)

    def query() -> tuple[list[sqlite3.Row], int]:
        with deps.store.read() as conn:
            return queries.worklist(conn, params, limit=limit, offset=offset)

    rows, total = await asyncio.to_thread(query)
    # a worklist is every listed patient's name and ID: who looked, with which filter
    filters = {k: v for k, v in params.items() if k != "pat" and v not in ("", -1)}
    filters.update(offset=offset, shown=len(rows), total=total)
    await audit(request, "worklist.query", q or "*", json.dumps(filters, ensure_ascii=False))
    return web.json_response(
        {
            "total": total,
            "studies": [
                {
                    "study_uid": r["study_uid"],
                    "patient_name": r["patient_name"],
                    "patient_id": r["patient_id"],
                    "accession_number": r["accession_number"],
                    "modality": r["modality"],
                    "study_date": r["study_date"],
                    "description": r["description"],
                    "state": r["state"],
                    "received_at": r["last_received_at"],
                    "instances": r["instance_count"],
                    "ai_status": _ai_status(r),
                    "results": r["results"],
                    "critical": bool(r["critical"]),
                    "reviews": r["reviews"],
                }
                for r in rows
            ],
        }
    )


async def load_study(request: web.Request) -> dict[str, Any]:
    """The ``study_uid`` of the path, in full (404 if unknown); off the event loop."""
    uid = _uid(request, "study_uid")
    deps = request.app[DEPS]

    def query() -> dict[str, Any] | None:
        with deps.store.read() as conn:
            return queries.study_detail(conn, uid)

    detail = await asyncio.to_thread(query)
    if detail is None:
        raise ApiError(404, "not_found", "no such study")
    return detail


@require("radiologist")
async def get_study(request: web.Request) -> web.Response:
    """One study: series, instances (tier), current results with findings and reviews."""
    detail = await load_study(request)
    await audit(request, "study.view", detail["study_uid"], "api")
    return web.json_response(detail)


@require("radiologist")
async def series_image(request: web.Request) -> web.Response:
    """PNG of one slice (index in instance order), window preset, AI overlay."""
    series_uid = _uid(request, "series_uid")
    index = _int(request, "index", 0, 0, 100000)
    preset = _choice(request, "preset", tuple(PRESETS)) or "auto"
    overlay = _choice(request, "overlay", ("0", "1")) != "0"
    deps = request.app[DEPS]

    def build() -> bytes:
        with deps.store.read() as conn:
            rows = queries.series_slices(conn, series_uid)
            seg = queries.current_seg_path(conn, series_uid)
        if not rows:
            raise ApiError(404, "not_found", "no such series")
        if index >= len(rows):
            raise ApiError(400, "bad_request", f"index must be 0..{len(rows) - 1}")
        sop, tier, path = rows[index]
        ds = pydicom.dcmread(io.BytesIO(deps.read_instance(tier, path)))
        mask = None
        if overlay and seg is not None:
            mask = seg_mask(deps.data_dir / seg, sop)
        return render(ds, preset=preset, mask=mask)

    png = await asyncio.to_thread(build)
    await audit(request, "image.view", series_uid, f"slice {index}, {preset}")
    return web.Response(body=png, content_type="image/png")


@require("radiologist")
async def result_object(request: web.Request) -> web.StreamResponse:
    """The SR, SEG or KOS (KO) object of a result, as a DICOM file."""
    rid, kind = request.match_info["result_id"], request.match_info["kind"].upper()
    if not RESULT_ID.fullmatch(rid) or kind not in ("SR", "SEG", "KO"):
        raise ApiError(400, "bad_request", "bad result id or kind (SR|SEG|KO)")
    deps = request.app[DEPS]
    with deps.store.read() as conn:
        path = queries.result_object_path(conn, rid, kind)
    if path is None:
        raise ApiError(404, "not_found", "no such object")
    await audit(request, "object.download", f"{rid}/{kind}")
    return web.FileResponse(
        deps.data_dir / path,
        headers={
            "Content-Type": "application/dicom",
            "Content-Disposition": f'attachment; filename="{kind.lower()}-{rid}.dcm"',
        },
    )


@require("radiologist")
async def create_review(request: web.Request) -> web.Response:
    """Accept, reject or comment on a finding of a current result; syncs to the hub."""
    rid = request.match_info["result_id"]
    if not RESULT_ID.fullmatch(rid):
        raise ApiError(400, "bad_request", "not a result id")
    body = await _body(request)
    finding = _str(body, "finding", max_len=64)
    decision = _str(body, "decision", max_len=16)
    check_decision(decision)
    comment = _str(body, "comment", max_len=2000, required=decision == "comment")
    deps, user = request.app[DEPS], request[USER]
    write = partial(
        reviews.create_review,
        result_id=rid,
        finding=finding,
        decision=decision,
        comment=comment,
        username=user.username,
        now=deps.clock.now(),
        hlc=deps.hlc,
    )
    review = await asyncio.to_thread(deps.store.writer.call, write)
    await audit(request, "review.create", rid, f"{finding}: {decision}")
    if deps.review_hook is not None:
        deps.review_hook()
    return web.json_response(review, status=201)


@require("radiologist")
async def study_priors(request: web.Request) -> web.Response:
    """The patient's studies with their segmentation measurements, oldest first."""
    uid = _uid(request, "study_uid")
    deps = request.app[DEPS]

    def query() -> list[dict[str, Any]] | None:
        with deps.store.read() as conn:
            if not queries.study_exists(conn, uid):
                return None
            return queries.priors(conn, uid)

    found = await asyncio.to_thread(query)
    if found is None:
        raise ApiError(404, "not_found", "no such study")
    await audit(request, "priors.view", uid, f"{len(found)} studies")
    return web.json_response({"study_uid": uid, "priors": found})


@require("radiologist")
async def study_report_pdf(request: web.Request) -> web.Response:
    """The study's AI report as PDF (same content as the SR, with review status)."""
    detail = await load_study(request)
    uid = detail["study_uid"]
    deps = request.app[DEPS]
    body = await asyncio.to_thread(
        report_pdf, detail, site=deps.site, times=deps.times, now=deps.clock.now()
    )
    await audit(request, "report.view", uid, "pdf")
    return web.Response(
        body=body,
        content_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="report-{uid}.pdf"'},
    )


@require("radiologist", "operator")
async def restore_study(request: web.Request) -> web.Response:
    """Ask for an archived or cold study to come back to the hot tier."""
    uid = _uid(request, "study_uid")
    deps = request.app[DEPS]
    await asyncio.to_thread(deps.request_restore, uid, f"web:{request[USER].username}")
    await audit(request, "study.restore", uid)
    return web.json_response({"study_uid": uid, "restore": "requested"}, status=202)


async def _optional_body(request: web.Request) -> dict[str, Any]:
    """The JSON body, or {} when there is none."""
    return await _body(request) if request.body_exists else {}


@require("radiologist", "operator")
async def rerun_study(request: web.Request) -> web.Response:
    """Run a study's inference again: every model that applies, or ``model`` only; each
    new result supersedes the previous one (audited)."""
    uid = _uid(request, "study_uid")
    body = await _optional_body(request)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 64):
        raise ApiError(400, "bad_request", "model must be a model name (1..64 characters)")
    deps = request.app[DEPS]
    round_ = await asyncio.to_thread(
        rerun, deps.store, uid, model=model, actor=actor(request), now=deps.clock.now()
    )
    return web.json_response(
        {"study_uid": uid, "rerun": "requested", "model": model, "round": round_}, status=202
    )


# -- conflicts (the hub's manual-review queue for this site) --------------------------------


def _hub(request: web.Request) -> HttpHubClient:
    hub = request.app[DEPS].hub
    if hub is None:
        raise ApiError(409, "not_enrolled", "this agent is not enrolled with a hub")
    return hub


@require("radiologist", "operator")
async def list_conflicts(request: web.Request) -> web.Response:
    """Records edited both here and at the hub, waiting for a person to choose."""
    try:
        rows = await _hub(request).conflicts()
    except HubUnavailable as exc:
        raise ApiError(503, "hub_unreachable", f"the hub cannot be reached now: {exc}") from exc
    for r in rows:
        for side in ("edge_payload", "cloud_payload"):
            if isinstance(r.get(side), str):
                r[side] = json.loads(r[side])
    await audit(request, "conflicts.view", "hub", f"{len(rows)} conflicts")
    return web.json_response({"conflicts": rows})


@require("radiologist", "operator")
async def resolve_conflict(request: web.Request) -> web.Response:
    """Keep the edge or the cloud version of a conflicting record (logged, synced back)."""
    try:
        cid = int(request.match_info["conflict_id"])
    except ValueError:
        raise ApiError(400, "bad_request", "conflict id must be an integer") from None
    body = await _body(request)
    take = _str(body, "take", max_len=8)
    if take not in ("edge", "cloud"):
        raise ApiError(400, "bad_request", "take must be edge or cloud")
    by = request[USER].username
    try:
        version = await _hub(request).resolve_conflict(cid, take, by)
    except HubUnavailable as exc:
        raise ApiError(503, "hub_unreachable", f"the hub cannot be reached now: {exc}") from exc
    except HubRejected as exc:
        if exc.code == "already_resolved":  # two people at once: the first decision stands
            raise ApiError(409, "already_resolved", exc.message) from exc
        raise ApiError(404, "not_found", f"no open conflict {cid}") from exc
    await audit(request, "conflict.resolve", str(cid), take)
    return web.json_response({"conflict_id": cid, "take": take, "version": version})


# -- node status ----------------------------------------------------------------------------


def node_status_data(deps: WebDeps) -> dict[str, Any]:
    """Connectivity, outbox, dead letters, storage, devices, models, recent errors."""
    return status.node_status(deps.store, health=deps.health(), storage=deps.storage_status())


@require("operator")
async def node_status(request: web.Request) -> web.Response:
    """Connectivity, outbox, dead letters, storage, devices, models, recent errors."""
    return web.json_response(await asyncio.to_thread(node_status_data, request.app[DEPS]))


# -- users, tokens, audit -------------------------------------------------------------------


@require()
async def list_users(request: web.Request) -> web.Response:
    """Local accounts (admin)."""
    users = request.app[DEPS].accounts.users()
    await audit(request, "users.list", "accounts", f"{len(users)} users")
    return web.json_response({"users": users})


@require()
async def add_user(request: web.Request) -> web.Response:
    """Create an account (admin)."""
    body = await _body(request)
    username, role = _str(body, "username", max_len=64), _str(body, "role", max_len=16)
    password = _str(body, "password", max_len=1024)
    deps = request.app[DEPS]
    try:
        user = await asyncio.to_thread(  # the admin chose it: the user must change it
            partial(deps.accounts.add_user, must_change_password=True),
            username,
            role,
            password,
            now=deps.clock.now(),
        )
    except AccountError as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    await audit(request, "user.create", username, role)
    return web.json_response({"username": user.username, "role": user.role}, status=201)


@require()
async def create_token(request: web.Request) -> web.Response:
    """An API token for a machine, acting as a user (admin; shown once)."""
    body = await _body(request)
    name, username = _str(body, "name", max_len=64), _str(body, "username", max_len=64)
    days = body.get("ttl_days")
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= 3650
    ):
        raise ApiError(400, "bad_request", "ttl_days must be a number of days, 0 < n <= 3650")
    deps = request.app[DEPS]
    try:
        token = await asyncio.to_thread(
            deps.accounts.create_token,
            name,
            username,
            now=deps.clock.now(),
            ttl_s=None if days is None else float(days) * 86400,
        )
    except AccountError as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    await audit(request, "token.create", name, username)
    return web.json_response({"name": name, "username": username, "token": token}, status=201)


@require()
async def list_tokens(request: web.Request) -> web.Response:
    """API tokens: name, user, created, expiry, revocation (never the secret; admin)."""
    tokens = await asyncio.to_thread(request.app[DEPS].accounts.tokens)
    return web.json_response({"tokens": tokens})


@require()
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke an API token by name (admin); it stops working at once."""
    name = request.match_info["name"][:64]
    deps = request.app[DEPS]
    try:
        await asyncio.to_thread(deps.accounts.revoke_token, name, now=deps.clock.now())
    except AccountError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    await audit(request, "token.revoke", name)
    return web.json_response({"name": name, "revoked": True})


async def _user_action(request: web.Request, action: str) -> web.Response:
    """disable / enable / logout / password (an admin's reset) of the user in the path."""
    username = request.match_info["username"][:64]
    deps = request.app[DEPS]
    acc = deps.accounts
    detail = ""
    try:
        if action == "disable":
            ended = await asyncio.to_thread(acc.set_disabled, username, True)
        elif action == "enable":
            ended = await asyncio.to_thread(acc.set_disabled, username, False)
        elif action == "logout":
            ended = await asyncio.to_thread(acc.end_sessions, username)
        else:
            password = _str(await _body(request), "password", max_len=1024)
            ended = await asyncio.to_thread(
                acc.set_password, username, password, now=deps.clock.now()
            )
            detail = "must change at next login"
    except AccountError as exc:
        status = 404 if str(exc).startswith("no user") else 400
        raise ApiError(status, "not_found" if status == 404 else "bad_request", str(exc)) from exc
    await audit(request, f"user.{action}", username, detail or f"{ended} sessions ended")
    return web.json_response({"username": username, "sessions_ended": ended})


@require()
async def disable_user(request: web.Request) -> web.Response:
    """Disable an account (admin): its sessions end, its API tokens stop working."""
    return await _user_action(request, "disable")


@require()
async def enable_user(request: web.Request) -> web.Response:
    """Enable a disabled account again (admin)."""
    return await _user_action(request, "enable")


@require()
async def logout_user(request: web.Request) -> web.Response:
    """End every session of an account (admin)."""
    return await _user_action(request, "logout")


@require()
async def reset_password(request: web.Request) -> web.Response:
    """Set an account's password (admin); it must be changed at the next login."""
    return await _user_action(request, "password")


@require("radiologist", "operator")
async def change_own_password(request: web.Request) -> web.Response:
    """Change your own password (a session only): the current one, then the new one; your
    other sessions end."""
    session = request.get(SESSION)
    if session is None:
        raise ApiError(403, "forbidden", "an API token cannot change a password")
    body = await _body(request)
    current, new = _str(body, "current", max_len=1024), _str(body, "new", max_len=1024)
    deps = request.app[DEPS]
    try:
        await asyncio.to_thread(
            deps.accounts.change_password, session, current, new, now=deps.clock.now()
        )
    except AccountError as exc:
        await audit(request, "password.change_failed", session.user.username, str(exc))
        raise ApiError(400, "bad_request", str(exc)) from exc
    await audit(request, "password.change", session.user.username)
    return web.json_response({"username": session.user.username, "changed": True})


@require()
async def export_audit(request: web.Request) -> web.Response:
    """The audit log since a time, as JSON or CSV (admin)."""
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise ApiError(400, "bad_request", "since must be a Unix time") from None
    fmt = _choice(request, "format", ("json", "csv")) or "json"
    limit = _int(request, "limit", 10000, 1, 1000000)
    with request.app[DEPS].store.read() as conn:
        rows = queries.audit_rows(conn, since=since, limit=limit)
    await audit(request, "audit.export", fmt, f"{len(rows)} rows")
    if fmt == "csv":
        buf = io.StringIO()
        audit_log.write_csv(rows, buf)
        return web.Response(text=buf.getvalue(), content_type="text/csv")
    return web.json_response({"entries": rows})


# -- observability --------------------------------------------------------------------------


@require("operator")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (operator, or an API token)."""
    body = await asyncio.to_thread(request.app[DEPS].metrics_text)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def healthz(request: web.Request) -> web.Response:
    """The process is alive (no auth: for probes)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Store writable, listener accepting, models loaded (no auth: for probes)."""
    checks = await asyncio.to_thread(request.app[DEPS].ready)
    ok = not any(checks.values())
    return web.json_response(
        {
            "status": "ready" if ok else "not ready",
            "checks": {k: v or "ok" for k, v in checks.items()},
        },
        status=200 if ok else 503,
    )


@require("radiologist", "operator")
async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI 3.1 document."""
    from edge_agent.web.openapi import document

    return web.json_response(document())


ROUTES: tuple[tuple[str, str, Any], ...] = (
    ("GET", "/api/v1/studies", list_studies),
    ("GET", "/api/v1/studies/{study_uid}", get_study),
    ("POST", "/api/v1/studies/{study_uid}/restore", restore_study),
    ("POST", "/api/v1/studies/{study_uid}/rerun", rerun_study),
    ("GET", "/api/v1/studies/{study_uid}/priors", study_priors),
    ("GET", "/api/v1/studies/{study_uid}/report.pdf", study_report_pdf),
    ("GET", "/api/v1/series/{series_uid}/image", series_image),
    ("GET", "/api/v1/results/{result_id}/objects/{kind}", result_object),
    ("POST", "/api/v1/results/{result_id}/reviews", create_review),
    ("GET", "/api/v1/conflicts", list_conflicts),
    ("POST", "/api/v1/conflicts/{conflict_id}/resolve", resolve_conflict),
    ("GET", "/api/v1/status", node_status),
    ("GET", "/api/v1/users", list_users),
    ("POST", "/api/v1/users", add_user),
    ("POST", "/api/v1/users/{username}/disable", disable_user),
    ("POST", "/api/v1/users/{username}/enable", enable_user),
    ("POST", "/api/v1/users/{username}/logout", logout_user),
    ("POST", "/api/v1/users/{username}/password", reset_password),
    ("POST", "/api/v1/account/password", change_own_password),
    ("GET", "/api/v1/tokens", list_tokens),
    ("POST", "/api/v1/tokens", create_token),
    ("POST", "/api/v1/tokens/{name}/revoke", revoke_token),
    ("GET", "/api/v1/audit", export_audit),
    ("GET", "/api/v1/openapi.json", openapi),
    ("GET", "/metrics", metrics),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
)
