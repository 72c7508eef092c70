"""Server-rendered pages (Jinja2): login, worklist, study, node status."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web
from markupsafe import Markup

from edge_agent.times import dicom_date, person_name
from edge_agent.web.accounts import AccountError, AuthFailed, LoginThrottled, Session
from edge_agent.web.api import load_study, node_status_data
from edge_agent.web.http import (
    COOKIE,
    DEPS,
    REQUEST_ID,
    SESSION,
    TEMPLATES,
    USER,
    ApiError,
    audit,
    posted_form,
    remote,
    require,
)
from edge_agent.web.images import PRESETS
from edge_agent.web.queries import priors
from edge_agent.web.report import (
    NOTICE,
    header_rows,
    measurements,
    priors_svg,
    result_modality,
    review_comments,
    review_status,
)


def _page(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    session = request.get(SESSION)
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            user=request.get(USER),
            csrf_token=session.csrf_token if session else "",
            fmt_time=request.app[DEPS].times.stamp,
            fmt_name=person_name,
            fmt_date=dicom_date,
            time_zone=request.app[DEPS].times.name,
            **ctx,
        )
    )
    return web.Response(text=html, content_type="text/html", status=status)


#: A local path (and query) with only URL-safe characters: no scheme, no //host, no
#: backslash, and no whitespace or control character (a browser drops tabs and newlines
#: from a Location, so "/\t/evil.example" would become "//evil.example").
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9\-._~/?=&%:+,;@!$'()*]*")


def _next(value: str) -> str:
    """Where to go after login: ``value`` if it is a local path, else the worklist (no open
    redirect)."""
    return value if _LOCAL_PATH.fullmatch(value) else "/worklist"


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/worklist" if request.get(USER) else "/login")


async def login_page(request: web.Request) -> web.Response:
    return _page(
        request, "login.html", next=_next(request.query.get("next", "/worklist")), error=""
    )


async def login(request: web.Request) -> web.StreamResponse:
    form = await posted_form(request)
    deps = request.app[DEPS]
    username = form.get("username", "")[:64]
    target = _next(form.get("next", "/worklist"))
    try:
        token, session = await asyncio.to_thread(
            deps.accounts.login,
            username,
            form.get("password", ""),
            remote=remote(request),
            now=deps.clock.now(),
        )
    except AuthFailed as exc:
        await asyncio.wrap_future(
            deps.accounts.audit(
                username=username or "-",
                action="login.throttled" if isinstance(exc, LoginThrottled) else "login.failed",
                target=username,
                remote=remote(request),
                request_id=request[REQUEST_ID],
                now=deps.clock.now(),
            )
        )
        if isinstance(exc, LoginThrottled):
            page = _page(request, "login.html", status=429, next=target, error=str(exc))
            page.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
            return page
        return _page(request, "login.html", status=401, next=target, error=str(exc))
    request[USER] = session.user
    await audit(request, "login", session.user.username)
    # a password someone else chose is changed before anything else
    resp = web.HTTPFound("/account/password" if session.must_change_password else target)
    secure = bool(deps.web.tls_cert)
    resp.set_cookie(
        COOKIE,
        token,
        httponly=True,
        secure=secure,
        samesite="Strict",
        path="/",
        max_age=int(deps.web.session_ttl_s),
    )
    # an old cookie, if any, is replaced: a login never keeps a session id (no fixation)
    raise resp


async def logout(request: web.Request) -> web.StreamResponse:
    await posted_form(request)
    session = request.get(SESSION)
    if session is not None:
        await asyncio.to_thread(request.app[DEPS].accounts.logout, session)
        await audit(request, "logout", session.user.username)
    resp = web.HTTPFound("/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


@require("radiologist")
async def worklist(request: web.Request) -> web.Response:
    return _page(request, "worklist.html", refresh_ms=int(request.app[DEPS].web.refresh_s * 1000))


@require("radiologist")
async def study(request: web.Request) -> web.Response:
    detail = await load_study(request)
    uid, deps = detail["study_uid"], request.app[DEPS]
    await audit(request, "study.view", uid, "page")
    overlay_series = {r["series_uid"] for r in detail["results"] if r["task"] == "segmentation"}
    meas = {r["result_id"]: measurements(r, result_modality(detail, r)) for r in detail["results"]}
    points = await asyncio.to_thread(_priors, deps, uid)
    charts = []
    for title, key in (
        ("Total lesion area (mm2)", "area_mm2_total"),
        ("Volume (mm3)", "volume_mm3"),
    ):
        svg = priors_svg(points, key, uid)
        if svg:
            charts.append((title, Markup(svg)))  # noqa: S704 - every text escaped inside
    return _page(
        request,
        "study.html",
        s=detail,
        presets=list(PRESETS),
        overlay_series=overlay_series,
        measurements=meas,
        priors=points,
        charts=charts,
    )


def _priors(deps: Any, uid: str) -> list[dict[str, Any]]:
    with deps.store.read() as conn:
        return priors(conn, uid)


@require("radiologist")
async def report(request: web.Request) -> web.Response:
    detail = await load_study(request)
    await audit(request, "report.view", detail["study_uid"], "html")
    times = request.app[DEPS].times
    rows = [
        (
            r,
            measurements(r, result_modality(detail, r)),
            review_status(r, times),
            review_comments(r, times),
        )
        for r in detail["results"]
    ]
    return _page(
        request,
        "report.html",
        s=detail,
        head=header_rows(detail, times),
        rows=rows,
        notice=NOTICE,
        generated=times.stamp(request.app[DEPS].clock.now()),
    )


@require("radiologist", "operator")
async def conflicts(request: web.Request) -> web.Response:
    return _page(request, "conflicts.html")


@require("operator")
async def status(request: web.Request) -> web.Response:
    data = await asyncio.to_thread(node_status_data, request.app[DEPS])
    return _page(request, "status.html", st=data)


def _own_session(request: web.Request) -> Session:
    session: Session | None = request.get(SESSION)
    if session is None:
        raise ApiError(403, "forbidden", "log in to change your password (not an API token)")
    return session


@require("radiologist", "operator")
async def password_page(request: web.Request) -> web.Response:
    session = _own_session(request)
    return _page(
        request, "password.html", error="", done=False, forced=session.must_change_password
    )


@require("radiologist", "operator")
async def change_password(request: web.Request) -> web.StreamResponse:
    form = await posted_form(request)
    deps = request.app[DEPS]
    session = _own_session(request)
    current, new = form.get("current", "")[:1024], form.get("new", "")[:1024]
    error = ""
    if new != form.get("again", "")[:1024]:
        error = "the two new passwords differ"
    else:
        try:
            await asyncio.to_thread(
                deps.accounts.change_password, session, current, new, now=deps.clock.now()
            )
        except AccountError as exc:
            error = str(exc)
    if error:
        await audit(request, "password.change_failed", session.user.username, error)
        return _page(
            request,
            "password.html",
            status=400,
            error=error,
            done=False,
            forced=session.must_change_password,
        )
    await audit(request, "password.change", session.user.username)
    return _page(request, "password.html", error="", done=True, forced=False)


ROUTES: tuple[tuple[str, str, Any], ...] = (
    ("GET", "/account/password", password_page),
    ("POST", "/account/password", change_password),
    ("GET", "/", index),
    ("GET", "/login", login_page),
    ("POST", "/login", login),
    ("POST", "/logout", logout),
    ("GET", "/worklist", worklist),
    ("GET", "/studies/{study_uid}", study),
    ("GET", "/studies/{study_uid}/report", report),
    ("GET", "/status", status),
    ("GET", "/conflicts", conflicts),
)
