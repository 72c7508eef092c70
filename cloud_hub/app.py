"""The hub's HTTP API (aiohttp), versioned under ``/v1``. JSON in, JSON out; errors are JSON
``{"error": {"code", "message"}}`` with a fitting status. Every endpoint but enrollment
needs ``Authorization: Bearer <site credential>``; the fleet view needs the ops token.

===========================  ======  ======================================================
path                         method  what
===========================  ======  ======================================================
/v1/enroll                   POST    one-time token -> site id + credential
/v1/push                     POST    a PushBatch -> a PushReceipt (idempotent)
/v1/high-water               GET     per-lane high-water marks of this site
/v1/changes?cursor=N         GET     this site's change feed after a cursor
/v1/heartbeat                POST    health summary
/v1/results?study_uid=U      GET     this site's results
/v1/conflicts                GET     this site's open manual-review conflicts
/v1/conflicts/ID/resolve     POST    {"take": "edge"|"cloud", "by": name}: logged, fed back
/v1/artifacts/SHA256          GET     a release archive (HTTP Range: resumable)
/v1/model-status             POST    this site's install status of a model version
/v1/archive/SHA256/upload    GET     how much of an archive upload the hub holds (resume)
/v1/archive/SHA256           PATCH   append a chunk (Upload-Offset/-Length); hash checked
/v1/archive/SHA256           GET     an archived object of this site (HTTP Range): restore
/v1/fleet                    GET     every site's last heartbeat (ops token)
/metrics                     GET     Prometheus metrics (ops or metrics token)
/healthz                     GET     process alive (liveness)
/readyz                      GET     database and blob stores usable (readiness): 200 or 503
===========================  ======  ======================================================

**Threads and connections.** Every blocking call (SQL, blob store) runs on the app's own
worker threads, ``worker_threads`` of them (by default ``db_pool_size + db_max_overflow``:
one thread per connection the pool may open, so a request never queues for a connection it
could not get; the pool timeout is the backstop, answered 503 with ``Retry-After``). The
PostgreSQL connection budget is then explicit: replicas x (``db_pool_size`` +
``db_max_overflow``) must stay below ``max_connections`` minus a reserve (superuser
connections, the CLI, backups); see the README.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import sqlalchemy.exc
from aiohttp import web

from cloud_hub.artifacts import (
    ArtifactError,
    FolderArtifacts,
    PartMissing,
    S3Artifacts,
    open_artifacts,
    parse_range,
    part_name,
)
from cloud_hub.metrics import HubMetrics, create_metrics
from cloud_hub.store import AlreadyResolved, AuthError, ConcurrentUpdate, HubStore, connect
from hub_protocol import PROTOCOL_VERSIONS, ChangePage, ProtocolError, PushBatch

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_ARCHIVE_OBJECT = 4 * 1024**3


@dataclass(frozen=True, kw_only=True)
class HubConfig:
    """``database_url``: SQLAlchemy URL (``sqlite:///hub.db`` by default,
    ``postgresql+psycopg://user@host/db`` in production). ``artifact_dir``: release archives,
    a folder or ``s3://bucket/prefix`` (:mod:`cloud_hub.artifacts`); ``archive_dir``: the
    sites' archived instances and their unfinished uploads, likewise (a folder is for a single
    replica, or a volume every replica mounts read-write; several replicas need a bucket).
    ``ops_token``: bearer token for the fleet view and enrollment-token creation
    over HTTP (empty = disabled); ``metrics_token``: a bearer token that reads ``/metrics``
    and nothing else (for Prometheus; the ops token reads it too; empty = ops token only).

    Database pool (per replica): ``db_pool_size`` connections kept open, up to
    ``db_max_overflow`` more under load, a request waiting ``db_pool_timeout_s`` seconds at
    most for one (then 503). ``worker_threads``: threads for blocking calls; 0 = pool size +
    overflow. ``retry_after_s``: the ``Retry-After`` of a 503. ``probe_timeout_s``: how long
    ``/readyz`` waits for each check, and the metrics for their database queries."""

    database_url: str = "sqlite:///hub.db"
    artifact_dir: str = "artifacts"
    archive_dir: str = "archive"
    host: str = "127.0.0.1"
    port: int = 8443
    ops_token: str = ""
    metrics_token: str = ""
    db_pool_size: int = 5
    db_max_overflow: int = 5
    db_pool_timeout_s: float = 5.0
    worker_threads: int = 0
    retry_after_s: int = 5
    probe_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("db_pool_size", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("db_max_overflow", "worker_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("db_pool_timeout_s", "probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def pool_limit(self) -> int:
        """The most database connections one replica opens."""
        return self.db_pool_size + self.db_max_overflow

    @property
    def threads(self) -> int:
        return self.worker_threads or self.pool_limit

    def engine_options(self) -> dict[str, Any]:
        """Pool options for :func:`cloud_hub.store.connect` (none for an in-memory SQLite
        database, whose single connection is not pooled)."""
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            return {}
        return {
            "pool_size": self.db_pool_size,
            "max_overflow": self.db_max_overflow,
            "pool_timeout": self.db_pool_timeout_s,
        }


STORE = web.AppKey("store", HubStore)
ARTIFACTS: web.AppKey[FolderArtifacts | S3Artifacts] = web.AppKey("artifacts")
ARCHIVE: web.AppKey[FolderArtifacts | S3Artifacts] = web.AppKey("archive")
CONFIG = web.AppKey("config", HubConfig)
METRICS = web.AppKey("metrics", HubMetrics)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
SITE = web.RequestKey("site_id", str)

P = ParamSpec("P")
T = TypeVar("T")


async def offload(app: web.Application, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking ``fn`` on the app's worker threads (sized with the database pool)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app[EXECUTOR], functools.partial(fn, *args, **kwargs))


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of two strings, whatever characters ``given`` holds (a
    non-ASCII token was a TypeError, so a 500)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing bearer credential")
    return token.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _unavailable(request: web.Request, cause: str, what: str) -> web.Response:
    request.app[METRICS].unavailable.labels(cause).inc()
    resp = error(503, "unavailable", f"the hub's {what} is unavailable; retry later")
    resp.headers["Retry-After"] = str(request.app[CONFIG].retry_after_s)
    return resp


@web.middleware
async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by its route pattern (never the raw path: the label set
    stays bounded whatever sites send)."""
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        m = request.app[METRICS]
        m.requests.labels(route, request.method, str(status)).inc()
        m.request_seconds.labels(route).observe(time.perf_counter() - start)


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate site endpoints; translate failures into JSON errors in one place."""
    try:
        if request.path.startswith("/v1/") and request.path not in ("/v1/enroll", "/v1/fleet"):
            store = request.app[STORE]
            request[SITE] = await offload(request.app, store.authenticate, _bearer(request))
        return await handler(request)
    except AuthError as exc:
        return error(401, "unauthenticated", str(exc))
    except ProtocolError as exc:
        return error(400, "bad_request", str(exc))
    except json.JSONDecodeError as exc:
        return error(400, "bad_json", f"body is not JSON: {exc}")
    except AlreadyResolved as exc:
        return web.json_response(
            {
                "error": {"code": "already_resolved", "message": str(exc)},
                "outcome": exc.outcome,
            },
            status=409,
        )
    except (sqlalchemy.exc.IntegrityError, ConcurrentUpdate):
        log.warning("concurrent write refused on %s", request.path, exc_info=True)
        return error(409, "conflict", "concurrent write for the same records; resend")
    except ArtifactError:
        log.exception("blob store unavailable")
        return _unavailable(request, "blob_store", "object store")
    # the details (host, port, pool state) are for the hub's log, not for sites
    except sqlalchemy.exc.TimeoutError:
        log.warning("no database connection free in time on %s", request.path, exc_info=True)
        return _unavailable(request, "db_pool_timeout", "database")
    except sqlalchemy.exc.OperationalError:
        log.exception("database unavailable")
        return _unavailable(request, "database", "database")


async def _json(request: web.Request) -> Any:
    return json.loads(await request.read())


async def enroll(request: web.Request) -> web.Response:
    body = await _json(request)
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise ProtocolError("missing 'token'")
    done = await offload(request.app, request.app[STORE].enroll, token)
    return web.json_response(
        {
            "site_id": done.site_id,
            "credential": done.credential,
            "protocol_versions": list(PROTOCOL_VERSIONS),
        }
    )


async def push(request: web.Request) -> web.Response:
    batch = PushBatch.from_json(await _json(request))
    site = request[SITE]
    if batch.site_id != site:
        return error(403, "forbidden", "a site can push only its own records")
    receipt = await offload(request.app, request.app[STORE].push, site, batch)
    counted = request.app[METRICS].push_records
    for outcome, n in collections.Counter(r.status.value for r in receipt.receipts).items():
        counted.labels(outcome).inc(n)
    return web.json_response(receipt.to_json())


async def high_water(request: web.Request) -> web.Response:
    hw = await offload(request.app, request.app[STORE].high_water, request[SITE])
    return web.json_response({"high_water": {k.value: v for k, v in hw.items()}})


async def changes(request: web.Request) -> web.Response:
    try:
        cursor = int(request.query.get("cursor", "0"))
        limit = min(int(request.query.get("limit", "500")), 5000)
    except ValueError as exc:
        raise ProtocolError(f"bad cursor/limit: {exc}") from exc
    rows = await offload(
        request.app, request.app[STORE].changes_after, request[SITE], cursor, limit
    )
    page = ChangePage(changes=tuple(rows), next_cursor=rows[-1].cursor if rows else cursor)
    return web.json_response(page.to_json())


async def heartbeat(request: web.Request) -> web.Response:
    body = await _json(request)
    if not isinstance(body, dict):
        raise ProtocolError("heartbeat must be an object")
    await offload(request.app, request.app[STORE].heartbeat, request[SITE], body)
    return web.json_response({"ok": True})


async def results(request: web.Request) -> web.Response:
    rows = await offload(
        request.app,
        request.app[STORE].results,
        request[SITE],
        study_uid=request.query.get("study_uid"),
    )
    return web.json_response({"results": rows})


async def list_conflicts(request: web.Request) -> web.Response:
    rows = await offload(request.app, request.app[STORE].conflicts, request[SITE])
    return web.json_response({"conflicts": rows})


async def resolve_conflict(request: web.Request) -> web.Response:
    body = await _json(request)
    if not isinstance(body, dict) or body.get("take") not in ("edge", "cloud"):
        raise ProtocolError('body must be {"take": "edge" | "cloud", "by": NAME}')
    by = str(body.get("by") or request[SITE])[:200]
    try:
        conflict_id = int(request.match_info["conflict_id"])
        version = await offload(
            request.app,
            request.app[STORE].resolve_conflict,
            request[SITE],
            conflict_id,
            take=body["take"],
            by=by,
        )
    except (KeyError, ValueError) as exc:
        return error(404, "not_found", str(exc).strip("'\""))
    request.app[METRICS].conflict_resolutions.labels(body["take"]).inc()
    return web.json_response({"version": version})


async def artifact(request: web.Request) -> web.StreamResponse:
    """A release archive by SHA-256, answering single-range requests (206), so an
    interrupted download resumes where it stopped. From a folder: aiohttp's FileResponse
    (sendfile); from a bucket: streamed through the hub in ranged reads."""
    sha = request.match_info["sha256"]
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        return error(400, "bad_request", "not a SHA-256")
    return await _serve_blob(request, request.app[ARTIFACTS], sha)


async def _serve_blob(
    request: web.Request, store: FolderArtifacts | S3Artifacts, sha: str
) -> web.StreamResponse:
    if isinstance(store, FolderArtifacts):
        path = store.path(sha)
        if not path.is_file():
            return error(404, "not_found", "no such artifact")
        return web.FileResponse(path, headers={"Content-Type": "application/x-tar"})
    size = await offload(request.app, store.size, sha)
    if size is None:
        return error(404, "not_found", "no such artifact")
    try:
        wanted = parse_range(request.headers.get("Range"), size)
    except ValueError as exc:
        refused = error(416, "range_not_satisfiable", str(exc))
        refused.headers["Content-Range"] = f"bytes */{size}"
        return refused
    start, end = wanted or (0, size)
    headers = {
        "Content-Type": "application/x-tar",
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start),
    }
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    await resp.prepare(request)
    chunks = store.read(sha, start, end)
    while (block := await offload(request.app, next, chunks, None)) is not None:
        await resp.write(block)
    await resp.write_eof()
    return resp


def _sha(request: web.Request) -> str:
    sha = request.match_info["sha256"]
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ProtocolError("not a SHA-256")
    return sha


async def archive_upload_state(request: web.Request) -> web.Response:
    """How much of an archive upload the hub holds (resume from ``offset``)."""
    sha = _sha(request)
    store = request.app[STORE]
    size = await offload(request.app, store.archived_size, request[SITE], sha)
    if size is not None:
        return web.json_response({"sha256": sha, "offset": size, "complete": True})
    up = await offload(request.app, store.upload_state, request[SITE], sha)
    offset = 0 if up is None else up.received
    return web.json_response({"sha256": sha, "offset": offset, "complete": False})


def _mismatch(held: int) -> web.Response:
    return web.json_response(
        {
            "error": {"code": "offset_mismatch", "message": f"the hub holds {held} bytes"},
            "offset": held,
        },
        status=409,
    )


async def archive_upload(request: web.Request) -> web.Response:
    """Append a chunk at ``Upload-Offset`` of an object of ``Upload-Length`` bytes named by
    its SHA-256. Any replica may take any chunk (the upload's state is in the database, its
    bytes in part objects of the blob store); a chunk sent again gets the same answer. When
    the last byte is in, the hub assembles the object from its parts, checking the hash on
    the way, and answers ``complete``; only then may the site delete its copy."""
    sha, site = _sha(request), request[SITE]
    try:
        offset = int(request.headers["Upload-Offset"])
        total = int(request.headers["Upload-Length"])
    except (KeyError, ValueError) as exc:
        raise ProtocolError("Upload-Offset and Upload-Length headers are required") from exc
    if not 0 <= offset <= total or total > MAX_ARCHIVE_OBJECT:
        raise ProtocolError(f"bad Upload-Offset/Upload-Length ({offset}/{total})")
    store, blobs = request.app[STORE], request.app[ARCHIVE]
    if await offload(request.app, store.archived_size, site, sha) is not None:
        return web.json_response({"sha256": sha, "offset": total, "complete": True})
    body = await request.read()
    if offset + len(body) > total:
        raise ProtocolError("chunk goes past Upload-Length")
    if offset == 0 and len(body) == total:  # the whole object at once: no parts
        if hashlib.sha256(body).hexdigest() != sha:
            return error(422, "hash_mismatch", "the uploaded bytes do not match their SHA-256")
        await offload(request.app, blobs.put, sha, body)
        return await _archived(request, site, sha, total)
    if not body:
        held = await offload(request.app, store.upload_state, site, sha)
        return _mismatch(0 if held is None else held.received)
    part = part_name(site, sha, offset, len(body))
    await offload(request.app, blobs.put_part, part, body)  # durable before it is recorded
    res = await offload(
        request.app,
        store.add_upload_chunk,
        site,
        sha,
        offset=offset,
        length=len(body),
        total=total,
        part=part,
    )
    if res.upload is None:  # archived meanwhile (by another replica)
        return web.json_response({"sha256": sha, "offset": total, "complete": True})
    if not res.accepted:
        if part not in {p[2] for p in res.upload.parts}:
            await offload(request.app, blobs.delete_parts, [part])
        return _mismatch(res.received)
    if res.received < total:
        return web.json_response({"sha256": sha, "offset": res.received, "complete": False})
    # every byte is in: assemble (another replica may be doing the same: it is idempotent)
    names = [p[2] for p in res.upload.parts]

    def chunks() -> Iterator[bytes]:
        for name in names:
            yield from blobs.read_part(name)

    try:
        size = await offload(request.app, blobs.put_verified, sha, chunks())
    except ValueError:
        dropped = await offload(request.app, store.drop_upload, site, sha)
        await offload(
            request.app, blobs.delete_parts, [p[2] for p in (dropped or res.upload).parts]
        )
        return error(422, "hash_mismatch", "the uploaded bytes do not match their SHA-256")
    except PartMissing:
        if await offload(request.app, store.archived_size, site, sha) is not None:
            return web.json_response({"sha256": sha, "offset": total, "complete": True})
        # its bytes are not all there any more: the upload starts again from the beginning
        dropped = await offload(request.app, store.drop_upload, site, sha)
        await offload(
            request.app, blobs.delete_parts, [p[2] for p in (dropped or res.upload).parts]
        )
        return _mismatch(0)
    return await _archived(request, site, sha, size)


async def _archived(request: web.Request, site: str, sha: str, size: int) -> web.Response:
    """Record a stored, verified object and remove its upload's parts."""
    store, blobs = request.app[STORE], request.app[ARCHIVE]
    done = await offload(request.app, store.record_archived, site, sha, size)
    if done is not None:
        await offload(request.app, blobs.delete_parts, [p[2] for p in done.parts])
    return web.json_response({"sha256": sha, "offset": size, "complete": True}, status=201)


async def archive_download(request: web.Request) -> web.StreamResponse:
    """An archived object of this site (HTTP Range), for a restore."""
    sha = _sha(request)
    if await offload(request.app, request.app[STORE].archived_size, request[SITE], sha) is None:
        return error(404, "not_found", "no such archived object for this site")
    return await _serve_blob(request, request.app[ARCHIVE], sha)


async def model_status(request: web.Request) -> web.Response:
    body = await _json(request)
    try:
        name, version, status = str(body["name"]), str(body["version"]), str(body["status"])
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"model status needs name, version, status: {exc}") from exc
    await offload(
        request.app,
        request.app[STORE].report_install,
        request[SITE],
        name,
        version,
        status,
        str(body.get("detail", "")),
    )
    return web.json_response({"ok": True})


async def fleet(request: web.Request) -> web.Response:
    ops = request.app[CONFIG].ops_token
    if not ops or not _same(_bearer(request), ops):
        raise AuthError("the fleet view needs the ops token")
    rows = await offload(request.app, request.app[STORE].list_sites)
    for r in rows:
        r["health"] = json.loads(r["health"]) if r["health"] else None
    return web.json_response({"sites": rows})


def _ops_basic(request: web.Request) -> bool:
    """HTTP Basic with the ops token as password (what a browser can send)."""
    import base64
    import binascii

    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        _, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    ops = request.app[CONFIG].ops_token
    return bool(ops) and _same(password, ops)


def _counts(counts: object) -> str:
    """``{"urgent": 0, "normal": 2}`` as ``urgent 0, normal 2`` ("-" when not reported)."""
    if not isinstance(counts, dict) or not counts:
        return "-" if not isinstance(counts, dict) else "none"
    order = {"urgent": 0, "normal": 1, "batch": 2}  # lanes in the order they drain
    keys = sorted(counts, key=lambda k: (order.get(str(k), 3), str(k)))
    return ", ".join(f"{k} {counts[k]}" for k in keys)


def _age(seconds: object) -> str:
    """Seconds as ``45 s``, ``12 min``, ``3.5 h`` or ``2.0 d`` ("-" when nothing waits)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


async def fleet_page(request: web.Request) -> web.Response:
    """Every site's health as a page (ops: HTTP Basic, any user name, the ops token)."""
    import html

    if not _ops_basic(request):
        return web.Response(
            status=401,
            text="the fleet page needs the ops token (as the password)",
            headers={"WWW-Authenticate": 'Basic realm="edge fleet", charset="UTF-8"'},
        )
    rows = await offload(request.app, request.app[STORE].list_sites)
    now = time.time()
    out = []
    for r in rows:
        h = json.loads(r["health"]) if r["health"] else {}
        seen = r["last_seen_at"]
        age = f"{now - seen:.0f} s ago" if seen else "never"
        stale = not seen or now - seen > 300
        storage = h.get("storage", {})
        tiers = ", ".join(
            f"{t} {v.get('instances', 0)} ({v.get('fs_used', 0):.0%})" for t, v in storage.items()
        )
        cells = [
            r["name"],
            r["site_id"],
            age + (" - OFFLINE?" if stale else ""),
            _counts(h.get("outbox")),
            _age(h.get("oldest_unsynced_age_s")),
            str(h.get("outbox_dead", "-")),
            _counts(h.get("studies")),
            tiers,
            str(h.get("version", "-")),
        ]
        cls = ' class="stale"' if stale else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    heads = "".join(
        f"<th>{h}</th>"
        for h in (
            "Site",
            "Id",
            "Last heartbeat",
            "Outbox",
            "Oldest unsynced",
            "Dead letters",
            "Studies",
            "Storage",
            "Agent",
        )
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Fleet</title><style>"
        "body{font-family:system-ui,sans-serif}td,th{padding:.3em .6em;border-bottom:1px solid"
        " #ddd;text-align:left}tr.stale{background:#fff0f0}</style></head><body>"
        f"<h1>Fleet: {len(rows)} site(s)</h1><table><tr>{heads}</tr>{''.join(out)}</table>"
        "</body></html>"
    )
    return web.Response(text=page, content_type="text/html")


def _ops_bearer(request: web.Request, *also: str) -> bool:
    """The request carries the ops token (or one of ``also``) as its bearer credential."""
    try:
        given = _bearer(request)
    except AuthError:
        return False
    return any(t and _same(given, t) for t in (request.app[CONFIG].ops_token, *also))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics: the ops token or the metrics token, like the other ops views
    (the agent's /metrics needs a token too; request counts and fleet figures are not for
    sites or passers-by)."""
    if not _ops_bearer(request, request.app[CONFIG].metrics_token):
        raise AuthError("metrics need the ops or the metrics token")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    body = await offload(request.app, generate_latest, request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers (it checks nothing else, so a database outage does not
    get every replica restarted)."""
    return web.json_response({"status": "ok"})


async def _check(app: web.Application, fn: Callable[[], None], name: str) -> str:
    # on the loop's default threads, not the workers: a replica busy serving stays ready
    try:
        await asyncio.wait_for(asyncio.to_thread(fn), app[CONFIG].probe_timeout_s)
    except TimeoutError:
        log.warning("readiness: %s did not answer in time", name)
        return "timeout"
    except Exception:  # any failure is "not ready"; the details stay in the hub's log
        log.warning("readiness: %s failed", name, exc_info=True)
        return "failed"
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    """Readiness: a query on the database and a write check of both blob stores (release
    archives, site archives), at once. 200 ``{"status": "ready", "checks": {...}}``, or 503
    with ``"unready"`` and each check's ``ok`` / ``failed`` / ``timeout``: names of checks,
    never hosts or errors."""
    app = request.app
    timeout = app[CONFIG].probe_timeout_s
    store = app[STORE]
    names = ("database", "artifacts", "archive")
    outcomes = await asyncio.gather(
        _check(app, functools.partial(store.ping, timeout_s=timeout), "database"),
        _check(app, app[ARTIFACTS].check, "artifacts"),
        _check(app, app[ARCHIVE].check, "archive"),
    )
    checks = dict(zip(names, outcomes, strict=True))
    if all(v == "ok" for v in outcomes):
        return web.json_response({"status": "ready", "checks": checks})
    resp = web.json_response({"status": "unready", "checks": checks}, status=503)
    resp.headers["Retry-After"] = str(app[CONFIG].retry_after_s)
    return resp


def create_app(config: HubConfig, *, store: HubStore | None = None) -> web.Application:
    """The hub application; the database is opened (and migrated) in ``cleanup_ctx``."""
    app = web.Application(middlewares=[measured, errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[METRICS] = create_metrics(
        lambda: app.get(STORE), pool_limit=config.pool_limit, timeout_s=config.probe_timeout_s
    )
    app[ARTIFACTS] = open_artifacts(config.artifact_dir)
    app[ARCHIVE] = open_artifacts(config.archive_dir)

    for what, blobs in (("release archives", app[ARTIFACTS]), ("site archives", app[ARCHIVE])):
        if isinstance(blobs, FolderArtifacts):
            log.warning(
                "%s in a folder (%s): for a single hub replica only, or a volume every "
                "replica mounts read-write; several replicas need an s3:// bucket",
                what,
                blobs.root,
            )

    async def workers(app: web.Application) -> AsyncIterator[None]:
        app[EXECUTOR] = ThreadPoolExecutor(config.threads, thread_name_prefix="hub-worker")
        yield
        app[EXECUTOR].shutdown(wait=True, cancel_futures=True)

    async def database(app: web.Application) -> AsyncIterator[None]:
        s = store or HubStore(
            await offload(app, connect, config.database_url, **config.engine_options())
        )
        app[STORE] = s
        yield
        if store is None:
            s.engine.dispose()

    app.cleanup_ctx.append(workers)
    app.cleanup_ctx.append(database)
    app.router.add_post("/v1/enroll", enroll)
    app.router.add_post("/v1/push", push)
    app.router.add_get("/v1/high-water", high_water)
    app.router.add_get("/v1/changes", changes)
    app.router.add_post("/v1/heartbeat", heartbeat)
    app.router.add_get("/v1/results", results)
    app.router.add_get("/v1/conflicts", list_conflicts)
    app.router.add_post("/v1/conflicts/{conflict_id}/resolve", resolve_conflict)
    app.router.add_get("/v1/artifacts/{sha256}", artifact)
    app.router.add_post("/v1/model-status", model_status)
    app.router.add_get("/v1/archive/{sha256}/upload", archive_upload_state)
    app.router.add_patch("/v1/archive/{sha256}", archive_upload)
    app.router.add_get("/v1/archive/{sha256}", archive_download)
    app.router.add_get("/v1/fleet", fleet)
    app.router.add_get("/fleet", fleet_page)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
