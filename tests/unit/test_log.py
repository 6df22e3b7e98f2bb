"""Log set-up: JSON lines, stdlib loggers routed through the same processors, redaction."""

from __future__ import annotations

import asyncio
import io
import logging

import orjson
import pytest
import structlog

from bridge import log

SECRET = "planted-secret-value-42"


@pytest.fixture
def stream():
    buffer = io.StringIO()
    log.configure("debug", "json", buffer, secrets=[SECRET])
    yield buffer
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_lines_are_json_with_level_and_utc_time(stream):
    """One JSON object per line: event name, fields, level, ISO UTC timestamp."""
    structlog.get_logger("t").info("webhook.handled", event_type="CartOpened", status=200)
    [line] = lines(stream)
    assert line["event"] == "webhook.handled" and line["status"] == 200
    assert line["level"] == "info" and str(line["timestamp"]).endswith("Z")


def test_secret_named_fields_are_masked(stream):
    """password, authorization, api_key ... are masked whatever their value."""
    structlog.get_logger("t").warning("x", password="p", authorization="Basic abc", api_key="k")
    [line] = lines(stream)
    assert (line["password"], line["authorization"], line["api_key"]) == ("***",) * 3


def test_known_secret_values_are_masked_in_any_field(stream):
    """A configured secret is masked even inside an unrelated field's free text."""
    structlog.get_logger("t").error("x", detail=f"login failed for {SECRET}", other=SECRET)
    text = stream.getvalue()
    assert SECRET not in text
    assert text.count("***") == 2


def test_stdlib_tracebacks_are_routed_and_redacted(stream):
    """aiormq-style stdlib logging with a URL password in the exception is redacted."""
    try:
        raise ConnectionError("connect to amqp://guest:hunter2@broker:5672/ failed")
    except ConnectionError:
        logging.getLogger("aiormq.connection").critical("lost", exc_info=True)
    [line] = lines(stream)
    assert line["logger"] == "aiormq.connection"
    assert "hunter2" not in stream.getvalue()
    assert "amqp://guest:***@broker" in str(line["exception"])


def test_library_loggers_are_quieter_than_ours(stream):
    """aiohttp, aio-pika and aiormq say warnings and errors only, even at debug."""
    logging.getLogger("aio_pika").info("chatty")
    structlog.get_logger("t").debug("ours")
    assert [line["event"] for line in lines(stream)] == ["ours"]


def test_console_format_is_not_json():
    """Console rendering for people (a TTY or by config)."""
    buffer = io.StringIO()
    log.configure("info", "console", buffer)
    try:
        structlog.get_logger("t").info("bridge.started", receiver_port=8080)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert "bridge.started" in buffer.getvalue()
    assert not buffer.getvalue().lstrip().startswith("{")


def test_console_escapes_terminal_control_sequences():
    """An eventId carrying ESC sequences cannot repaint an operator's terminal."""
    buffer = io.StringIO()
    log.configure("info", "console", buffer)
    try:
        structlog.get_logger("t").info("webhook.handled", event_id="inj\x1b[2J\x1b[31mRED")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert "\x1b" not in buffer.getvalue()
    assert "\\x1b[2J" in buffer.getvalue()


class CountingStream(io.StringIO):
    """Counts the writes that reach it: one per line or one per loop turn."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_of_one_loop_turn_go_out_in_one_write_in_order():
    """With write_per_loop_turn, a turn's lines (structlog and stdlib alike) are one write,
    made on the next turn, in the order they were logged."""
    out = CountingStream()
    log.configure("info", "json", out, write_per_loop_turn=True)
    try:
        structlog.get_logger("t").info("first")
        logging.getLogger("aiohttp.server").warning("second")
        structlog.get_logger("t").info("third")
        assert out.getvalue() == ""
        # The writer flushes with call_soon; a callback scheduled after it runs after it.
        next_turn = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(next_turn.set_result, None)
        await next_turn
        assert [line["event"] for line in lines(out)] == ["first", "second", "third"]
        assert out.writes == 1
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()


def test_lines_logged_without_a_running_loop_are_written_at_once():
    """Outside the event loop (start-up, other threads) nothing waits for a turn."""
    out = CountingStream()
    log.configure("info", "json", out, write_per_loop_turn=True)
    try:
        structlog.get_logger("t").info("before the loop")
        assert [line["event"] for line in lines(out)] == ["before the loop"]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()


def test_long_request_text_is_cut_after_masking_so_no_secret_is_split(stream):
    """A tenant or type from a request is cut to 64 characters, but only once secrets are
    masked: a secret straddling the cut leaves no part of itself behind."""
    padding = "x" * (64 - len(SECRET) // 2)
    structlog.get_logger("t").warning(
        "webhook.rejected", tenant=padding + SECRET, event_type="T" * 100
    )
    [line] = lines(stream)
    assert SECRET[: len(SECRET) // 2] not in str(line["tenant"])
    assert str(line["tenant"]).startswith(padding + "***")
    assert line["event_type"] == "T" * 64 + "..."
