"""The fast publisher's hand-packed frames are byte for byte what pamqp would send."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pamqp import commands, frame
from pamqp.header import ContentHeader

from bridge.events import WebhookEvent
from bridge.fastpublisher import header_payload, publish_method_frame
from bridge.publisher import rfc3339

EVENT = WebhookEvent(
    "klient", "CartOpened", "13200948-cf44-4853-9eee-88eb9284ea23", b'{"a": 1}', 1700000000.25
)


def reference_header(event: WebhookEvent) -> bytes:
    headers = {
        "x-one-tenant": event.tenant,
        "x-one-event-type": event.event_type,
        "x-one-received-at": rfc3339(event.received_at),
    }
    if event.is_example:
        headers["x-one-example"] = True
    properties = commands.Basic.Properties(
        content_type="application/json",
        headers=headers,
        delivery_mode=2,
        message_id=event.event_id,
        timestamp=datetime.fromtimestamp(int(event.received_at), UTC),
        message_type=event.event_type,
        app_id="one-bridge",
    )
    return frame.marshal(ContentHeader(0, len(event.body), properties), 1)


@pytest.mark.parametrize(
    "event",
    [
        EVENT,
        WebhookEvent("t", "OfferOpened", "é" * 100, b"x" * 300_000, 1.0, is_example=True),
        WebhookEvent("a-b.c", "Unknown Type", "e", b"", 1700000000.999),
    ],
)
def test_content_header_matches_pamqp(event):
    """Properties, headers table and body size are encoded exactly as pamqp encodes them."""
    ours = b"\x02\x00\x01" + len(header_payload(event)).to_bytes(4, "big")
    ours += header_payload(event) + b"\xce"
    assert ours == reference_header(event)


def test_publish_method_frame_matches_pamqp():
    """Basic.Publish with mandatory set, on the channel given."""
    expected = frame.marshal(
        commands.Basic.Publish(
            exchange="p-u-o-m-e-c-cartopened-klient", routing_key="CartOpened", mandatory=True
        ),
        3,
    )
    assert publish_method_frame(3, "p-u-o-m-e-c-cartopened-klient", "CartOpened") == expected
