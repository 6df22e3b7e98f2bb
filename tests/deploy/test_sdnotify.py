"""bridge.sdnotify against a real NOTIFY_SOCKET datagram socket made by the test."""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import pytest

from bridge import sdnotify


@pytest.fixture(autouse=True)
def _no_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests running under systemd must not talk to the real manager."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def test_notify_without_socket_is_a_no_op():
    """No NOTIFY_SOCKET: nothing is sent, False, no error."""
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False
    assert sdnotify.watchdog() is False
    assert sdnotify.status("starting") is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_the_state_as_one_datagram(notify_socket, monkeypatch, abstract):
    """A filesystem path and an '@' abstract-namespace name both reach the socket."""
    manager = notify_socket(abstract=abstract)
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    assert sdnotify.notify("READY=1\nSTATUS=up") is True
    assert manager.receive() == "READY=1\nSTATUS=up"


def test_helpers_send_their_assignments(notify_socket, monkeypatch):
    """ready, stopping, watchdog and status each send what sd_notify(3) names."""
    manager = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    assert sdnotify.ready()
    assert manager.receive() == "READY=1"
    assert sdnotify.ready("listening on 8080")
    assert manager.receive() == "READY=1\nSTATUS=listening on 8080"
    assert sdnotify.watchdog()
    assert manager.receive() == "WATCHDOG=1"
    assert sdnotify.stopping()
    assert manager.receive() == "STOPPING=1"
    assert sdnotify.stopping("draining")
    assert manager.receive() == "STOPPING=1\nSTATUS=draining"


def test_status_text_stays_one_assignment(notify_socket, monkeypatch):
    """A newline in the status text cannot smuggle in another assignment (READY=1)."""
    manager = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    assert sdnotify.status("spooling\nREADY=1")
    assert manager.receive() == "STATUS=spooling READY=1"


def test_notify_takes_an_explicit_environment(notify_socket):
    """The environment can be passed in, which leaves os.environ alone."""
    manager = notify_socket(abstract=True)
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": manager.address})
    assert manager.receive() == "READY=1"


@pytest.mark.parametrize(
    "value", ["", "relative/notify.sock", "@", "vsock:2:1234", "/nonexistent/dir/notify.sock"]
)
def test_unusable_socket_returns_false_without_raising(monkeypatch, value):
    """Empty, relative, unsupported transports and missing sockets give False, never raise."""
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_send_to_a_closed_socket_returns_false(notify_socket, monkeypatch):
    """The manager went away (its socket is closed): False, the daemon carries on."""
    manager = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    manager.sock.close()
    assert sdnotify.notify("WATCHDOG=1") is False


def test_a_full_receive_queue_does_not_block(notify_socket, monkeypatch):
    """A manager that reads nothing cannot stall the event loop: sends fail fast instead."""
    manager = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    started = time.monotonic()
    results = [sdnotify.notify("WATCHDOG=1") for _ in range(2000)]
    assert time.monotonic() - started < 5
    assert results[0] is True
    assert False in results  # the queue filled up (net.unix.max_dgram_qlen is far below 2000)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""}, 0.1),
    ],
)
def test_watchdog_interval_is_half_the_timeout(environ, expected):
    """Half of WATCHDOG_USEC, in seconds; None when unset, invalid or for another process."""
    assert sdnotify.watchdog_interval_seconds(environ) == expected


def test_watchdog_interval_for_this_process(monkeypatch):
    """WATCHDOG_PID naming this process keeps the watchdog; read from os.environ by default."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_seconds() == 0.1


async def test_watchdog_pings_periodically_until_stopped(notify_socket, monkeypatch):
    """start() pings at once and then every interval; stop() ends the task."""
    manager = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.setenv("WATCHDOG_USEC", "40000")
    loop = asyncio.get_running_loop()
    dog = sdnotify.Watchdog()
    assert dog.interval_seconds == 0.02
    assert dog.start() is True
    assert dog.is_running
    stamps = []
    for _ in range(4):
        message = await loop.run_in_executor(None, manager.receive)
        assert message == "WATCHDOG=1"
        stamps.append(time.monotonic())
    await dog.stop()
    assert not dog.is_running
    await dog.stop()  # idempotent
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert all(gap < 2.0 for gap in gaps), gaps


async def test_watchdog_without_configuration_does_nothing():
    """No WATCHDOG_USEC: start() returns False and no task runs."""
    dog = sdnotify.Watchdog()
    assert dog.interval_seconds is None
    assert dog.start() is False
    assert not dog.is_running
    await dog.stop()


async def test_watchdog_is_an_async_context_manager():
    """`async with Watchdog(...)` pings inside the block and stops after it."""
    pinged = asyncio.Event()

    def ping() -> bool:
        pinged.set()
        return True

    async with sdnotify.Watchdog(0.01, ping=ping) as dog:
        await asyncio.wait_for(pinged.wait(), 5)
        assert dog.is_running
    assert not dog.is_running


async def test_a_blocked_event_loop_stops_the_pings():
    """The pings come from the loop: while it is blocked none is sent, which is what lets
    systemd's watchdog catch a stuck daemon."""
    stamps: list[float] = []
    enough = asyncio.Event()

    def ping() -> bool:
        stamps.append(time.monotonic())
        if len(stamps) >= 3:
            enough.set()
        return True

    async with sdnotify.Watchdog(0.01, ping=ping):
        await asyncio.sleep(0)  # let the first ping go out
        time.sleep(0.3)  # noqa: ASYNC251 - the point: a handler that blocks the loop
        await asyncio.wait_for(enough.wait(), 5)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert max(gaps) >= 0.3


async def test_stop_propagates_its_own_cancellation():
    """Cancelling a task that is inside stop() still cancels it."""
    dog = sdnotify.Watchdog(0.01, ping=lambda: True)
    dog.start()
    stopper = asyncio.get_running_loop().create_task(dog.stop())
    await asyncio.sleep(0)  # stopper is now awaiting the ping task
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper


def test_watchdog_rejects_a_non_positive_interval():
    """A zero interval would spin the loop."""
    with pytest.raises(ValueError, match="positive"):
        sdnotify.Watchdog(0)


async def test_stop_after_a_handled_cancellation_completes():
    """A caller that caught its own cancellation (a forced stop) can still stop the watchdog."""
    dog = sdnotify.Watchdog(0.01, ping=lambda: True)
    blocker = asyncio.Event()

    async def serve() -> str:
        dog.start()
        try:
            await blocker.wait()
        except asyncio.CancelledError:
            return "cancelled"
        finally:
            await dog.stop()
        return "stopped"

    task = asyncio.get_running_loop().create_task(serve())
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "cancelled"
    assert not dog.is_running
