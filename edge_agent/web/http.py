"""The web app's shared HTTP pieces: its dependencies (``WebDeps``) and request keys,
``ApiError``, authentication and CSRF (the middleware), ``require`` (roles) and ``audit``.
Handlers (``api``, ``pages``) import these; ``app`` assembles them into the application."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from edge_agent.actions.models import Actor
from edge_agent.clock import Clock
from edge_agent.config import WebConfig
from edge_agent.errors import Conflict, EdgeError, InvalidRequest, NotFound
from edge_agent.store import Store
from edge_agent.sync.client import HttpHubClient
from edge_agent.times import SiteTime
from edge_agent.web.accounts import Accounts, Session, User
from hub_protocol import HybridClock

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COOKIE = "edge_session"
PUBLIC = ("/healthz", "/readyz", "/login", "/static/")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class WebDeps:
    """What the web app needs from the agent (bound at creation: no globals)."""

    web: WebConfig
    data_dir: Path  # the storage root that result object paths are relative to
    site: str  # this site's name on reports (its AE title)
    times: SiteTime  # the site time zone every time on a page or report is shown in
    store: Store
    accounts: Accounts
    clock: Clock
    metrics_text: Callable[[], bytes]
    health: Callable[[], dict[str, Any]]
    ready: Callable[[], dict[str, str]]  # check name -> "" if ok, else why not
    read_instance: Callable[[str, str], bytes]  # (tier, path) -> Part-10 bytes
    storage_status: Callable[[], dict[str, Any]]
    request_restore: Callable[[str, str], None]  # (study_uid, by)
    review_hook: Callable[[], None] | None = None  # e.g. wake the uplink
    hlc: HybridClock | None = None  # reviews go to the hub through the outbox
    hub: HttpHubClient | None = None  # the manual-review queue lives at the hub


DEPS = web.AppKey("deps", WebDeps)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
USER = web.RequestKey("user", User)
SESSION = web.RequestKey("session", Session)
REQUEST_ID = web.RequestKey("request_id", str)


class ApiError(Exception):
    """An error answered as JSON (or an error page) with ``status`` and ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def remote(request: web.Request) -> str:
    return request.remote or "?"


def actor(request: web.Request) -> Actor:
    """Who is asking, as a study action audits it."""
    user = request.get(USER)
    return Actor(
        username=user.username if user else "-",
        remote=remote(request),
        request_id=request[REQUEST_ID],
    )


async def audit(request: web.Request, action: str, target: str, detail: str = "") -> None:
    """Record who did or saw what; returns once the row is committed (without blocking the
    event loop: the writer thread commits it with its next group)."""
    deps = request.app[DEPS]
    user = request.get(USER)
    await asyncio.wrap_future(
        deps.accounts.audit(
            username=user.username if user else "-",
            action=action,
            target=target,
            remote=remote(request),
            request_id=request[REQUEST_ID],
            now=deps.clock.now(),
            detail=detail,
        )
    )


def _wants_html(request: web.Request) -> bool:
    return not request.path.startswith(("/api/", "/metrics"))


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = rid if rid.isalnum() and len(rid) <= 64 else uuid.uuid4().hex
    started = time.perf_counter()
    try:
        await _authenticate(request)
        resp = await handler(request)
    except ApiError as exc:
        resp = _error(request, exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error(request, exc.status, "http_error", exc.reason)
    except NotFound as exc:
        resp = _error(request, 404, "not_found", str(exc))
    except Conflict as exc:
        resp = _error(request, 409, exc.code, str(exc))
    except InvalidRequest as exc:
        resp = _error(request, 400, "bad_request", str(exc))
    except EdgeError as exc:
        resp = _error(request, 400, type(exc).__name__, str(exc))
    except Exception:
        log.exception("web request failed", extra={"request_id": request[REQUEST_ID]})
        resp = _error(request, 500, "internal", "internal error; see the agent log")
    resp.headers["X-Request-ID"] = request[REQUEST_ID]
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Content-Security-Policy", CSP)
    if request.app[DEPS].web.tls_cert:  # browsers only take it over HTTPS
        resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Cache-Control", "no-store")
    user = request.get(USER)
    log.info(
        "web request",
        extra={
            "request_id": request[REQUEST_ID],
            "method": request.method,
            "path": request.path,
            "status": resp.status,
            "user": user.username if user else "-",
            "ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )
    return resp


def _error(request: web.Request, status: int, code: str, message: str) -> web.StreamResponse:
    if status == 401 and _wants_html(request) and request.method == "GET":
        raise web.HTTPFound(f"/login?next={request.path}")
    if _wants_html(request):
        session = request.get(SESSION)
        html = (
            request.app[TEMPLATES]
            .get_template("error.html")
            .render(
                status=status,
                message=message,
                request_id=request[REQUEST_ID],
                user=request.get(USER),
                csrf_token=session.csrf_token if session else "",
            )
        )
        return web.Response(status=status, text=html, content_type="text/html")
    return web.json_response(
        {"error": {"code": code, "message": message, "request_id": request[REQUEST_ID]}},
        status=status,
    )


async def _authenticate(request: web.Request) -> None:
    """Set USER (and SESSION) from a Bearer token or the session cookie; enforce CSRF on
    changes made with a session. Public paths pass without."""
    deps = request.app[DEPS]
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        user = await asyncio.to_thread(
            deps.accounts.token_user, header[7:].strip(), now=deps.clock.now()
        )
        if user is None:
            raise ApiError(401, "unauthenticated", "unknown, expired or revoked API token")
        request[USER] = user
        return
    token = request.cookies.get(COOKIE)
    session = (
        await asyncio.to_thread(deps.accounts.session, token, now=deps.clock.now())
        if token
        else None
    )
    if session is not None:
        request[USER] = session.user
        request[SESSION] = session
        if request.method in UNSAFE and request.path != "/login":
            _check_csrf(request, session)
        if session.must_change_password and not request.path.startswith(PASSWORD_CHANGE_PATHS):
            # a password someone else chose: nothing else until it is changed
            if _wants_html(request) and request.method == "GET":
                raise web.HTTPFound("/account/password")
            raise ApiError(
                403, "password_change_required", "change your password first (/account/password)"
            )
        return
    if request.path.startswith(PUBLIC) or request.path == "/":
        return
    raise ApiError(401, "unauthenticated", "log in, or send an API token")


#: What a session held to a password change may still reach.
PASSWORD_CHANGE_PATHS = ("/account/password", "/api/v1/account/password", "/logout", "/static/")


#: Scripts, styles, images and forms from this origin only: no inline script or handler
#: (the pages name what to start in ``<body data-start>``), no plugin, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of two strings, whatever characters ``given`` holds."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _check_csrf(request: web.Request, session: Session) -> None:
    """The header for API calls; HTML forms are checked by :func:`posted_form`, and only
    the page routes accept forms (the API refuses them here)."""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        if request.path.startswith("/api/"):
            raise ApiError(415, "unsupported_media_type", "the API takes JSON")
        return
    sent = request.headers.get("X-CSRF-Token", "")
    if not sent or not _same(sent, session.csrf_token):
        raise ApiError(403, "csrf", "missing or wrong CSRF token")


async def posted_form(request: web.Request) -> dict[str, str]:
    """A posted HTML form; with a session, its ``csrf_token`` field must match."""
    form = {k: str(v) for k, v in (await request.post()).items()}
    session = request.get(SESSION)
    if (
        session is not None
        and request.path != "/login"
        and not _same(form.get("csrf_token", ""), session.csrf_token)
    ):
        raise ApiError(403, "csrf", "missing or wrong CSRF token")
    return form


def require(*roles: str) -> Callable[[Handler], Handler]:
    """Only users with one of ``roles`` (admin always) may call the handler."""

    def wrap(handler: Handler) -> Handler:
        async def inner(request: web.Request) -> web.StreamResponse:
            user = request.get(USER)
            if user is None:
                raise ApiError(401, "unauthenticated", "log in, or send an API token")
            if user.role != "admin" and user.role not in roles:
                raise ApiError(403, "forbidden", f"the {user.role} role cannot do this")
            return await handler(request)

        inner.roles = roles  # type: ignore[attr-defined]  # read by the OpenAPI check
        inner.__doc__ = handler.__doc__
        return inner

    return wrap
