"""The bridge speaks sd_notify as systemd's Type=notify and WatchdogSec= expect.

Runs `python -m bridge run` with NOTIFY_SOCKET pointing at a datagram socket the test owns,
as systemd would, with a broker URL on a closed port (the bridge starts without a broker and is
ready through its spool).
"""

from __future__ import annotations

import signal
import socket
import sys
import time

import pytest

pytestmark = pytest.mark.system

BRIDGE = [sys.executable, "-m", "bridge", "run"]


def _await(manager, assignment, bridge, timeout=30.0):
    try:
        return manager.wait_for(assignment, timeout)
    except TimeoutError as exc:
        bridge.process.poll()
        pytest.fail(
            f"{exc} (exit code {bridge.process.returncode}); log:\n{bridge.log_text()[-3000:]}"
        )


def test_bridge_notifies_ready_once_listening_and_stopping_on_sigterm(
    notify_socket, start_bridge, bridge_env
):
    """READY=1 comes only once the receiver accepts connections; SIGTERM sends STOPPING=1 and
    the bridge exits 0."""
    env, receiver_port, ops_port = bridge_env
    manager = notify_socket()
    bridge = start_bridge(
        BRIDGE, {**env, "NOTIFY_SOCKET": manager.address}, ops_url=f"http://127.0.0.1:{ops_port}"
    )

    before_ready = _await(manager, "READY=1", bridge)
    # Right now, with no delay: a READY=1 sent before the listener opened would fail here.
    with socket.create_connection(("127.0.0.1", receiver_port), timeout=5):
        pass
    assert not any("STOPPING=1" in message for message in before_ready)

    bridge.process.send_signal(signal.SIGTERM)
    after_ready = _await(manager, "STOPPING=1", bridge)
    assert not any("READY=1" in message.split("\n") for message in after_ready)
    assert bridge.process.wait(30) == 0, bridge.log_text()


def test_bridge_pings_the_watchdog_from_its_event_loop(notify_socket, start_bridge, bridge_env):
    """With WATCHDOG_USEC=200000 (and WATCHDOG_PID of the bridge, as systemd sets it), WATCHDOG=1
    arrives every 100 ms or so while the bridge runs; the abstract-namespace socket works."""
    env, _, ops_port = bridge_env
    manager = notify_socket(abstract=True)
    # systemd sets WATCHDOG_PID to the main process: `exec` keeps the shell's pid.
    argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"', *BRIDGE]
    bridge = start_bridge(
        argv,
        {**env, "NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "200000"},
        ops_url=f"http://127.0.0.1:{ops_port}",
    )

    _await(manager, "READY=1", bridge)
    stamps = []
    for _ in range(10):
        # Each within 5 s of the one before: the loop keeps pinging.
        _await(manager, "WATCHDOG=1", bridge, timeout=5.0)
        stamps.append(time.monotonic())
    # Nine intervals of 100 ms are 0.9 s at the sender; arrival times here jitter with
    # scheduling, so only a flood (far more often than WATCHDOG_USEC/2) fails this.
    assert stamps[-1] - stamps[0] >= 0.5, stamps

    assert bridge.terminate() == 0, bridge.log_text()
