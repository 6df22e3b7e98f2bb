"""Durable FIFO outbox in SQLite for events the broker did not confirm in time.

Invariants:

- Durable on return: when `append()` returns a seq, the transaction holding the record has
  committed in WAL mode with `synchronous=FULL` (the WAL is fsynced), so the record survives a
  process kill or a power cut on a disk that honours fsync.
- Records leave `events` only through `delete()` (after the broker confirmed them) or
  `dead_letter()` (moved to `dead_letters` in one transaction). Nothing expires or is dropped.
- FIFO by seq: seqs come from AUTOINCREMENT, so they only grow and are never reused, even after
  the spool drained or was reopened; `head()` returns the oldest records first, optionally only
  one exchange's.
- SQLite never runs on the event loop: one writer thread owns the connection. Appends that queue
  while a commit runs share the next transaction (group commit: one fsync for many), and each
  caller resumes only after the commit that holds its record.
- `stats()` and `exchanges_pending()` read in-memory snapshots that are loaded at open and
  replaced after every commit, before any caller of that commit resumes.
- One process per spool directory: an flock on `spool.lock` refuses a second opener.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import structlog

from bridge.errors import SpoolError, SpoolFull
from bridge.events import WebhookEvent

log = structlog.get_logger("bridge.spool")

SPOOL_FILENAME = "spool.sqlite3"
LOCK_FILENAME = "spool.lock"
SCHEMA_VERSION = 1

# Rows per export page and seqs per `IN (...)` list: well under SQLite's variable limit
# (999 before 3.32).
_PAGE_ROWS = 500
# One transaction takes at most this much, so a burst of large bodies cannot build a huge WAL
# or keep the first callers waiting on a giant fsync.
_MAX_BATCH_JOBS = 1024
_MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024
# When the spool drains, hand free pages back to the file system only when there are enough
# to matter (4 MiB at the default page size): the vacuum costs a commit of its own.
_VACUUM_MIN_FREE_PAGES = 1024
# A WAL grown by a burst is truncated back to this after a checkpoint.
_JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# Only an operator's sqlite3 shell can hold a lock we wait for; bound that wait.
_BUSY_TIMEOUT_MS = 5_000

_SCHEMA = (
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        exchange TEXT NOT NULL,
        tenant TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_id TEXT NOT NULL,
        body BLOB NOT NULL,
        received_at REAL NOT NULL,
        spooled_at REAL NOT NULL,
        is_example INTEGER NOT NULL DEFAULT 0
    )
    """,
    # head(exchange=...) and the per-exchange counts at open.
    "CREATE INDEX events_by_exchange ON events (exchange, seq)",
    """
    CREATE TABLE dead_letters (
        seq INTEGER PRIMARY KEY,
        exchange TEXT NOT NULL,
        tenant TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_id TEXT NOT NULL,
        body BLOB NOT NULL,
        received_at REAL NOT NULL,
        spooled_at REAL NOT NULL,
        is_example INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL,
        dead_at REAL NOT NULL
    )
    """,
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_EVENT_COLUMNS = (
    "seq, exchange, tenant, event_type, event_id, body, received_at, spooled_at, is_example"
)
_INSERT_EVENT = (
    "INSERT INTO events"
    " (exchange, tenant, event_type, event_id, body, received_at, spooled_at, is_example)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_MOVE_TO_DEAD_LETTERS = (
    f"INSERT INTO dead_letters ({_EVENT_COLUMNS}, reason, dead_at)"
    f" SELECT {_EVENT_COLUMNS}, ?, ? FROM events WHERE seq = ?"
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """One spooled record: the event as accepted and the exchange it is bound for."""

    seq: int
    exchange: str
    event: WebhookEvent
    spooled_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class DeadLetter(SpooledEvent):
    """A record moved out of the replay queue, with why and when."""

    reason: str
    dead_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class SpoolStats:
    events: int
    body_bytes: int
    # received_at of the head record (lowest seq): the one waiting longest for replay.
    oldest_received_at: float | None
    dead_letters: int


@dataclass(frozen=True, slots=True)
class _Limits:
    max_events: int
    max_bytes: int


@dataclass(slots=True)
class _Ledger:
    """What the tables hold, kept by the writer thread so that stats never need a query."""

    events: int = 0
    body_bytes: int = 0
    oldest_received_at: float | None = None
    dead_letters: int = 0
    per_exchange: Counter[str] = field(default_factory=Counter)
    is_head_stale: bool = False

    def copy(self) -> _Ledger:
        return _Ledger(
            self.events,
            self.body_bytes,
            self.oldest_received_at,
            self.dead_letters,
            self.per_exchange.copy(),
        )

    def check_room(self, body_bytes: int, limits: _Limits) -> None:
        if self.events + 1 > limits.max_events:
            raise SpoolFull(f"spool holds {self.events} events (max_events={limits.max_events})")
        if self.body_bytes + body_bytes > limits.max_bytes:
            raise SpoolFull(
                f"spool holds {self.body_bytes} body bytes, {body_bytes} more would exceed"
                f" max_bytes={limits.max_bytes}"
            )

    def add(self, exchange: str, body_bytes: int, received_at: float) -> None:
        if self.events == 0:
            self.oldest_received_at = received_at
        self.events += 1
        self.body_bytes += body_bytes
        self.per_exchange[exchange] += 1

    def remove(self, exchange: str, body_bytes: int) -> None:
        self.events -= 1
        self.body_bytes -= body_bytes
        self.per_exchange[exchange] -= 1
        if self.per_exchange[exchange] <= 0:
            del self.per_exchange[exchange]
        self.is_head_stale = True


# --- jobs: what the event loop hands to the writer thread ------------------------------------


class _Job(Generic[_T]):
    __slots__ = ("future",)
    action = "operation"  # names the job in error messages

    def __init__(self) -> None:
        self.future: Future[_T] = Future()

    @property
    def body_bytes(self) -> int:
        return 0


class _Write(_Job[_T]):
    """A change to the tables; many run inside one shared transaction."""

    __slots__ = ()

    def apply(self, conn: sqlite3.Connection, ledger: _Ledger, limits: _Limits) -> _T:
        raise NotImplementedError


class _Append(_Write[int]):
    __slots__ = ("event", "exchange")
    action = "append"

    def __init__(self, exchange: str, event: WebhookEvent) -> None:
        super().__init__()
        self.exchange = exchange
        self.event = event

    @property
    def body_bytes(self) -> int:
        return len(self.event.body)

    def apply(self, conn: sqlite3.Connection, ledger: _Ledger, limits: _Limits) -> int:
        event = self.event
        ledger.check_room(len(event.body), limits)
        cursor = conn.execute(
            _INSERT_EVENT,
            (
                self.exchange,
                event.tenant,
                event.event_type,
                event.event_id,
                event.body,
                event.received_at,
                time.time(),
                event.is_example,
            ),
        )
        seq = cursor.lastrowid
        assert seq is not None  # an INSERT into a rowid table always sets it
        ledger.add(self.exchange, len(event.body), event.received_at)
        return seq


class _Delete(_Write[None]):
    __slots__ = ("seqs",)
    action = "delete"

    def __init__(self, seqs: Sequence[int]) -> None:
        super().__init__()
        self.seqs = sorted(set(seqs))

    def apply(self, conn: sqlite3.Connection, ledger: _Ledger, limits: _Limits) -> None:
        for start in range(0, len(self.seqs), _PAGE_ROWS):
            chunk = self.seqs[start : start + _PAGE_ROWS]
            marks = ",".join("?" * len(chunk))
            # Read what leaves before deleting it: the ledger needs each record's size and exchange.
            removed = conn.execute(
                f"SELECT exchange, length(body) FROM events WHERE seq IN ({marks})", chunk
            ).fetchall()
            conn.execute(f"DELETE FROM events WHERE seq IN ({marks})", chunk)
            for exchange, body_bytes in removed:
                ledger.remove(exchange, body_bytes)


class _Probe(_Write[None]):
    """Rewrites the schema version in place: a real write and commit, changing nothing, to learn
    whether the spool takes writes again (disk freed, file size limit lifted)."""

    __slots__ = ()
    action = "probe"

    def apply(self, conn: sqlite3.Connection, ledger: _Ledger, limits: _Limits) -> None:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class _DeadLetter(_Write[None]):
    __slots__ = ("reason", "seq")
    action = "dead_letter"

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__()
        self.seq = seq
        self.reason = reason

    def apply(self, conn: sqlite3.Connection, ledger: _Ledger, limits: _Limits) -> None:
        row = conn.execute(
            "SELECT exchange, length(body) FROM events WHERE seq = ?", (self.seq,)
        ).fetchone()
        if row is None:
            raise KeyError(self.seq)
        conn.execute(_MOVE_TO_DEAD_LETTERS, (self.reason, time.time(), self.seq))
        conn.execute("DELETE FROM events WHERE seq = ?", (self.seq,))
        ledger.remove(row[0], row[1])
        ledger.dead_letters += 1


# A job refused for what it asks, before it changed anything: its batch-mates still commit.
_REJECTIONS = (SpoolFull, KeyError)


class _Call(_Job[_T]):
    """A read (or a test's probe) run on the connection outside any write transaction."""

    __slots__ = ("fn",)
    action = "read"

    def __init__(self, fn: Callable[[sqlite3.Connection], _T]) -> None:
        super().__init__()
        self.fn = fn


class _Close(_Job[None]):
    __slots__ = ()
    action = "close"


# --- the writer thread ------------------------------------------------------------------------


class _Writer:
    """Owns the connection and the thread it lives on; nothing here runs on the event loop."""

    def __init__(self, directory: Path, limits: _Limits) -> None:
        self.directory = directory
        self.opened: Future[None] = Future()
        self.commits = 0  # transactions committed; tests use it to see group commit happen
        self.snapshot = (SpoolStats(0, 0, None, 0), frozenset[str]())
        self.thread = threading.Thread(target=self._main, name="spool-writer", daemon=True)
        self.limits = self._limits = limits
        self._jobs: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._ledger = _Ledger()

    def submit(self, job: _Job[Any]) -> None:
        self._jobs.put(job)

    # Daemon thread: a caller that never closes the spool must not hang interpreter exit;
    # SQLite's journal keeps the file consistent whatever point the thread is stopped at.
    def _main(self) -> None:
        if not self.opened.set_running_or_notify_cancel():
            return
        try:
            self._open()
        except Exception as exc:
            self._release()
            self.opened.set_exception(_translate(exc, "open"))
            return
        self.opened.set_result(None)
        while self._conn is not None:
            batch = self._next_batch()
            try:
                self._serve(batch)
            except Exception:  # task root: a bug here must not strand the awaiting callers
                log.exception("spool.writer_failed")
                for job in batch:
                    _settle(job, SpoolError(f"spool {job.action} failed: internal error"))

    # startup

    def _open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(self.directory)
        path = self.directory / SPOOL_FILENAME
        # Create the file ourselves so bodies are not world-readable; SQLite gives its -wal and
        # -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one commit is one batch.
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            _configure(conn)
            _migrate(conn)
            self._ledger = _load_ledger(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._publish()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    # main loop

    def _next_batch(self) -> list[_Job[Any]]:
        batch = [self._jobs.get()]
        body_bytes = batch[0].body_bytes
        # Everything that queued while the previous commit ran joins this one: the group commit.
        while len(batch) < _MAX_BATCH_JOBS and body_bytes < _MAX_BATCH_BODY_BYTES:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            batch.append(job)
            body_bytes += job.body_bytes
        return batch

    def _serve(self, batch: list[_Job[Any]]) -> None:
        # Jobs run in submission order; each run of consecutive writes shares one transaction.
        writes: list[_Write[Any]] = []
        for job in batch:
            if isinstance(job, _Write):
                writes.append(job)
                continue
            self._commit(writes)
            writes = []
            if isinstance(job, _Close):
                self._close(job)
            elif isinstance(job, _Call):
                self._call(job)
        self._commit(writes)

    def _commit(self, jobs: list[_Write[Any]]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if live:
            self._commit_live(live, may_split=True)

    def _commit_live(self, jobs: list[_Write[Any]], *, may_split: bool) -> None:
        conn = self._conn
        if conn is None:
            for job in jobs:
                job.future.set_exception(SpoolError(f"spool {job.action} failed: spool is closed"))
            return
        ledger = self._ledger.copy()
        try:
            outcomes = self._transact(conn, ledger, jobs)
        except Exception as exc:
            _rollback(conn)
            if may_split and len(jobs) > 1:
                # Retry one by one so that only the jobs that really fail see an error.
                for job in jobs:
                    self._commit_live([job], may_split=False)
            else:
                for job in jobs:
                    job.future.set_exception(_translate(exc, job.action))
            return
        self._ledger = ledger
        self._publish()  # before any caller resumes, so stats already include its record
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        if ledger.events == 0:
            self._vacuum(conn)

    def _transact(
        self, conn: sqlite3.Connection, ledger: _Ledger, jobs: list[_Write[Any]]
    ) -> list[object]:
        outcomes: list[object] = []
        conn.execute("BEGIN IMMEDIATE")
        for job in jobs:
            try:
                outcomes.append(job.apply(conn, ledger, self._limits))
            except _REJECTIONS as exc:
                outcomes.append(exc)
        if ledger.is_head_stale:
            ledger.oldest_received_at = _head_received_at(conn)
            ledger.is_head_stale = False
        conn.execute("COMMIT")
        self.commits += 1
        return outcomes

    def _call(self, job: _Call[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        if self._conn is None:
            job.future.set_exception(SpoolError("spool read failed: spool is closed"))
            return
        try:
            result = job.fn(self._conn)
        except Exception as exc:
            job.future.set_exception(_translate(exc, job.action))
        else:
            job.future.set_result(result)

    def _vacuum(self, conn: sqlite3.Connection) -> None:
        try:
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free_pages >= _VACUUM_MIN_FREE_PAGES:
                # executescript steps the pragma to the end; execute() would free a single page.
                conn.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:  # the delete is committed; the space comes back next time
            _rollback(conn)
            log.warning("spool.vacuum_failed", error=_describe(exc))

    def _publish(self) -> None:
        ledger = self._ledger
        stats = SpoolStats(
            ledger.events, ledger.body_bytes, ledger.oldest_received_at, ledger.dead_letters
        )
        exchanges = self.snapshot[1]
        if exchanges != ledger.per_exchange.keys():
            exchanges = frozenset(ledger.per_exchange)
        # One reference assignment: the event loop sees the old pair or the new one, never a mix.
        self.snapshot = (stats, exchanges)

    # shutdown

    def _close(self, job: _Close) -> None:
        job.future.set_running_or_notify_cancel()
        conn, self._conn = self._conn, None
        error: Exception | None = None
        if conn is not None:
            try:
                # Fold the WAL into the database file: the directory is left with one file.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:  # the WAL is durable; the next open replays it
                log.warning("spool.checkpoint_failed", error=_describe(exc))
            try:
                conn.close()
            except sqlite3.Error as exc:
                error = _translate(exc, "close")
        # Unlock before the caller resumes, so it may reopen the directory at once.
        self._release()
        if error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(error)


# --- the event-loop side ----------------------------------------------------------------------


class SqliteSpool:
    """The spool's async face; every SQLite call runs on its writer thread."""

    def __init__(self, writer: _Writer) -> None:
        """Use `await SqliteSpool.open(...)`."""
        self._writer = writer
        self._appending: Counter[str] = Counter()
        self._close_job: _Close | None = None

    @classmethod
    async def open(cls, directory: Path, *, max_bytes: int, max_events: int) -> SqliteSpool:
        """Create or reopen the spool in `directory`; SpoolError if it cannot be used."""
        if max_bytes < 1 or max_events < 1:
            raise ValueError("max_bytes and max_events must be positive")
        writer = _Writer(Path(directory), _Limits(max_events=max_events, max_bytes=max_bytes))
        writer.thread.start()
        try:
            await asyncio.wrap_future(writer.opened)
        except asyncio.CancelledError:
            # The thread may still finish opening: queue a close behind it.
            writer.submit(_Close())
            raise
        except Exception:
            writer.thread.join()  # it has set the error and is returning
            raise
        spool = cls(writer)
        stats = spool.stats()
        log.info(
            "spool.opened",
            path=str(writer.directory),
            events=stats.events,
            body_bytes=stats.body_bytes,
            dead_letters=stats.dead_letters,
            oldest_received_at=stats.oldest_received_at,
        )
        return spool

    @property
    def directory(self) -> Path:
        return self._writer.directory

    async def append(self, exchange: str, event: WebhookEvent) -> int:
        """Store the event; returns its seq once committed. SpoolFull / SpoolError otherwise."""
        # Pending from the call, not the commit: an event for this exchange that arrives while
        # this one is being written must also queue behind it.
        self._appending[exchange] += 1
        try:
            return await self._submit(_Append(exchange, event))
        finally:
            self._appending[exchange] -= 1
            if not self._appending[exchange]:
                del self._appending[exchange]

    async def head(self, limit: int, *, exchange: str | None = None) -> list[SpooledEvent]:
        """Up to `limit` of the oldest records (of one exchange if given), in seq order."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        committed = self._writer.snapshot[1]
        if limit == 0 or not committed or (exchange is not None and exchange not in committed):
            return []  # nothing there: spare the replayer's idle polls a thread round trip
        if exchange is None:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq LIMIT ?"
            params: tuple[object, ...] = (limit,)
        else:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE exchange = ? ORDER BY seq LIMIT ?"
            params = (exchange, limit)
        return await self._call(partial(_read_events, sql=sql, params=params))

    async def delete(self, seqs: Sequence[int]) -> None:
        """Remove records the broker confirmed; seqs no longer present are ignored."""
        if seqs:
            await self._submit(_Delete(seqs))

    async def probe(self) -> None:
        """Commit a write that changes nothing; SpoolError while the spool cannot be written."""
        await self._submit(_Probe())

    async def dead_letter(self, seq: int, reason: str) -> None:
        """Move one record to dead_letters with `reason`; KeyError if no such record."""
        await self._submit(_DeadLetter(seq, reason))

    def stats(self) -> SpoolStats:
        """Committed totals, from memory."""
        return self._writer.snapshot[0]

    def is_full(self) -> bool:
        """At either bound: the next append would be refused (a tiny body may still fit)."""
        stats, limits = self.stats(), self._writer.limits
        return stats.events >= limits.max_events or stats.body_bytes >= limits.max_bytes

    def exchanges_pending(self) -> frozenset[str]:
        """Exchanges with records in the spool or an append under way, from memory."""
        committed = self._writer.snapshot[1]
        if not self._appending:
            return committed
        return committed.union(self._appending)

    async def close(self) -> None:
        """Finish queued work, checkpoint the WAL, close the file and stop the thread."""
        is_first = self._close_job is None
        if self._close_job is None:
            self._close_job = _Close()
            self._writer.submit(self._close_job)
        # Shielded: cancelling the caller must not cancel the queued close (the file is closed
        # either way, and the writer would then find the job cancelled under it).
        await asyncio.shield(asyncio.wrap_future(self._close_job.future))
        self._writer.thread.join()  # the close was its last job; it is returning now
        if is_first:
            stats = self.stats()
            log.info("spool.closed", events=stats.events, dead_letters=stats.dead_letters)

    async def __aenter__(self) -> SqliteSpool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `fn(connection)` on the writer thread, after everything queued before it."""
        return await self._submit(_Call(fn))

    async def _submit(self, job: _Job[_T]) -> _T:
        if self._close_job is not None:
            raise SpoolError(f"spool {job.action} failed: spool is closed")
        self._writer.submit(job)
        return await asyncio.wrap_future(job.future)


# --- helpers (writer thread) ------------------------------------------------------------------


def _lock_directory(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(f"spool directory {directory} is in use by another process") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _configure(conn: sqlite3.Connection) -> None:
    # auto_vacuum only takes effect before the first table exists, so it comes first.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise SpoolError(f"spool needs WAL mode, the file system gave {mode!r}")
    # FULL fsyncs the WAL on every commit: the durability append() promises.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES}")
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool schema version {version} is newer than this bridge knows"
            f" ({SCHEMA_VERSION}); refusing to touch it"
        )
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _load_ledger(conn: sqlite3.Connection) -> _Ledger:
    events, body_bytes = conn.execute(
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM events"
    ).fetchone()
    per_exchange = Counter(
        dict(conn.execute("SELECT exchange, count(*) FROM events GROUP BY exchange").fetchall())
    )
    (dead_letters,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    return _Ledger(events, body_bytes, _head_received_at(conn), dead_letters, per_exchange)


def _head_received_at(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT received_at FROM events ORDER BY seq LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def _read_events(
    conn: sqlite3.Connection, sql: str, params: tuple[object, ...]
) -> list[SpooledEvent]:
    return [_record(row) for row in conn.execute(sql, params)]


def _record(row: tuple[Any, ...]) -> SpooledEvent:
    (
        seq,
        exchange,
        tenant,
        event_type,
        event_id,
        body,
        received_at,
        spooled_at,
        is_example,
        *dead,
    ) = row
    event = WebhookEvent(
        tenant, event_type, event_id, body, received_at, is_example=bool(is_example)
    )
    if dead:
        reason, dead_at = dead
        return DeadLetter(seq, exchange, event, spooled_at, reason, dead_at)
    return SpooledEvent(seq, exchange, event, spooled_at)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("spool.rollback_failed", error=_describe(exc))


def _translate(exc: Exception, action: str) -> Exception:
    """SpoolError for storage failures; anything else is a bug and passes unchanged."""
    if isinstance(exc, SpoolError) or not isinstance(exc, sqlite3.Error | OSError):
        return exc
    error = SpoolError(f"spool {action} failed: {_describe(exc)}")
    error.__cause__ = exc
    return error


def _describe(exc: BaseException) -> str:
    # SQLite's messages never quote bound values, so no body can leak through them.
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name}: {exc}" if name else f"{type(exc).__name__}: {exc}"


def _settle(job: _Job[Any], exc: BaseException) -> None:
    """Fail a job unless it already finished or its caller cancelled it."""
    with contextlib.suppress(InvalidStateError):
        job.future.set_exception(exc)


# --- read-only access (operator commands; safe while a bridge owns the spool) ----------------


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[sqlite3.Connection]:
    path = Path(directory) / SPOOL_FILENAME
    if not path.is_file():
        raise SpoolError(f"no spool at {path}")
    try:
        # WAL lets a reader see the last committed state while the writer goes on.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise _translate(exc, "open") from None
    try:
        yield conn
    except sqlite3.Error as exc:
        raise _translate(exc, "read") from None
    finally:
        conn.close()


def read_stats(directory: Path) -> SpoolStats:
    """The spool's totals, read from disk without taking the writer's lock."""
    with _read_only(directory) as conn:
        ledger = _load_ledger(conn)
    return SpoolStats(
        ledger.events, ledger.body_bytes, ledger.oldest_received_at, ledger.dead_letters
    )


def read_records(directory: Path, *, dead_letters: bool = False) -> Iterator[SpooledEvent]:
    """Every record (or dead letter) in seq order, read page by page without the lock."""
    table = "dead_letters" if dead_letters else "events"
    extra = ", reason, dead_at" if dead_letters else ""
    sql = f"SELECT {_EVENT_COLUMNS}{extra} FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?"
    after_seq = 0
    with _read_only(directory) as conn:
        while True:
            page = _read_events(conn, sql, (after_seq, _PAGE_ROWS))
            yield from page
            if len(page) < _PAGE_ROWS:
                return
            after_seq = page[-1].seq
