"""A TCP proxy for tests that breaks connections on purpose.

Each accepted connection gets a fault chosen by a seeded RNG (or ``pass``):

* ``drop``: close the client connection at once;
* ``stall``: accept and read, never answer (the client must time out);
* ``cut``: forward the request, then cut the response after a few bytes;
* ``delay``: forward normally after a random delay (connections finish out of order).

Runs its own asyncio loop in a thread, so tests can use it from sync or async code.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter

FAULTS = ("drop", "stall", "cut", "delay")


class FaultProxy:
    def __init__(
        self, target_port: int, *, fault_rate: float = 0.3, seed: int = 1, host: str = "127.0.0.1"
    ) -> None:
        self.target_port = target_port
        self.fault_rate = fault_rate
        self.host = host
        self.port = 0
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self.enabled = True

    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def faults(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != "pass")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        kind = "pass"
        if self.enabled and self._rng.random() < self.fault_rate:
            kind = self._rng.choice(FAULTS)
        self.counts[kind] += 1
        try:
            if kind == "drop":
                return
            if kind == "stall":
                await reader.read(65536)
                await asyncio.sleep(3600)
                return
            if kind == "delay":
                await asyncio.sleep(self._rng.uniform(0.05, 0.4))
            try:
                up_r, up_w = await asyncio.open_connection(self.host, self.target_port)
            except OSError:
                return  # target down: the client sees a closed connection
            cut_after = self._rng.randint(1, 200) if kind == "cut" else None

            async def pipe(
                src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None
            ) -> None:
                sent = 0
                try:
                    while data := await src.read(65536):
                        if limit is not None and sent + len(data) > limit:
                            dst.write(data[: max(limit - sent, 0)])
                            await dst.drain()
                            return
                        dst.write(data)
                        await dst.drain()
                        sent += len(data)
                except (ConnectionError, OSError):
                    return

            to_up = asyncio.create_task(pipe(reader, up_w, None))
            await pipe(up_r, writer, cut_after)
            to_up.cancel()
            up_w.close()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]
