"""The SQLite spool: durability, FIFO order, limits, faults and the in-memory stats."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import random
import sqlite3
import stat
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bridge.errors import SpoolError, SpoolFull
from bridge.events import WebhookEvent
from bridge.spool import (
    LOCK_FILENAME,
    SCHEMA_VERSION,
    SPOOL_FILENAME,
    DeadLetter,
    SpooledEvent,
    SpoolStats,
    SqliteSpool,
    read_records,
    read_stats,
)

ROOT = Path(__file__).resolve().parents[2]
BIG = 1 << 40
PLANTED_BODY = b'{"type":"CartOpened","eventId":"e","secret":"planted-b0dy-Marker"}'
# Every byte value, a NUL and invalid UTF-8: the spool must not care what the body holds.
ODD_BODY = bytes(range(256)) + b"\x00\xff\xfe" + "é".encode() + b"\xc3"


def make_event(
    event_id: str = "e-1", body: bytes = b"{}", *, received_at: float = 1.0
) -> WebhookEvent:
    return WebhookEvent("klient", "CartOpened", event_id, body, received_at)


async def open_spool(
    directory: Path, *, max_bytes: int = BIG, max_events: int = BIG
) -> SqliteSpool:
    return await SqliteSpool.open(directory, max_bytes=max_bytes, max_events=max_events)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    spool = await open_spool(tmp_path / "spool")
    yield spool
    await spool.close()


async def pragma(spool: SqliteSpool, statement: str) -> Any:
    """Run a PRAGMA on the spool's own connection (the writer thread) and return its value."""
    row = await spool._call(lambda conn: conn.execute(statement).fetchone())
    return None if row is None else row[0]


class PausedWriter:
    """Holds the writer thread inside a job so that what is submitted meanwhile forms one batch."""

    def __init__(self, spool: SqliteSpool) -> None:
        self._entered = threading.Event()
        self._gate = threading.Event()
        self.task = asyncio.ensure_future(spool._call(self._hold))

    def _hold(self, conn: object) -> None:
        self._entered.set()
        self._gate.wait()

    @classmethod
    async def start(cls, spool: SqliteSpool) -> PausedWriter:
        """Returns once the writer thread is inside the held job, so nothing joins its batch."""
        paused = cls(spool)
        await asyncio.get_running_loop().run_in_executor(None, paused._entered.wait)
        return paused

    def release_after_pending_callbacks(self) -> None:
        # call_soon runs callbacks in order: tasks created before this call take their first
        # step (and submit their job) before the gate opens.
        asyncio.get_running_loop().call_soon(self._gate.set)

    async def release(self) -> None:
        self._gate.set()
        await self.task


# --- contents and order -----------------------------------------------------------------------


async def test_appended_event_comes_back_byte_for_byte(spool: SqliteSpool) -> None:
    """Every field of the event, and every byte of its body, survive the round trip."""
    event = WebhookEvent("klient", "OfferOpened", "id-ü", ODD_BODY, 1_700_000_000.123456)
    big = make_event("big", os.urandom(1 << 20))
    seq = await spool.append("p-u-o-m-e-o-offeropened-klient", event)
    big_seq = await spool.append("other", big)

    records = await spool.head(10)

    assert [record.seq for record in records] == [seq, big_seq]
    assert records[0].exchange == "p-u-o-m-e-o-offeropened-klient"
    assert records[0].event == event
    assert records[1].event.body == big.body
    assert isinstance(records[0].spooled_at, float)


async def test_head_returns_oldest_first_up_to_limit(spool: SqliteSpool) -> None:
    """head() is FIFO by seq and honours its limit."""
    seqs = [await spool.append("x", make_event(f"e-{i}")) for i in range(5)]

    assert seqs == sorted(seqs)
    assert [r.seq for r in await spool.head(3)] == seqs[:3]
    assert [r.seq for r in await spool.head(100)] == seqs
    assert await spool.head(0) == []


async def test_head_for_one_exchange_returns_only_its_records_in_order(spool: SqliteSpool) -> None:
    """With exchange=..., head() skips other exchanges' records and keeps seq order."""
    for i in range(9):
        await spool.append(f"ex-{i % 3}", make_event(f"e-{i}"))

    records = await spool.head(10, exchange="ex-1")

    assert [r.event.event_id for r in records] == ["e-1", "e-4", "e-7"]
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert await spool.head(10, exchange="nowhere") == []


async def test_delete_removes_given_seqs_and_ignores_unknown_ones(spool: SqliteSpool) -> None:
    """delete() removes exactly the listed records; seqs already gone are not an error."""
    seqs = [await spool.append("x", make_event(f"e-{i}")) for i in range(4)]

    await spool.delete([seqs[0], seqs[2], 9_999])
    await spool.delete([seqs[0]])
    await spool.delete([])

    assert [r.seq for r in await spool.head(10)] == [seqs[1], seqs[3]]


async def test_negative_head_limit_is_refused(spool: SqliteSpool) -> None:
    """SQLite reads LIMIT -1 as "no limit"; the spool refuses it instead."""
    with pytest.raises(ValueError):
        await spool.head(-1)


async def test_read_records_pages_through_every_record(spool: SqliteSpool) -> None:
    """read_records() yields every record in seq order across several pages, while the spool
    stays open in its owner."""
    seqs = await asyncio.gather(*(spool.append("x", make_event(f"e-{i}")) for i in range(1_234)))

    exported = [record.seq for record in read_records(spool.directory)]

    assert exported == sorted(seqs)


# --- seqs, stats and pending exchanges ---------------------------------------------------------


async def test_seqs_are_never_reused_after_draining_and_reopening(tmp_path: Path) -> None:
    """AUTOINCREMENT: a drained, reopened spool continues after the highest seq ever used."""
    spool = await open_spool(tmp_path)
    seqs = [await spool.append("x", make_event()) for _ in range(3)]
    await spool.delete(seqs)
    await spool.close()

    spool = await open_spool(tmp_path)
    try:
        assert await spool.append("x", make_event()) == seqs[-1] + 1
    finally:
        await spool.close()


async def test_stats_follow_appends_deletes_and_dead_letters(spool: SqliteSpool) -> None:
    """stats() counts events, body bytes, the head's received_at and dead letters."""
    assert spool.stats() == SpoolStats(0, 0, None, 0)
    first = await spool.append("x", make_event(body=b"12345", received_at=10.0))
    second = await spool.append("y", make_event(body=b"123", received_at=5.0))
    assert spool.stats() == SpoolStats(2, 8, 10.0, 0)

    await spool.delete([first])
    assert spool.stats() == SpoolStats(1, 3, 5.0, 0)

    await spool.dead_letter(second, "returned")
    assert spool.stats() == SpoolStats(0, 0, None, 1)


async def test_stats_and_pending_exchanges_are_recomputed_at_open(tmp_path: Path) -> None:
    """A reopened spool reports what is on disk, not zeros."""
    spool = await open_spool(tmp_path)
    seq = await spool.append("x", make_event(body=b"abc", received_at=3.0))
    await spool.append("y", make_event(body=b"de", received_at=4.0))
    await spool.append("y", make_event(body=b"f", received_at=5.0))
    await spool.dead_letter(seq, "poison")
    before = spool.stats()
    await spool.close()

    with capture_logs() as logs:
        spool = await open_spool(tmp_path)
    try:
        assert spool.stats() == before == SpoolStats(2, 3, 4.0, 1)
        assert spool.exchanges_pending() == {"y"}
        assert {"event": "spool.opened", "events": 2, "dead_letters": 1}.items() <= logs[0].items()
    finally:
        await spool.close()


async def test_exchanges_pending_tracks_which_exchanges_have_records(spool: SqliteSpool) -> None:
    """An exchange is pending while any of its records is in the spool."""
    a1 = await spool.append("a", make_event())
    a2 = await spool.append("a", make_event())
    b1 = await spool.append("b", make_event())
    assert spool.exchanges_pending() == {"a", "b"}

    await spool.delete([a1])
    assert spool.exchanges_pending() == {"a", "b"}
    await spool.dead_letter(a2, "poison")
    assert spool.exchanges_pending() == {"b"}
    await spool.delete([b1])
    assert spool.exchanges_pending() == frozenset()


async def test_exchange_is_pending_from_the_moment_append_is_called(spool: SqliteSpool) -> None:
    """A later event for the exchange must queue behind one still being written."""
    paused = await PausedWriter.start(spool)
    append = asyncio.ensure_future(spool.append("slow", make_event()))
    seen: list[tuple[frozenset[str], int]] = []
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: seen.append((spool.exchanges_pending(), spool.stats().events)))
    paused.release_after_pending_callbacks()

    await append
    await paused.task

    assert seen == [(frozenset({"slow"}), 0)]  # pending, though not yet committed
    assert spool.exchanges_pending() == {"slow"}


# --- group commit ---------------------------------------------------------------------------


async def test_concurrent_appends_share_one_commit(spool: SqliteSpool) -> None:
    """64 appends queued while the writer is busy are committed by one transaction."""
    paused = await PausedWriter.start(spool)
    appends = [asyncio.ensure_future(spool.append("x", make_event(f"e-{i}"))) for i in range(64)]
    commits_before = spool._writer.commits
    paused.release_after_pending_callbacks()

    seqs = await asyncio.gather(*appends)
    await paused.task

    assert spool._writer.commits - commits_before == 1
    assert seqs == list(range(seqs[0], seqs[0] + 64))  # submission order is seq order
    assert spool.stats().events == 64


async def test_full_spool_refuses_only_the_appends_that_do_not_fit_in_a_batch(
    tmp_path: Path,
) -> None:
    """Within one batch, records beyond max_events get SpoolFull and the rest commit."""
    spool = await open_spool(tmp_path, max_events=3)
    try:
        paused = await PausedWriter.start(spool)
        appends = [asyncio.ensure_future(spool.append("x", make_event())) for _ in range(5)]
        commits_before = spool._writer.commits
        paused.release_after_pending_callbacks()

        results = await asyncio.gather(*appends, return_exceptions=True)
        await paused.task

        assert [type(result) for result in results] == [int, int, int, SpoolFull, SpoolFull]
        assert spool._writer.commits - commits_before == 1
        assert spool.stats().events == 3
    finally:
        await spool.close()


async def test_append_cancelled_before_the_writer_took_it_is_not_stored(
    spool: SqliteSpool,
) -> None:
    """A caller that gave up before its record was written leaves nothing behind."""
    paused = await PausedWriter.start(spool)
    append = asyncio.ensure_future(spool.append("x", make_event()))
    asyncio.get_running_loop().call_soon(append.cancel)

    with pytest.raises(asyncio.CancelledError):
        await append
    await paused.release()
    await spool._call(lambda conn: None)  # runs after whatever the writer took with the gate

    assert await spool.head(10) == []
    assert spool.exchanges_pending() == frozenset()


# --- limits ------------------------------------------------------------------------------------


async def test_spool_full_at_max_events_until_a_delete(tmp_path: Path) -> None:
    """The append past max_events raises SpoolFull; after a delete there is room again."""
    spool = await open_spool(tmp_path, max_events=3)
    try:
        seqs = [await spool.append("x", make_event()) for _ in range(3)]
        with pytest.raises(SpoolFull, match="max_events=3"):
            await spool.append("x", make_event())
        assert spool.stats().events == 3

        await spool.delete(seqs[:1])
        await spool.append("x", make_event())
        assert spool.stats().events == 3
    finally:
        await spool.close()


async def test_spool_full_at_max_bytes_counts_body_bytes(tmp_path: Path) -> None:
    """max_bytes bounds the sum of body sizes; SpoolFull is a SpoolError."""
    spool = await open_spool(tmp_path, max_bytes=10)
    try:
        first = await spool.append("x", make_event(body=b"123456"))
        await spool.append("x", make_event(body=b"7890"))  # exactly 10
        with pytest.raises(SpoolFull) as full:
            await spool.append("x", make_event(body=b"!"))
        assert isinstance(full.value, SpoolError)
        with pytest.raises(SpoolFull):
            await spool.append("x", make_event(body=b"x" * 11))  # never fits

        await spool.delete([first])
        await spool.append("x", make_event(body=b"abcdef"))
        assert spool.stats().body_bytes == 10
    finally:
        await spool.close()


# --- dead letters --------------------------------------------------------------------------


async def test_dead_letter_moves_the_record_with_reason(spool: SqliteSpool) -> None:
    """dead_letter() takes the record out of the replay queue and keeps it, with why and when."""
    keep = await spool.append("x", make_event("keep"))
    poison = await spool.append("x", make_event("poison", ODD_BODY, received_at=7.0))

    await spool.dead_letter(poison, "returned: no route")

    assert [r.seq for r in await spool.head(10)] == [keep]
    dead = list(read_records(spool.directory, dead_letters=True))
    assert len(dead) == 1
    assert isinstance(dead[0], DeadLetter)
    assert (dead[0].seq, dead[0].reason) == (poison, "returned: no route")
    assert dead[0].event == make_event("poison", ODD_BODY, received_at=7.0)
    assert dead[0].dead_at >= dead[0].spooled_at


async def test_dead_letter_of_an_unknown_seq_raises_key_error(spool: SqliteSpool) -> None:
    """Nothing to move is a caller bug, reported as KeyError, and changes nothing."""
    seq = await spool.append("x", make_event())
    with pytest.raises(KeyError):
        await spool.dead_letter(seq + 1, "poison")
    assert spool.stats() == SpoolStats(1, 2, 1.0, 0)


# --- faults ----------------------------------------------------------------------------------


async def test_full_disk_raises_spool_error_then_deletes_free_room(spool: SqliteSpool) -> None:
    """SQLITE_FULL (max_page_count) fails the append; deletes still work and free room."""
    seqs = [await spool.append("x", make_event(body=b"a" * 3_000)) for _ in range(5)]
    pages = await pragma(spool, "PRAGMA page_count")
    await pragma(spool, f"PRAGMA max_page_count = {pages}")

    with pytest.raises(SpoolError) as full:
        await spool.append("x", make_event(body=PLANTED_BODY * 50))

    assert not isinstance(full.value, SpoolFull)
    assert "SQLITE_FULL" in str(full.value)
    assert b"planted" not in str(full.value).encode()
    assert spool.stats().events == 5
    await spool.delete(seqs[:2])
    new_seq = await spool.append("x", make_event(body=b"b" * 3_000))
    assert new_seq > seqs[-1]
    assert [r.seq for r in await spool.head(10)] == [*seqs[2:], new_seq]


async def test_failing_record_does_not_fail_its_batch_mates(spool: SqliteSpool) -> None:
    """When one record of a batch hits SQLITE_FULL, only that append raises."""
    pages = await pragma(spool, "PRAGMA page_count")
    await pragma(spool, f"PRAGMA max_page_count = {pages}")  # room inside pages, none for more
    paused = await PausedWriter.start(spool)
    small = asyncio.ensure_future(spool.append("x", make_event("small", b"{}")))
    large = asyncio.ensure_future(spool.append("x", make_event("large", b"x" * 20_000)))
    paused.release_after_pending_callbacks()

    results = await asyncio.gather(small, large, return_exceptions=True)
    await paused.task

    assert isinstance(results[0], int)
    assert isinstance(results[1], SpoolError)
    assert [r.event.event_id for r in await spool.head(10)] == ["small"]
    assert spool.stats() == SpoolStats(1, 2, 1.0, 0)


async def test_open_over_a_file_raises_spool_error(tmp_path: Path) -> None:
    """A spool directory that cannot be created is a SpoolError at open, and no thread lingers."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    threads_before = set(threading.enumerate())

    with pytest.raises(SpoolError, match="open failed"):
        await open_spool(blocker)
    with pytest.raises(SpoolError, match="open failed"):
        await open_spool(blocker / "below")

    assert set(threading.enumerate()) <= threads_before


async def test_open_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A corrupt spool file is reported, not overwritten."""
    (tmp_path / SPOOL_FILENAME).write_bytes(b"definitely not sqlite " * 500)

    with pytest.raises(SpoolError, match="SQLITE_NOTADB"):
        await open_spool(tmp_path)

    assert (tmp_path / SPOOL_FILENAME).read_bytes().startswith(b"definitely not sqlite")


async def test_open_refuses_a_newer_schema_version(tmp_path: Path) -> None:
    """A spool written by a newer bridge is left alone; the lock is released for a retry."""
    await (await open_spool(tmp_path)).close()
    set_user_version(tmp_path / SPOOL_FILENAME, SCHEMA_VERSION + 1)

    with pytest.raises(SpoolError, match=f"version {SCHEMA_VERSION + 1} is newer"):
        await open_spool(tmp_path)

    set_user_version(tmp_path / SPOOL_FILENAME, SCHEMA_VERSION)
    await (await open_spool(tmp_path)).close()


def set_user_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


async def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    """Two processes (or two opens) on one spool would replay twice; the lock refuses it."""
    first = await open_spool(tmp_path)
    try:
        with pytest.raises(SpoolError, match="in use"):
            await open_spool(tmp_path)
    finally:
        await first.close()
    await (await open_spool(tmp_path)).close()


async def test_closed_spool_refuses_work_and_close_is_idempotent(tmp_path: Path) -> None:
    """After close() the thread is gone and every call raises SpoolError."""
    spool = await open_spool(tmp_path)
    await spool.append("x", make_event())
    await spool.close()
    await spool.close()

    assert not spool._writer.thread.is_alive()
    with pytest.raises(SpoolError, match="closed"):
        await spool.append("x", make_event())
    with pytest.raises(SpoolError, match="closed"):
        await spool.head(1)
    assert not (tmp_path / f"{SPOOL_FILENAME}-wal").exists() or (
        (tmp_path / f"{SPOOL_FILENAME}-wal").stat().st_size == 0
    )


async def test_open_sets_wal_full_sync_and_private_file_modes(tmp_path: Path) -> None:
    """The durability settings are really in force, and bodies are not world-readable."""
    async with await open_spool(tmp_path / "new") as spool:
        assert await pragma(spool, "PRAGMA journal_mode") == "wal"
        assert await pragma(spool, "PRAGMA synchronous") == 2  # FULL
        assert await pragma(spool, "PRAGMA user_version") == SCHEMA_VERSION
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / SPOOL_FILENAME).stat().st_mode) == 0o600
    assert (tmp_path / "new" / LOCK_FILENAME).exists()


async def test_drained_spool_gives_space_back(spool: SqliteSpool) -> None:
    """Once empty, a spool that held megabytes shrinks its file again."""
    seqs = await asyncio.gather(
        *(spool.append("x", make_event(body=os.urandom(100_000))) for _ in range(60))
    )
    pages_full = await pragma(spool, "PRAGMA page_count")

    await spool.delete(seqs)

    assert await pragma(spool, "PRAGMA freelist_count") == 0
    assert await pragma(spool, "PRAGMA page_count") < pages_full // 10


async def test_no_log_line_or_error_carries_a_body(tmp_path: Path) -> None:
    """The spool's own log lines and errors never include an event body."""
    with capture_logs() as logs:
        spool = await open_spool(tmp_path, max_events=1)
        await spool.append("x", make_event(body=PLANTED_BODY))
        with pytest.raises(SpoolFull) as full:
            await spool.append("x", make_event(body=PLANTED_BODY))
        await spool.close()
        spool = await open_spool(tmp_path, max_events=1)
        await spool.close()

    assert b"planted" not in repr(logs).encode()
    assert "planted" not in str(full.value)
    assert [line["event"] for line in logs] == ["spool.opened", "spool.closed"] * 2


# --- crashes and real I/O errors (child processes) ---------------------------------------------


def crash_body(i: int) -> bytes:
    """Deterministic, varied bodies, so the parent can check every byte the child wrote."""
    seed = hashlib.sha256(i.to_bytes(4, "big")).digest()
    return seed * (1 + i % 40) + bytes([0, 255, i % 256])


CHILD_PRELUDE = f"""
import asyncio, hashlib, json, os, resource, signal, sys
from pathlib import Path
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from bridge.errors import SpoolError
from bridge.events import WebhookEvent
from bridge.spool import SqliteSpool

{inspect.getsource(crash_body)}

def emit(*fields):
    sys.stdout.write(" ".join(map(str, fields)) + "\\n")
    sys.stdout.flush()
"""


async def start_child(tmp_path: Path, body: str, *args: str) -> asyncio.subprocess.Process:
    script = tmp_path / "child.py"
    script.write_text(CHILD_PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def read_until(
    child: asyncio.subprocess.Process, is_done: Callable[[list[str]], bool]
) -> list[list[str]]:
    """Lines (split into fields) from the child until is_done(fields) says stop."""
    assert child.stdout is not None
    lines = []
    async with asyncio.timeout(60):
        while True:
            line = await child.stdout.readline()
            if not line:
                _, stderr = await child.communicate()
                pytest.fail(f"child exited early: {stderr.decode()[-2000:]}")
            fields = line.decode().split()
            lines.append(fields)
            if is_done(fields):
                return lines


async def kill(child: asyncio.subprocess.Process) -> list[list[str]]:
    """SIGKILL the child; return the lines it wrote before dying."""
    child.kill()
    stdout, _ = await child.communicate()
    return [line.split() for line in stdout.decode().splitlines() if line.strip()]


async def test_records_acknowledged_before_sigkill_survive_in_order(tmp_path: Path) -> None:
    """Kill -9 right after append() returned for record K: records 1..K are on disk, intact."""
    child = await start_child(
        tmp_path,
        """
        async def main():
            spool = await SqliteSpool.open(Path(sys.argv[1]), max_bytes=1 << 40, max_events=1 << 40)
            i = 0
            while True:
                i += 1
                event = WebhookEvent("klient", "CartOpened", f"e-{i}", crash_body(i), float(i))
                seq = await spool.append(f"ex-{i % 3}", event)
                emit(i, seq)

        asyncio.run(main())
        """,
        str(tmp_path / "spool"),
    )
    acknowledged = 200
    await read_until(child, lambda fields: int(fields[0]) >= acknowledged)
    after_kill = await kill(child)
    # The child kept appending until the signal landed; those may be there too.
    acknowledged = max([acknowledged, *(int(fields[0]) for fields in after_kill)])

    async with await open_spool(tmp_path / "spool") as spool:
        records = list(read_records(spool.directory))

    assert len(records) >= acknowledged
    for i, record in enumerate(records, start=1):
        assert record.seq == i
        assert record.exchange == f"ex-{i % 3}"
        assert record.event == WebhookEvent("klient", "CartOpened", f"e-{i}", crash_body(i), i)
    assert spool.stats().events == len(records)


async def test_concurrent_appends_acknowledged_before_sigkill_all_survive(tmp_path: Path) -> None:
    """With 16 appenders (group commits in flight), every acknowledged record is on disk."""
    child = await start_child(
        tmp_path,
        """
        async def appender(spool, worker):
            i = worker
            while True:
                event = WebhookEvent("klient", "CartOpened", f"e-{i}", crash_body(i), float(i))
                seq = await spool.append("x", event)
                emit(i, seq)
                i += 16

        async def main():
            spool = await SqliteSpool.open(Path(sys.argv[1]), max_bytes=1 << 40, max_events=1 << 40)
            await asyncio.gather(*(appender(spool, worker) for worker in range(16)))

        asyncio.run(main())
        """,
        str(tmp_path / "spool"),
    )
    lines = await read_until(child, lambda fields: int(fields[1]) >= 500)
    lines += await kill(child)
    acknowledged = {int(i): int(seq) for i, seq in lines}

    async with await open_spool(tmp_path / "spool") as spool:
        records = {record.seq: record for record in read_records(spool.directory)}

    for i, seq in acknowledged.items():
        assert records[seq].event.event_id == f"e-{i}"
        assert records[seq].event.body == crash_body(i)
    ids = [record.event.event_id for record in records.values()]
    assert len(ids) == len(set(ids))


async def test_file_size_limit_write_error_is_a_spool_error_and_recovers(tmp_path: Path) -> None:
    """A real write failure (RLIMIT_FSIZE, EFBIG) raises SpoolError; lifting it lets appends in."""
    child = await start_child(
        tmp_path,
        """
        async def main():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a killed process
            spool = await SqliteSpool.open(Path(sys.argv[1]), max_bytes=1 << 40, max_events=1 << 40)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
            stored = []
            body = sys.argv[2].encode() * 200
            while True:
                try:
                    stored.append(await spool.append("x", WebhookEvent("t", "T", "e", body, 1.0)))
                except SpoolError as exc:
                    error = str(exc)
                    break
            try:
                await spool.append("x", WebhookEvent("t", "T", "e", body, 1.0))
                failed_again = False
            except SpoolError:
                failed_again = True
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            stored.append(await spool.append("x", WebhookEvent("t", "T", "e", body, 1.0)))
            stats = spool.stats()
            await spool.close()
            emit(json.dumps({"stored": stored, "error": error, "failed_again": failed_again,
                             "events": stats.events}))

        asyncio.run(main())
        """,
        str(tmp_path / "spool"),
        PLANTED_BODY.decode(),
    )
    stdout, stderr = await child.communicate()
    assert child.returncode == 0, stderr.decode()[-2000:]
    report = json.loads(stdout)

    assert "SQLITE_IOERR" in report["error"] or "SQLITE_FULL" in report["error"]
    assert "planted" not in report["error"]
    assert report["failed_again"]
    assert report["events"] == len(report["stored"]) > 1
    async with await open_spool(tmp_path / "spool") as spool:
        assert [r.seq for r in await spool.head(1_000)] == report["stored"]


# --- model-based ----------------------------------------------------------------------------


def random_operation(rng: random.Random) -> tuple[Any, ...]:
    kind = rng.choices(["append", "delete", "dead_letter", "reopen"], weights=[6, 3, 1, 1])[0]
    if kind == "append":
        # received_at out of order on purpose: the stats report the head's, not the minimum.
        return (kind, rng.choice("abc"), rng.randbytes(rng.randrange(25)), rng.uniform(0, 100))
    if kind == "delete":
        return (kind, [rng.randrange(12) for _ in range(rng.randrange(5))])
    if kind == "dead_letter":
        return (kind, rng.randrange(12))
    return (kind,)


@pytest.mark.parametrize("seed", range(12))
async def test_spool_matches_a_simple_model(tmp_path: Path, seed: int) -> None:
    """Random mixes of appends, deletes, dead letters and reopens agree with a dict model."""
    rng = random.Random(seed)
    await run_against_model(tmp_path, [random_operation(rng) for _ in range(40)])


async def run_against_model(directory: Path, operations: list[tuple[Any, ...]]) -> None:
    max_events, max_bytes = 6, 60
    model: dict[int, tuple[str, bytes, float]] = {}  # seq -> (exchange, body, received_at)
    dead = 0
    spool = await open_spool(directory, max_bytes=max_bytes, max_events=max_events)
    try:
        for operation in operations:
            kind, *args = operation
            known = list(model)
            if kind == "append":
                exchange, body, received_at = args
                event = make_event(body=body, received_at=received_at)
                total = sum(len(b) for _, b, _ in model.values())
                if len(model) + 1 > max_events or total + len(body) > max_bytes:
                    with pytest.raises(SpoolFull):
                        await spool.append(exchange, event)
                else:
                    seq = await spool.append(exchange, event)
                    assert all(seq > old for old in known)
                    model[seq] = (exchange, body, received_at)
            elif kind == "delete":
                seqs = [known[i] for i in args[0] if i < len(known)] + [10_000]
                await spool.delete(seqs)
                for seq in seqs:
                    model.pop(seq, None)
            elif kind == "dead_letter" and args[0] < len(known):
                await spool.dead_letter(known[args[0]], "reason")
                del model[known[args[0]]]
                dead += 1
            elif kind == "reopen":
                await spool.close()
                spool = await open_spool(directory, max_bytes=max_bytes, max_events=max_events)
            await check_against_model(spool, model, dead)
    finally:
        await spool.close()


async def check_against_model(
    spool: SqliteSpool, model: dict[int, tuple[str, bytes, float]], dead: int
) -> None:
    records = await spool.head(100)
    assert all(type(record) is SpooledEvent for record in records)
    assert [(r.seq, r.exchange, r.event.body, r.event.received_at) for r in records] == [
        (seq, *fields) for seq, fields in model.items()
    ]
    for exchange in "abc":
        expected = [seq for seq, (owner, _, _) in model.items() if owner == exchange]
        assert [r.seq for r in await spool.head(100, exchange=exchange)] == expected
    head_received_at = next(iter(model.values()))[2] if model else None
    body_bytes = sum(len(body) for _, body, _ in model.values())
    assert spool.stats() == SpoolStats(len(model), body_bytes, head_received_at, dead)
    assert spool.exchanges_pending() == {exchange for exchange, _, _ in model.values()}


async def test_read_stats_matches_the_owner_while_it_runs(spool: SqliteSpool) -> None:
    """Operator commands read the totals from disk without the writer's lock."""
    for i in range(3):
        await spool.append("x", make_event(f"e-{i}"))
    assert read_stats(spool.directory) == spool.stats()


def test_read_only_access_to_a_missing_spool_is_a_spool_error(tmp_path: Path) -> None:
    """Pointing the operator commands at the wrong directory says so."""
    with pytest.raises(SpoolError, match="no spool"):
        read_stats(tmp_path)


async def test_probe_commits_without_changing_contents(spool: SqliteSpool) -> None:
    """The writability probe is a real commit that leaves records and stats as they were."""
    await spool.append("x", make_event("kept"))
    commits_before = spool._writer.commits
    await spool.probe()
    assert spool._writer.commits == commits_before + 1
    assert [r.event.event_id for r in await spool.head(10)] == ["kept"]
    assert spool.stats().events == 1


async def test_probe_of_a_closed_spool_is_a_spool_error(spool: SqliteSpool) -> None:
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.probe()
