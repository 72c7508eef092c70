"""The hub store under concurrent writers, on SQLite and on a real PostgreSQL: what several
replicas do at once. Every writer is its own thread with its own connection (as replicas
are): racing edits never lose an update, a conflict is resolved once, a held writer's feed
entry is never skipped by a reader, high-water marks only grow, and replicas starting at the
same moment migrate once."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from cloud_hub.store import AlreadyResolved, HubStore, SchemaTooNew, connect
from cloud_hub.store.feed import write_change
from cloud_hub.store.schema import MIGRATIONS, hub_migrations, records
from hub_protocol import HLC, ChangeType, Lane, PushBatch, Record, RecordType


def _threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    """Run ``target(i)`` in ``n`` threads started together; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            start.wait()
            target(i)
        except BaseException as exc:  # collected and asserted on by the caller
            errors.append(exc)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return errors


def _site(store: HubStore, name: str) -> str:
    return store.enroll(store.create_enrollment_token(name)).site_id


def _version(store: HubStore, site: str, key: str) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(records.c.version).where(records.c.site_id == site, records.c.key == key)
            ).scalar_one()
        )


def _push_one(
    store: HubStore, site: str, key: str, seq: int, base: int, payload: dict[str, Any]
) -> Any:
    rec = Record(
        key=key,
        seq=seq,
        type=RecordType.REVIEW,
        lane=Lane.NORMAL,
        hlc=HLC(seq, 0, "edge"),
        base_version=base,
        payload=payload,
    )
    return store.push(site, PushBatch(protocol=1, site_id=site, records=(rec,))).receipts[0]


def test_racing_edits_never_lose_an_update(hub_db_url: str) -> None:
    """Cloud edits and edge edits of one record, from many writers at once: every version
    is produced by exactly one writer (none written twice, none skipped), an edge edit
    based on an older version is never applied (it is kept for manual review), and the
    record holds what the writer of its last version wrote."""
    store = HubStore(connect(hub_db_url))
    try:
        site, key = _site(store, "A"), "review/race"
        assert _push_one(store, site, key, 1, 0, {"by": "first"}).status.value == "applied"
        seqs = itertools.count(2)
        seq_lock = threading.Lock()
        claims: list[tuple[int, dict[str, Any]]] = []
        queued: list[int] = []

        def writer(i: int) -> None:
            for n in range(12):
                payload = {"by": f"w{i}", "n": n}
                if i % 2:  # a cloud service edits at the hub
                    v = store.cloud_edit(site, key=key, type=RecordType.REVIEW, payload=payload)
                    claims.append((v, payload))
                    continue
                base = _version(store, site, key)  # the edge's copy, maybe stale at once
                with seq_lock:
                    seq = next(seqs)
                r = _push_one(store, site, key, seq, base, payload)
                if r.status.value == "applied":
                    assert r.version == base + 1
                    claims.append((r.version, payload))
                else:
                    assert r.status.value == "conflict" and "manual review" in r.error
                    queued.append(seq)

        assert _threads(6, writer) == []
        final = _version(store, site, key)
        versions = sorted(v for v, _ in claims)
        assert versions == list(range(2, final + 1)), "a version written twice or skipped"
        with store.engine.connect() as conn:
            payload = conn.execute(
                sa.select(records.c.payload).where(records.c.site_id == site, records.c.key == key)
            ).scalar_one()
        assert json.loads(payload) == dict(claims)[final]
        assert len(store.conflicts(site)) == len(queued)
        # the edge learns of every cloud edit through its feed, in version order
        feed = [c for c in store.changes_after(site, 0, 5000) if c.key == key]
        cloud_versions = [c.version for c in feed]
        assert cloud_versions == sorted(cloud_versions)
    finally:
        store.engine.dispose()


def test_a_conflict_is_resolved_once(hub_db_url: str) -> None:
    """Two people resolving the same conflict at the same moment (one takes the edge
    version, the other the cloud's): exactly one decision is applied and fed to the site;
    the other gets the first decision back."""
    store = HubStore(connect(hub_db_url))
    try:
        site = _site(store, "A")
        ids = []
        for k in range(8):
            key = f"review/c{k}"
            _push_one(store, site, key, 2 * k + 1, 0, {"v": "accept"})
            assert _push_one(store, site, key, 2 * k + 2, 0, {"v": "reject"}).status.value == (
                "conflict"
            )
        ids = [int(c["id"]) for c in store.conflicts(site)]
        assert len(ids) == 8
        for cid in ids:
            won: list[tuple[str, int]] = []
            lost: list[AlreadyResolved] = []

            def resolve(
                i: int,
                cid: int = cid,
                won: list[tuple[str, int]] = won,
                lost: list[AlreadyResolved] = lost,
            ) -> None:
                take = ("edge", "cloud")[i]
                try:
                    won.append((take, store.resolve_conflict(None, cid, take=take, by=take)))
                except AlreadyResolved as exc:
                    lost.append(exc)

            assert _threads(2, resolve) == []
            assert len(won) == 1 and len(lost) == 1
            assert lost[0].outcome["resolution"] == won[0][0]
            assert lost[0].outcome["resolved_by"] == won[0][0]
        feed = [
            c
            for c in store.changes_after(site, 0, 5000)
            if c.type is ChangeType.CONFLICT_RESOLUTION
        ]
        assert sorted(c.payload["conflict_id"] for c in feed) == sorted(ids)
        assert store.conflicts(site) == []
    finally:
        store.engine.dispose()


def test_a_held_writer_is_never_skipped_by_the_feed(hub_db_url: str) -> None:
    """A writer holds its transaction open after adding a feed entry (a long ``assign
    --all``); other writers add entries for the same site meanwhile, and a reader pulls the
    feed the whole time, moving its cursor as a site does. The reader ends with every entry
    exactly once, in position order."""
    store = HubStore(connect(hub_db_url))
    try:
        site = _site(store, "A")
        held, release = threading.Event(), threading.Event()
        done = threading.Event()
        seen: list[int] = []
        keys: list[str] = []

        def holder() -> None:
            with store.engine.begin() as conn:
                write_change(
                    conn, site, type=ChangeType.RECORD, key="held", version=1, payload={}, now=0
                )
                held.set()
                release.wait(30)

        def writer(i: int) -> None:
            held.wait(30)
            for n in range(5):
                store.add_change(
                    site, type=ChangeType.RECORD, key=f"w{i}-{n}", version=1, payload={}
                )

        def reader() -> None:
            cursor = 0
            while True:
                last = done.is_set()
                page = store.changes_after(site, cursor, 3)
                for c in page:
                    seen.append(c.cursor)
                    keys.append(c.key)
                    cursor = c.cursor
                if last and not page:
                    return
                time.sleep(0.005)

        threads = [threading.Thread(target=holder), threading.Thread(target=reader)]
        threads += [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the reader polls while the holder's entry is uncommitted
        release.set()
        for t in threads[2:]:
            t.join(60)
        threads[0].join(60)
        done.set()
        threads[1].join(60)
        assert sorted(keys) == sorted(["held"] + [f"w{i}-{n}" for i in range(3) for n in range(5)])
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
    finally:
        store.engine.dispose()


def test_high_water_marks_only_grow_under_pipelined_pushes(hub_db_url: str) -> None:
    """A site pipelining pushes (several in flight at once, out of order, some resent):
    every record applied once, and the high-water mark a watcher reads never goes back."""
    store = HubStore(connect(hub_db_url))
    try:
        site = _site(store, "A")
        batches = [list(range(1 + 20 * b, 21 + 20 * b)) for b in range(10)]
        rng = random.Random(7)
        order = batches + rng.sample(batches, 4)  # resends
        rng.shuffle(order)
        stop = threading.Event()
        marks: list[int] = []

        def watch() -> None:
            while not stop.is_set():
                marks.append(store.high_water(site).get(Lane.NORMAL, 0))

        def pusher(i: int) -> None:
            for seqs in order[i::4]:
                recs = tuple(
                    Record(
                        key=f"r/{s}",
                        seq=s,
                        type=RecordType.RESULT,
                        lane=Lane.NORMAL,
                        hlc=HLC(s, 0, "edge"),
                        base_version=0,
                        payload={"s": s},
                    )
                    for s in seqs
                )
                store.push(site, PushBatch(protocol=1, site_id=site, records=recs))

        w = threading.Thread(target=watch)
        w.start()
        errors = _threads(4, pusher)
        stop.set()
        w.join(30)
        assert errors == []
        assert marks == sorted(marks)
        assert store.high_water(site)[Lane.NORMAL] == 200
        assert len(store.results(site, limit=1000)) == 200
    finally:
        store.engine.dispose()


def test_replicas_starting_together_migrate_once(hub_db_url: str) -> None:
    """Four replicas open a fresh database at the same moment: all come up, every migration
    applied once. A database migrated by a newer hub is refused with a clear message."""
    engines: list[Any] = []

    def start(i: int) -> None:
        engines.append(connect(hub_db_url))

    assert _threads(4, start) == []
    with engines[0].connect() as conn:
        names = list(conn.execute(sa.select(hub_migrations.c.name)).scalars())
    assert sorted(names) == sorted(name for name, _ in MIGRATIONS)
    with engines[0].begin() as conn:
        conn.execute(hub_migrations.insert().values(name="9999_from_the_future", applied_at=0))
    for e in engines:
        e.dispose()
    with pytest.raises(SchemaTooNew, match=r"9999_from_the_future.*newer version"):
        connect(hub_db_url)


def test_an_older_hub_database_is_upgraded_and_sites_keep_their_cursors(hub_db_url: str) -> None:
    """A database as the hub before migration 0007 left it (32-bit versions, feed
    positions from one global sequence) with two sites' entries interleaved: after the
    upgrade every old entry keeps its position, so a site's stored cursor stays valid, and
    new entries come after it; a 64-bit version (milliseconds) is stored."""
    engine = connect(hub_db_url)
    store = HubStore(engine)
    a, b = _site(store, "A"), _site(store, "B")
    serial = "BIGSERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE changes"))
        conn.execute(
            sa.text(
                f'CREATE TABLE changes ("cursor" {serial} PRIMARY KEY, site_id VARCHAR(64) NOT '
                "NULL, type VARCHAR(40) NOT NULL, key VARCHAR(200) NOT NULL, version INTEGER "
                "NOT NULL, payload TEXT NOT NULL, created_at FLOAT NOT NULL)"
            )
        )
        conn.execute(sa.text("ALTER TABLE sites DROP COLUMN feed_last"))
        for i in range(6):
            conn.execute(
                sa.text(
                    "INSERT INTO changes (site_id, type, key, version, payload, created_at) "
                    "VALUES (:s, 'record', :k, 1, '{}', 0)"
                ),
                {"s": (a, b)[i % 2], "k": f"old{i}"},
            )
        conn.execute(
            hub_migrations.delete().where(hub_migrations.c.name == "0007_wide_versions_site_feed")
        )
    engine.dispose()
    store = HubStore(connect(hub_db_url))
    try:
        old_a = store.changes_after(a, 0)
        assert [(c.cursor, c.key) for c in old_a] == [(1, "old0"), (3, "old2"), (5, "old4")]
        assert [c.cursor for c in store.changes_after(b, 0)] == [2, 4, 6]
        millis = 1_800_000_000_000  # what assign writes: more than 32 bits
        store.add_change(a, type=ChangeType.MODEL_ASSIGNMENT, key="m", version=millis, payload={})
        new = store.changes_after(a, old_a[-1].cursor)  # the site's stored cursor
        assert [(c.key, c.version) for c in new] == [("m", millis)] and new[0].cursor > 5
        assert store.changes_after(b, 6) == []
    finally:
        store.engine.dispose()
