"""systemd's service notification protocol (sd_notify): readiness, stopping, status, watchdog.

A datagram of newline-separated `KEY=VALUE` assignments sent to the AF_UNIX socket named by
NOTIFY_SOCKET: a path, or `@name` for the abstract namespace. Without NOTIFY_SOCKET (not under
systemd's Type=notify, or in a container) every call is a no-op returning False, so callers
need no guard. Sending never raises and never blocks the event loop: a failed notification is
reported by the return value only, because the daemon must run on without its supervisor.

The watchdog pings come from a task on the event loop on purpose: a loop stuck in a blocking
call stops pinging, and systemd (WatchdogSec=) then kills and restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from types import TracebackType

__all__ = [
    "Watchdog",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval_seconds",
]


def _address(value: str) -> str | bytes | None:
    """The socket address NOTIFY_SOCKET names; None when it names none this module speaks to."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + value[1:].encode()
    # Empty, relative, or another transport (systemd 254+ also knows vsock:): not supported.
    return None


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1" or "STATUS=...\\nREADY=1"); True if it was sent.

    False when NOTIFY_SOCKET is unset or unusable, or the datagram could not be sent now.
    """
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    address = _address(value)
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A full receive queue must not stall the event loop: drop this one instead.
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Start-up is complete: the service is serving (Type=notify units become active)."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={_line(status_text)}")


def stopping(status_text: str | None = None) -> bool:
    """Shutdown has begun (systemd shows "deactivating" instead of a failure on a slow stop)."""
    return notify(
        "STOPPING=1" if status_text is None else f"STOPPING=1\nSTATUS={_line(status_text)}"
    )


def watchdog() -> bool:
    """One keep-alive ping for WatchdogSec=."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form one-line status, shown by `systemctl status`."""
    return notify(f"STATUS={_line(text)}")


def _line(text: str) -> str:
    # A newline would start another assignment in the datagram.
    return " ".join(text.splitlines())


def watchdog_interval_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to ping: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when no watchdog is expected from this process: WATCHDOG_USEC unset or not a positive
    integer, or WATCHDOG_PID set to another process (a child inherited the variables).
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        timeout_usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if timeout_usec <= 0:
        return None
    return timeout_usec / 2 / 1_000_000


class Watchdog:
    """Pings WATCHDOG=1 every `interval_seconds` from a task on the running event loop.

    `start()` does nothing when no watchdog is configured (interval None). Use it as
    `async with Watchdog():` or with `start()` and `await stop()`.
    """

    def __init__(
        self,
        interval_seconds: float | None = None,
        *,
        ping: Callable[[], bool] = watchdog,
    ) -> None:
        self.interval_seconds = (
            watchdog_interval_seconds() if interval_seconds is None else interval_seconds
        )
        if self.interval_seconds is not None and self.interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self._ping = ping
        self._task: asyncio.Task[None] | None = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> bool:
        """Begin pinging (the first ping at once); False when no watchdog is configured."""
        if self.interval_seconds is None:
            return False
        if not self.is_running:
            self._task = asyncio.get_running_loop().create_task(
                self._run(self.interval_seconds), name="sdnotify-watchdog"
            )
        return True

    async def stop(self) -> None:
        """Stop pinging; safe to call when not started or already stopped."""
        task, self._task = self._task, None
        if task is None:
            return
        current = asyncio.current_task()
        # Cancellations of the caller requested before stop() (a forced shutdown already
        # handled) are not ours to re-raise; one requested while stop() waits is.
        cancelling_before = current.cancelling() if current is not None else 0
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling() > cancelling_before:
                raise

    async def _run(self, interval_seconds: float) -> None:
        while True:
            self._ping()
            await asyncio.sleep(interval_seconds)

    async def __aenter__(self) -> Watchdog:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
