"""structlog set-up: JSON lines (or console on a TTY), stdlib loggers routed the same, redaction."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from bridge.redact import MASK, is_secret_key, redact_text

# Free-text fields that may carry library messages with credentials inside.
_TEXT_FIELDS = ("exception", "error", "detail")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask secret-named fields and credentials inside free text, tracebacks included."""
    for key in list(event_dict):
        value = event_dict[key]
        if is_secret_key(key):
            event_dict[key] = MASK
        elif key in _TEXT_FIELDS and isinstance(value, str):
            event_dict[key] = redact_text(value)
    if event_dict.get("_from_stdlib") and isinstance(event_dict.get("event"), str):
        event_dict["event"] = redact_text(event_dict["event"])
    event_dict.pop("_from_stdlib", None)
    return event_dict


def _mark_stdlib(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["_from_stdlib"] = True
    return event_dict


def _json_line(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj).decode()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and route aiohttp/aio-pika/aiormq logging through the same processors."""
    stream = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    numeric_level = _LEVELS[level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Any] = [
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(serializer=_json_line)
    )
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
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
