"""The private RabbitMQ node starts on free ports, answers AMQP and leaves nothing behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bridge.devbroker import AMQP_PROTOCOL_HEADER, LocalBroker

pytestmark = pytest.mark.integration


def amqp_greeting(port: int) -> bytes:
    """The first frame header a server sends after our protocol header (Connection.Start)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(AMQP_PROTOCOL_HEADER)
        # type (1 byte), channel (2), payload size (4); recv may return fewer bytes at once.
        header = b""
        while len(header) < 7 and (chunk := sock.recv(7 - len(header))):
            header += chunk
        return header


def test_local_broker_answers_amqp_and_leaves_no_process_after_stop(tmp_path: Path) -> None:
    """A started node greets with Connection.Start on channel 0; stop() ends all its processes."""
    broker = LocalBroker(tmp_path, port=0)
    try:
        broker.start()
        assert broker.port and broker.url == f"amqp://guest:guest@127.0.0.1:{broker.port}/"
        assert len({broker.port, broker.dist_port, broker.epmd_port}) == 3
        assert broker.pids(), "the node's processes carry its marker"

        greeting = amqp_greeting(broker.port)

        assert greeting[:3] == b"\x01\x00\x00"  # a method frame on channel 0
    finally:
        broker.stop()

    assert broker.pids() == []
    assert not broker.is_answering()
    assert not broker.node_dir.exists()


def test_stop_app_closes_amqp_until_start_app(rabbitmq: object) -> None:
    """ctl() reaches the shared node; stop_app() closes AMQP and start_app() brings it back."""
    if not isinstance(rabbitmq, LocalBroker):
        pytest.skip("BRIDGE_TEST_AMQP_URL is set: this test drives the harness's own node")
    assert rabbitmq.ctl("eval", "node().").strip() == f"'{rabbitmq.node_name}'"  # an atom

    rabbitmq.stop_app()
    try:
        assert not rabbitmq.is_answering()
    finally:
        rabbitmq.start_app()

    assert amqp_greeting(rabbitmq.port)[:1] == b"\x01"
