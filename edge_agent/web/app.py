"""The agent's web app: radiologist UI, REST API (``/api/v1``), ``/metrics``, ``/healthz``,
``/readyz`` (aiohttp ``create_app``).

Every route but ``/healthz``, ``/readyz``, the login page and static files needs a session
cookie or an API token (``Authorization: Bearer``), and the role its route names. A request
with a session that changes something (POST, PUT, PATCH, DELETE) must carry the session's
CSRF token (``X-CSRF-Token`` header, or a ``csrf_token`` form field). Errors are JSON
``{"error": {"code", "message"}}`` with the request id for the API, a page for the UI. Every
request gets an id (``X-Request-ID``, echoed) that the JSON logs carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jinja2
from aiohttp import web

from edge_agent.web import api, pages
from edge_agent.web.http import DEPS, TEMPLATES, Handler, WebDeps, middleware

__all__ = ["WebDeps", "create_app"]


def create_app(
    deps: WebDeps, *, routes: Sequence[tuple[str, str, Handler]] = ()
) -> web.Application:
    """The web application. ``routes`` (method, path, handler) are added after the built-in
    ones (tests)."""
    app = web.Application(middlewares=[middleware], client_max_size=2 * 1024 * 1024)
    app[DEPS] = deps
    here = Path(__file__).parent
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(here / "templates"),
        autoescape=jinja2.select_autoescape(("html",)),
        undefined=jinja2.StrictUndefined,
    )
    for method, path, handler in (*api.ROUTES, *pages.ROUTES, *routes):
        app.router.add_route(method, path, handler)
    app.router.add_static("/static/", here / "static", show_index=False)
    return app
