"""The seam to the hub: a small Protocol, the aiohttp implementation, and an in-memory fake.

Third-party exceptions are translated here, once, into what the caller should do:
:class:`HubUnavailable` (transient: retry with backoff), :class:`HubAuthError` (the site's
credential is refused: tell a person, re-enroll), :class:`HubRejected` (the hub refused the
request as malformed: do not resend it unchanged).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from edge_agent.errors import PermanentError, TransientError
from hub_protocol import (
    Change,
    ChangePage,
    Lane,
    PushBatch,
    PushReceipt,
    Receipt,
    ReceiptStatus,
)

#: how many times in a row an archive upload may be told "another offset" before it gives up
#: (for now: the lifecycle retries the object at its next run)
ARCHIVE_MAX_STALLS = 6


class HubUnavailable(TransientError):
    """Network error, timeout, 5xx, 408 or 429: try again later."""


class HubAuthError(PermanentError):
    """401/403: the credential is unknown or not allowed to do this."""


class HubRejected(PermanentError):
    """Another 4xx: the request itself is wrong; ``status`` and the hub's message."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(f"hub refused the request ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message


class HubClient(Protocol):
    site_id: str

    async def push(self, batch: PushBatch) -> PushReceipt: ...

    async def high_water(self) -> dict[Lane, int]: ...

    async def heartbeat(self, health: dict[str, Any]) -> None: ...

    async def changes(self, cursor: int, limit: int = 500) -> ChangePage: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Credential:
    hub_url: str
    site_id: str
    credential: str

    def save(self, path: Path) -> None:
        """Write with mode 0600, atomically."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(
                {"hub_url": self.hub_url, "site_id": self.site_id, "credential": self.credential},
                fh,
            )
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Credential:
        data = json.loads(path.read_text())
        return cls(data["hub_url"], data["site_id"], data["credential"])


async def _raise_for(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {}
    if resp.status < 300:
        return body
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = err.get("message", text[:200]) if isinstance(err, dict) else ""
    code = str(err.get("code", "")) if isinstance(err, dict) else ""
    if resp.status in (401, 403):
        raise HubAuthError(f"hub says {resp.status}: {message}")
    if resp.status == 409 and code == "already_resolved":  # final: someone decided first
        raise HubRejected(resp.status, message, code)
    if resp.status in (408, 409, 429) or resp.status >= 500:
        raise HubUnavailable(f"hub says {resp.status}: {message}")
    raise HubRejected(resp.status, message)


def _ssl_context(ca_file: str) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


async def enroll(
    hub_url: str, token: str, *, timeout_s: float = 30.0, ca_file: str = ""
) -> Credential:
    """Trade a one-time enrollment token for this site's credential."""
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                connector=aiohttp.TCPConnector(ssl=_ssl_context(ca_file)),
            ) as s,
            s.post(f"{hub_url.rstrip('/')}/v1/enroll", json={"token": token}) as r,
        ):
            body = await _raise_for(r)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise HubUnavailable(f"cannot reach the hub at {hub_url}: {exc}") from exc
    return Credential(hub_url.rstrip("/"), body["site_id"], body["credential"])


class HttpHubClient:
    """The real client (JSON over HTTP(S) under /v1)."""

    def __init__(
        self,
        cred: Credential,
        *,
        timeout_s: float = 30.0,
        keepalive: bool = True,
        ca_file: str = "",
    ) -> None:
        """``ca_file``: PEM bundle to trust for the hub's TLS certificate (a private CA);
        empty = the system trust store."""
        self._keepalive = keepalive
        self._ssl = _ssl_context(ca_file)
        self.site_id = cred.site_id
        self._base = cred.hub_url
        self._headers = {"Authorization": f"Bearer {cred.credential}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None
        self.last_download_status = 0  # for tests and logs: 206 = resumed with Range

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers=self._headers,
                connector=aiohttp.TCPConnector(force_close=not self._keepalive, ssl=self._ssl),
            )
        return self._session

    async def _call(self, method: str, path: str, data: bytes | None = None) -> Any:
        try:
            async with self._s().request(
                method,
                self._base + path,
                data=data,
                headers={"Content-Type": "application/json"} if data is not None else None,
            ) as r:
                return await _raise_for(r)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise HubUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def push(self, batch: PushBatch) -> PushReceipt:
        return PushReceipt.from_json(await self._call("POST", "/v1/push", batch.encode()))

    async def high_water(self) -> dict[Lane, int]:
        body = await self._call("GET", "/v1/high-water")
        return {Lane(k): int(v) for k, v in body["high_water"].items()}

    async def heartbeat(self, health: dict[str, Any]) -> None:
        await self._call("POST", "/v1/heartbeat", json.dumps(health).encode())

    async def changes(self, cursor: int, limit: int = 500) -> ChangePage:
        body = await self._call("GET", f"/v1/changes?cursor={int(cursor)}&limit={int(limit)}")
        return ChangePage.from_json(body)

    async def download(self, path: str, dest: Path, *, limit: int) -> None:
        """Append ``path`` to ``dest`` from its current size (HTTP Range), fsync, never past
        ``limit`` bytes (ReleaseError ``too_large`` if the hub sends more)."""
        from hub_protocol.releases import ReleaseError

        have = dest.stat().st_size if dest.exists() else 0
        if have >= limit:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with self._s().get(self._base + path, headers=headers) as r:
                self.last_download_status = r.status
                if r.status == 200 and have:  # the server ignored Range: start over
                    have = 0
                    dest.unlink(missing_ok=True)
                elif r.status not in (200, 206):
                    await _raise_for(r)
                with dest.open("ab") as fh:
                    async for chunk in r.content.iter_chunked(1 << 20):
                        if have + len(chunk) > limit:
                            raise ReleaseError(
                                "too_large", f"download exceeds the signed size of {limit} bytes"
                            )
                        fh.write(chunk)
                        have += len(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise HubUnavailable(f"download {path}: {type(exc).__name__}: {exc}") from exc

    async def report_model(self, name: str, version: str, status: str, detail: str) -> None:
        await self._call(
            "POST",
            "/v1/model-status",
            json.dumps(
                {"name": name, "version": version, "status": status, "detail": detail}
            ).encode(),
        )

    async def conflicts(self) -> list[dict[str, Any]]:
        """This site's open manual-review conflicts at the hub."""
        return list((await self._call("GET", "/v1/conflicts"))["conflicts"])

    async def resolve_conflict(self, conflict_id: int, take: str, by: str) -> int:
        """Resolve one (``take``: edge|cloud); returns the record's new version."""
        body = json.dumps({"take": take, "by": by}).encode()
        return int(
            (await self._call("POST", f"/v1/conflicts/{int(conflict_id)}/resolve", body))["version"]
        )

    async def archive_put(self, sha256: str, data: bytes, *, chunk: int = 4 << 20) -> int:
        """Upload ``data`` (named by its SHA-256) to this site's archive at the hub,
        resuming from whatever the hub already holds. Returns once the hub confirmed it
        checked the hash and stored the object; returns the bytes sent this time."""
        state = await self._call("GET", f"/v1/archive/{sha256}/upload")
        offset, sent, stalls = int(state["offset"]), 0, 0
        while not state.get("complete"):
            if not 0 <= offset <= len(data):
                raise HubRejected(409, f"the hub holds {offset} bytes of a {len(data)}-byte object")
            body = data[offset : offset + chunk]
            headers = {
                "Upload-Offset": str(offset),
                "Upload-Length": str(len(data)),
                "Content-Type": "application/octet-stream",
            }
            try:
                async with self._s().patch(
                    f"{self._base}/v1/archive/{sha256}", data=body, headers=headers
                ) as r:
                    if r.status == 409:  # another offset at the hub: continue from there
                        state = await r.json()
                        offset = int(state["offset"])
                        stalls += 1  # bounded, with backoff: never a tight loop
                        if stalls > ARCHIVE_MAX_STALLS:
                            raise HubUnavailable(
                                f"archive upload of {sha256[:12]} makes no progress: the hub "
                                f"answered {stalls} times with another offset ({offset})"
                            )
                        await asyncio.sleep(min(0.05 * 2**stalls, 5.0))
                        continue
                    state = await _raise_for(r)
                    stalls = 0
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise HubUnavailable(f"archive upload: {type(exc).__name__}: {exc}") from exc
            sent += len(body)
            offset = int(state["offset"])
        return sent

    async def archive_get(self, sha256: str) -> bytes:
        """An object of this site's archive (for a restore)."""
        try:
            async with self._s().get(f"{self._base}/v1/archive/{sha256}") as r:
                if r.status != 200:
                    await _raise_for(r)
                return await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise HubUnavailable(f"archive download: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class FakeHubClient:
    """In memory, with the hub's semantics (at most once per key and lane seq, gap-free
    high-water). ``fail_next`` makes the next calls raise HubUnavailable."""

    def __init__(self, site_id: str = "site-fake") -> None:
        self.site_id = site_id
        self.records: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.held: dict[Lane, set[int]] = {lane: set() for lane in Lane}
        self.heartbeats: list[dict[str, Any]] = []
        self.feed: list[dict[str, Any]] = []  # tests append cloud-side changes here
        self.fail_next = 0

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise HubUnavailable("fake hub is down")

    def _hw(self) -> dict[Lane, int]:
        out = {}
        for lane, seqs in self.held.items():
            hw = 0
            while hw + 1 in seqs:
                hw += 1
            if hw:
                out[lane] = hw
        return out

    async def push(self, batch: PushBatch) -> PushReceipt:
        self._maybe_fail()
        receipts = []
        for r in batch.records:
            if r.seq in self.held[r.lane] or r.key in self.records:
                receipts.append(Receipt(key=r.key, seq=r.seq, status=ReceiptStatus.DUPLICATE))
                self.held[r.lane].add(r.seq)
                continue
            self.records[r.key] = dict(r.payload)
            self.order.append(r.key)
            self.held[r.lane].add(r.seq)
            receipts.append(Receipt(key=r.key, seq=r.seq, status=ReceiptStatus.APPLIED, version=1))
        return PushReceipt(receipts=tuple(receipts), high_water=self._hw())

    async def high_water(self) -> dict[Lane, int]:
        self._maybe_fail()
        return self._hw()

    async def heartbeat(self, health: dict[str, Any]) -> None:
        self._maybe_fail()
        self.heartbeats.append(health)

    async def changes(self, cursor: int, limit: int = 500) -> ChangePage:
        self._maybe_fail()
        out = [Change.from_json(c) for c in self.feed if c["cursor"] > cursor][:limit]
        return ChangePage(changes=tuple(out), next_cursor=out[-1].cursor if out else cursor)

    async def close(self) -> None:
        return None
