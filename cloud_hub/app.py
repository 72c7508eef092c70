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
/healthz                     GET     process alive
===========================  ======  ======================================================
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

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
    over HTTP (empty = disabled)."""

    database_url: str = "sqlite:///hub.db"
    artifact_dir: str = "artifacts"
    archive_dir: str = "archive"
    host: str = "127.0.0.1"
    port: int = 8443
    ops_token: str = ""


STORE = web.AppKey("store", HubStore)
ARTIFACTS: web.AppKey[FolderArtifacts | S3Artifacts] = web.AppKey("artifacts")
ARCHIVE: web.AppKey[FolderArtifacts | S3Artifacts] = web.AppKey("archive")
CONFIG = web.AppKey("config", HubConfig)
SITE = web.RequestKey("site_id", str)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing bearer credential")
    return token.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate site endpoints; translate failures into JSON errors in one place."""
    try:
        if request.path.startswith("/v1/") and request.path not in ("/v1/enroll", "/v1/fleet"):
            store = request.app[STORE]
            request[SITE] = await asyncio.to_thread(store.authenticate, _bearer(request))
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
        resp = error(503, "unavailable", "the hub's object store is unavailable; retry later")
        resp.headers["Retry-After"] = "5"
        return resp
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError):
        # the details (host, port, pool state) are for the hub's log, not for sites
        log.exception("database unavailable")
        resp = error(503, "unavailable", "the hub's database is unavailable; retry later")
        resp.headers["Retry-After"] = "5"
        return resp


async def _json(request: web.Request) -> Any:
    return json.loads(await request.read())


async def enroll(request: web.Request) -> web.Response:
    body = await _json(request)
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise ProtocolError("missing 'token'")
    done = await asyncio.to_thread(request.app[STORE].enroll, token)
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
    receipt = await asyncio.to_thread(request.app[STORE].push, site, batch)
    return web.json_response(receipt.to_json())


async def high_water(request: web.Request) -> web.Response:
    hw = await asyncio.to_thread(request.app[STORE].high_water, request[SITE])
    return web.json_response({"high_water": {k.value: v for k, v in hw.items()}})


async def changes(request: web.Request) -> web.Response:
    try:
        cursor = int(request.query.get("cursor", "0"))
        limit = min(int(request.query.get("limit", "500")), 5000)
    except ValueError as exc:
        raise ProtocolError(f"bad cursor/limit: {exc}") from exc
    rows = await asyncio.to_thread(request.app[STORE].changes_after, request[SITE], cursor, limit)
    page = ChangePage(changes=tuple(rows), next_cursor=rows[-1].cursor if rows else cursor)
    return web.json_response(page.to_json())


async def heartbeat(request: web.Request) -> web.Response:
    body = await _json(request)
    if not isinstance(body, dict):
        raise ProtocolError("heartbeat must be an object")
    await asyncio.to_thread(request.app[STORE].heartbeat, request[SITE], body)
    return web.json_response({"ok": True})


async def results(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(
        request.app[STORE].results, request[SITE], study_uid=request.query.get("study_uid")
    )
    return web.json_response({"results": rows})


async def list_conflicts(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(request.app[STORE].conflicts, request[SITE])
    return web.json_response({"conflicts": rows})


async def resolve_conflict(request: web.Request) -> web.Response:
    body = await _json(request)
    if not isinstance(body, dict) or body.get("take") not in ("edge", "cloud"):
        raise ProtocolError('body must be {"take": "edge" | "cloud", "by": NAME}')
    by = str(body.get("by") or request[SITE])[:200]
    try:
        conflict_id = int(request.match_info["conflict_id"])
        version = await asyncio.to_thread(
            request.app[STORE].resolve_conflict,
            request[SITE],
            conflict_id,
            take=body["take"],
            by=by,
        )
    except (KeyError, ValueError) as exc:
        return error(404, "not_found", str(exc).strip("'\""))
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
    size = await asyncio.to_thread(store.size, sha)
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
    while (block := await asyncio.to_thread(next, chunks, None)) is not None:
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
    size = await asyncio.to_thread(store.archived_size, request[SITE], sha)
    if size is not None:
        return web.json_response({"sha256": sha, "offset": size, "complete": True})
    up = await asyncio.to_thread(store.upload_state, request[SITE], sha)
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
    if await asyncio.to_thread(store.archived_size, site, sha) is not None:
        return web.json_response({"sha256": sha, "offset": total, "complete": True})
    body = await request.read()
    if offset + len(body) > total:
        raise ProtocolError("chunk goes past Upload-Length")
    if offset == 0 and len(body) == total:  # the whole object at once: no parts
        if hashlib.sha256(body).hexdigest() != sha:
            return error(422, "hash_mismatch", "the uploaded bytes do not match their SHA-256")
        await asyncio.to_thread(blobs.put, sha, body)
        return await _archived(request, site, sha, total)
    if not body:
        held = await asyncio.to_thread(store.upload_state, site, sha)
        return _mismatch(0 if held is None else held.received)
    part = part_name(site, sha, offset, len(body))
    await asyncio.to_thread(blobs.put_part, part, body)  # durable before it is recorded
    res = await asyncio.to_thread(
        store.add_upload_chunk, site, sha, offset=offset, length=len(body), total=total, part=part
    )
    if res.upload is None:  # archived meanwhile (by another replica)
        return web.json_response({"sha256": sha, "offset": total, "complete": True})
    if not res.accepted:
        if part not in {p[2] for p in res.upload.parts}:
            await asyncio.to_thread(blobs.delete_parts, [part])
        return _mismatch(res.received)
    if res.received < total:
        return web.json_response({"sha256": sha, "offset": res.received, "complete": False})
    # every byte is in: assemble (another replica may be doing the same: it is idempotent)
    names = [p[2] for p in res.upload.parts]

    def chunks() -> Iterator[bytes]:
        for name in names:
            yield from blobs.read_part(name)

    try:
        size = await asyncio.to_thread(blobs.put_verified, sha, chunks())
    except ValueError:
        dropped = await asyncio.to_thread(store.drop_upload, site, sha)
        await asyncio.to_thread(blobs.delete_parts, [p[2] for p in (dropped or res.upload).parts])
        return error(422, "hash_mismatch", "the uploaded bytes do not match their SHA-256")
    except PartMissing:
        if await asyncio.to_thread(store.archived_size, site, sha) is not None:
            return web.json_response({"sha256": sha, "offset": total, "complete": True})
        # its bytes are not all there any more: the upload starts again from the beginning
        dropped = await asyncio.to_thread(store.drop_upload, site, sha)
        await asyncio.to_thread(blobs.delete_parts, [p[2] for p in (dropped or res.upload).parts])
        return _mismatch(0)
    return await _archived(request, site, sha, size)


async def _archived(request: web.Request, site: str, sha: str, size: int) -> web.Response:
    """Record a stored, verified object and remove its upload's parts."""
    store, blobs = request.app[STORE], request.app[ARCHIVE]
    done = await asyncio.to_thread(store.record_archived, site, sha, size)
    if done is not None:
        await asyncio.to_thread(blobs.delete_parts, [p[2] for p in done.parts])
    return web.json_response({"sha256": sha, "offset": size, "complete": True}, status=201)


async def archive_download(request: web.Request) -> web.StreamResponse:
    """An archived object of this site (HTTP Range), for a restore."""
    sha = _sha(request)
    if await asyncio.to_thread(request.app[STORE].archived_size, request[SITE], sha) is None:
        return error(404, "not_found", "no such archived object for this site")
    return await _serve_blob(request, request.app[ARCHIVE], sha)


async def model_status(request: web.Request) -> web.Response:
    body = await _json(request)
    try:
        name, version, status = str(body["name"]), str(body["version"]), str(body["status"])
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"model status needs name, version, status: {exc}") from exc
    await asyncio.to_thread(
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
    if not ops or not hmac.compare_digest(_bearer(request), ops):
        raise AuthError("the fleet view needs the ops token")
    rows = await asyncio.to_thread(request.app[STORE].list_sites)
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
    return bool(ops) and hmac.compare_digest(password, ops)


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
    rows = await asyncio.to_thread(request.app[STORE].list_sites)
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


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(config: HubConfig, *, store: HubStore | None = None) -> web.Application:
    """The hub application; the database is opened (and migrated) in ``cleanup_ctx``."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
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

    async def database(app: web.Application) -> AsyncIterator[None]:
        s = store or HubStore(await asyncio.to_thread(connect, config.database_url))
        app[STORE] = s
        yield
        if store is None:
            s.engine.dispose()

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
    app.router.add_get("/healthz", healthz)
    return app
