"""structlog set-up: JSON lines (or console on a TTY), stdlib loggers routed the same, redaction."""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from bridge.redact import MASK, is_secret_key, redact_text

_MIN_SECRET_CHARS = 4
# Free-text fields that may carry library messages with credentials inside.
_TEXT_FIELDS = ("exception", "error", "detail")
# Free text from requests (the path's tenant, the body's type) is cut to this length: after
# masking, so that a cut never splits a secret the mask would have caught.
_CUT_FIELDS = ("tenant", "event_type")
_CUT_CHARS = 64
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class Redactor:
    """structlog processor: mask secret-named fields, credentials inside free text (tracebacks
    included), and every known secret value wherever it appears."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Very short values would mask ordinary words; config validation keeps real ones longer.
        known = sorted({s for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, known))) if known else None
        # Field names come from our code, a few dozen at most: decide each once.
        self._is_secret_key: dict[str, bool] = {}

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        from_stdlib = event_dict.pop("_from_stdlib", False)
        text_keys = []
        for key, value in event_dict.items():
            is_secret = self._is_secret_key.get(key)
            if is_secret is None:
                is_secret = self._is_secret_key[key] = is_secret_key(key)
            if is_secret:
                event_dict[key] = MASK
            elif isinstance(value, str):
                if key in _TEXT_FIELDS or (from_stdlib and key == "event"):
                    event_dict[key] = redact_text(value)
                text_keys.append(key)
        # One search over all the text finds whether any known secret is there at all (nearly
        # never); only then is each field rewritten. The joiner cannot hide a match, at worst
        # it makes one up, which costs the rewrite and nothing else.
        known = self._known
        if known is not None and known.search("\n".join([event_dict[k] for k in text_keys])):
            for key in text_keys:
                event_dict[key] = known.sub(MASK, event_dict[key])
        for key in _CUT_FIELDS:
            value = event_dict.get(key)
            if isinstance(value, str) and len(value) > _CUT_CHARS:
                event_dict[key] = value[:_CUT_CHARS] + "..."
        return event_dict


# Terminal escape sequences from request data must not reach a console as they are.
_CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in (*range(32), 127) if code != 10}


def _escape_control_characters(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and key != "exception":
            event_dict[key] = value.translate(_CONTROL_CHARACTERS)
    return event_dict


def _format_exc_info(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # structlog's processor costs a few microseconds even on the lines without exc_info.
    if "exc_info" not in event_dict:
        return event_dict
    return structlog.processors.format_exc_info(logger, method, event_dict)


def _add_utc_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes it,
    with the date and time part formatted once per second: this runs for every log line."""
    fraction, whole = math.modf(time.time())
    event_dict["timestamp"] = f"{_utc_second(int(whole))}.{int(fraction * 1_000_000):06d}Z"
    return event_dict


@functools.lru_cache(maxsize=4)
def _utc_second(unix_second: int) -> str:
    return datetime.fromtimestamp(unix_second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _mark_stdlib(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["_from_stdlib"] = True
    return event_dict


def _json_line(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj).decode()


class LineWriter:
    """structlog logger and stdlib handler target: writes whole lines to a text stream.

    With `per_loop_turn`, the lines logged on the event loop's thread during one loop turn go
    out in one write, scheduled with call_soon: under load the daemon logs a line per callback,
    and one write per turn instead of per line saves a syscall on each. Lines from other
    threads, or with no loop running, are written at once. What a SIGKILL can take is the
    current turn's lines; exit and the end of the loop flush them.
    """

    def __init__(self, stream: TextIO, *, per_loop_turn: bool = False) -> None:
        self._stream = stream
        self._per_loop_turn = per_loop_turn
        self._pending: list[str] = []
        self._lock = threading.Lock()
        if per_loop_turn:
            atexit.register(self.flush)

    def msg(self, message: str) -> None:
        loop = _running_loop() if self._per_loop_turn else None
        if loop is None:
            self._write(message)
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(message)

    # structlog calls the method named after the level.
    debug = info = warning = error = critical = exception = msg

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._write("\n".join(pending))

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self._stream.write(text + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                # A closed or broken stream (stderr gone): drop the lines, as logging's own
                # handlers do; an error logged about it would only come back here.
                pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _LineHandler(logging.Handler):
    """stdlib records through the same LineWriter, so both kinds of line keep their order."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except Exception:
            self.handleError(record)


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    secrets: Iterable[str] = (),
    cache_loggers: bool = False,
    write_per_loop_turn: bool = False,
) -> None:
    """Set up structlog and route aiohttp/aio-pika/aiormq logging through the same processors.

    `secrets` are values never to be printed (passwords, API keys, their Basic forms).
    `cache_loggers` binds each module's logger once, on first use (a daemon configures logging
    once; tests configure it again and again, and need every logger to follow).
    `write_per_loop_turn`: one write per event loop turn (LineWriter), for the daemon.
    """
    stream = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    writer = LineWriter(stream, per_loop_turn=write_per_loop_turn)
    numeric_level = _LEVELS[level]
    shared: list[Any] = [
        structlog.processors.add_log_level,
        _add_utc_timestamp,
    ]
    tail: list[Any] = [
        _format_exc_info,
        Redactor(secrets),
    ]
    if use_console:
        tail.append(_escape_control_characters)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(serializer=_json_line)
    )
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=cache_loggers,
    )
    handler = _LineHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _mark_stdlib, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # Libraries are chattier than our own lines need: their warnings and errors are enough.
    for name in ("aiormq", "aio_pika", "aiohttp"):
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))
    logging.getLogger("aiohttp.access").disabled = True
    # Each failed connect attempt is an error line there; we log the transitions ourselves.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
