"""Parsing callbacks and routing them to exchanges."""

from pathlib import Path

import pytest

from bridge.errors import InvalidBody
from bridge.events import MAX_NESTING_DEPTH, RoutingTable, documented_exchanges, parse_event

CASES = Path(__file__).parent.parent / "cases"


def test_documented_example_parses_and_keeps_its_bytes():
    """The documented example yields its type and eventId; the body is kept as received."""
    body = (CASES / "documented-example-cartopened.body.json").read_bytes()
    event = parse_event(body, tenant="klient", received_at=1.0)
    assert (event.event_type, event.event_id) == (
        "CartOpened",
        "13200948-cf44-4853-9eee-88eb9284ea23",
    )
    assert event.body is body


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'"x"', "not a JSON object"),
        (b'{"eventId": "e"}', "'type' is missing"),
        (b'{"type": "CartOpened"}', "'eventId' is missing"),
        (b'{"type": 1, "eventId": "e"}', "'type' is not a string"),
        (b'{"type": "CartOpened", "eventId": null}', "'eventId' is missing"),
        (b'{"type": "CartOpened", "eventId": ["e"]}', "'eventId' is not a string"),
        (b'{"type": "", "eventId": "e"}', "'type' is empty"),
        (b'{"type": "CartOpened", "eventId": "' + b"e" * 256 + b'"}', "longer than 255"),
        (b'{"type": "CartOpened", "eventId": "' + "é".encode() * 128 + b'"}', "longer than 255"),
        (b'{"type": "CartOpened", "eventId": "\\ud800"}', "JSON|UTF-8"),
    ],
)
def test_invalid_bodies_are_rejected_with_a_reason(body, detail):
    """Each malformed body raises InvalidBody naming what is wrong."""
    with pytest.raises(InvalidBody, match=detail):
        parse_event(body, tenant="klient", received_at=1.0)


def test_255_byte_ids_are_accepted():
    """The AMQP short-string limit is inclusive."""
    body = b'{"type": "CartOpened", "eventId": "' + b"e" * 255 + b'"}'
    assert len(parse_event(body, tenant="t", received_at=1.0).event_id) == 255


def test_documented_table_ends_in_the_tenant_key():
    """Without other information the documented exchangeName table applies."""
    assert documented_exchanges("klient") == {
        "CartOpened": "p-u-o-m-e-c-cartopened-klient",
        "ClientLogged": "p-u-o-m-e-c-clientlogged-klient",
        "OfferOpened": "p-u-o-m-e-o-offeropened-klient",
    }


def test_config_beats_platform_beats_documented_table():
    """Precedence: explicit config entry, then the platform's /types, then the documentation."""
    routes = RoutingTable({"klient": {"CartOpened": "from-config"}})
    routes.set_platform_exchanges(
        "klient", {"CartOpened": "from-platform", "ClientLogged": "platform-logged", "New": "n-x"}
    )
    assert routes.exchange_for("klient", "CartOpened") == "from-config"
    assert routes.exchange_for("klient", "ClientLogged") == "platform-logged"
    assert routes.exchange_for("klient", "OfferOpened") == "p-u-o-m-e-o-offeropened-klient"
    assert routes.exchange_for("klient", "New") == "n-x"


def test_unknown_type_has_no_exchange():
    """A type the tenant does not know is not guessed."""
    assert RoutingTable({}).exchange_for("klient", "SomethingNew") is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "Evil", "eventId": "e", "type": "CartOpened"}',
        b'{"type": "CartOpened", "eventId": "a", "eventId": "b"}',
        b'{"type": "CartOpened", "eventId": "a", "\\u0065ventId": "b"}',
    ],
)
def test_repeated_type_or_event_id_is_refused(body):
    """Parsers disagree on repeated keys (first or last wins): refuse rather than guess."""
    with pytest.raises(InvalidBody, match="more than once"):
        parse_event(body, tenant="t", received_at=1.0)


def test_repeated_keys_inside_nested_objects_are_fine():
    """Only the top level decides type and eventId."""
    body = b'{"type": "CartOpened", "eventId": "e", "a": {"type": 1}, "b": {"type": 2}}'
    assert parse_event(body, tenant="t", received_at=1.0).event_id == "e"


def nested(depth: int, extra: bytes = b"") -> bytes:
    """A callback whose field y nests `depth` levels of arrays (the body itself is one more)."""
    inner = b"[" * depth + b"]" * depth
    return b'{"type": "CartOpened", "eventId": "e", ' + extra + b'"y": ' + inner + b"}"


@pytest.mark.parametrize("extra", [b"", b'"x": "\\u0041", ', b'"s": "[[[{{{", '])
def test_nesting_up_to_the_limit_is_accepted(extra):
    """256 levels, counted outside strings, with or without the repeated-key check's parser."""
    body = nested(MAX_NESTING_DEPTH - 1, extra)
    assert parse_event(body, tenant="t", received_at=1.0).event_id == "e"


@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH, 990, 5000])
@pytest.mark.parametrize("extra", [b"", b'"x": "\\u0041", '])
def test_deeper_nesting_is_invalid_input_never_a_crash(depth, extra):
    """Past the limit: InvalidBody (400), before any parser could recurse that deep (orjson
    refuses past 1024 levels by itself)."""
    with pytest.raises(InvalidBody, match=r"nests deeper|not valid JSON"):
        parse_event(nested(depth, extra), tenant="t", received_at=1.0)


def test_unicode_escapes_elsewhere_are_fine():
    """An escaped character in another field does not trip the repeated-key check."""
    body = b'{"type": "CartOpened", "eventId": "e", "name": "\\u017c\\u00f3\\u0142w"}'
    assert parse_event(body, tenant="t", received_at=1.0).event_type == "CartOpened"


@pytest.mark.parametrize(
    ("body", "is_example"),
    [
        (b'{"type":"CartOpened","eventId":"e1","tenantKey":"example"}', True),
        (b'{"type":"CartOpened","eventId":"e1","tenantKey":"\\u0065xample"}', True),
        (
            b'{"type":"CartOpened","eventId":"e1","cartId":"x:00000000-0000-0000-0000-000000000000"}',
            True,
        ),
        (b'{"type":"CartOpened","eventId":"e1","tenantKey":"klient","cartId":"x:1"}', False),
    ],
)
def test_example_callbacks_are_told_apart_however_their_text_is_spelt(body, is_example):
    """The byte pre-check never hides an example, escaped characters included."""
    assert parse_event(body, tenant="t", received_at=0).is_example is is_example
