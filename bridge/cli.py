"""Command line of one-bridge.

Exit codes: 0 success, 1 the operation failed, 2 usage or configuration error, 3 `sync --dry-run`
with changes pending.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bridge import __version__, config, log
from bridge.errors import BridgeError, ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Answer with the usage of the command that was meant, not the top level's.
        getattr(args, "command_parser", parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if getattr(args, "needs_control", False):
            from bridge import control_cli

            cfg = _load(args)
            # On stderr: stdout is the answer.
            log.configure(cfg.log.level, cfg.log.format, secrets=config.secret_values(cfg))
            return control_cli.run(args, cfg)
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"one-bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"one-bridge: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="one-bridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"one-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the bridge until SIGTERM or SIGINT")
    _add_config_flags(run)
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print it, secrets masked"
    )
    _add_config_flags(check)
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=_check_config)

    spool = commands.add_parser("spool", help="inspect, export or drain the durable spool")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="ACTION", required=True)
    stats = spool_commands.add_parser("stats", help="events, bytes, oldest age, dead letters")
    export = spool_commands.add_parser("export", help="every record as JSON lines on stdout")
    export.add_argument("--dead-letters", action="store_true", help="the dead-letter table")
    drain = spool_commands.add_parser(
        "drain", help="publish everything spooled now (the bridge must not be running)"
    )
    drain.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the broker (default 30)"
    )
    for action, handler in ((stats, _spool_stats), (export, _spool_export), (drain, _spool_drain)):
        _add_config_flags(action)
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(handler=handler)

    from bridge import control_cli

    control_cli.add_commands(commands, _add_config_flags)

    sandbox = commands.add_parser("sandbox", help="run a stand-in ONe platform for development")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.set_defaults(handler=_sandbox)

    from bridge import sender

    send = commands.add_parser("send", help="post realistic ONe callbacks to a running bridge")
    sender.add_arguments(send)
    send.set_defaults(handler=_send)
    _mark_command_parsers(parser)
    return parser


def _mark_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every command's parser a default `command_parser` naming itself, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command_parser in action.choices.values():
                command_parser.set_defaults(command_parser=command_parser)
                _mark_command_parsers(command_parser)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("BRIDGE_CONFIG"),
        help="TOML file (default: $BRIDGE_CONFIG; without either, defaults and BRIDGE_* env only)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="overrides [log] level"
    )


def _load(args: argparse.Namespace) -> config.Config:
    overrides: dict[str, Any] = {}
    if args.log_level:
        overrides["log"] = {"level": args.log_level}
    path = Path(args.config) if args.config else None
    return config.load(path, overrides=overrides)


def _run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    log.configure(
        cfg.log.level,
        cfg.log.format,
        secrets=config.secret_values(cfg),
        cache_loggers=True,
        write_per_loop_turn=True,
    )
    from bridge.app import serve

    if cfg.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if cfg.event_loop == "uvloop":
                raise ConfigError("event_loop = 'uvloop' but uvloop is not installed") from None
        else:
            return int(uvloop.run(serve(cfg)))
    return asyncio.run(serve(cfg))


def _check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    effective = config.effective(cfg)
    if args.json:
        print(orjson.dumps(effective, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"configuration is valid ({args.config or 'defaults and environment'})")
        if not cfg.tenants:
            print("warning: no tenants configured: every callback would get 404", file=sys.stderr)
        for line in _flatten(effective):
            print(line)
    return EXIT_OK


def _flatten(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict) and data:
        return [line for key, value in data.items() for line in _flatten(value, f"{prefix}{key}.")]
    return [f"{prefix.rstrip('.')} = {orjson.dumps(data).decode()}"]


def _send(args: argparse.Namespace) -> int:
    from bridge import sender

    try:
        options = sender.options_from_args(args)
    except ValueError as exc:
        print(f"one-bridge send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = asyncio.run(sender.send_callbacks(options))
    print(sender.render_report(report, as_json=args.json))
    return sender.exit_code(report)


def _spool_stats(args: argparse.Namespace) -> int:
    from bridge.spool import read_stats

    cfg = _load(args)
    stats = read_stats(cfg.spool.dir)
    oldest = stats.oldest_received_at
    report = {
        "dir": str(cfg.spool.dir),
        "events": stats.events,
        "body_bytes": stats.body_bytes,
        "oldest_age_seconds": None if oldest is None else round(time.time() - oldest, 3),
        "dead_letters": stats.dead_letters,
    }
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        for key, value in report.items():
            print(f"{key:<20} {'-' if value is None else value}")
    return EXIT_OK


def _spool_export(args: argparse.Namespace) -> int:
    from bridge.spool import DeadLetter, read_records

    cfg = _load(args)
    out = sys.stdout.buffer
    for record in read_records(cfg.spool.dir, dead_letters=args.dead_letters):
        event = record.event
        line: dict[str, Any] = {
            "seq": record.seq,
            "exchange": record.exchange,
            "tenant": event.tenant,
            "event_type": event.event_type,
            "event_id": event.event_id,
            "received_at": event.received_at,
            "spooled_at": record.spooled_at,
            # Accepted bodies are valid JSON, so valid UTF-8: kept as the exact text.
            "body": event.body.decode(),
        }
        if isinstance(record, DeadLetter):
            line |= {"reason": record.reason, "dead_at": record.dead_at}
        out.write(orjson.dumps(line) + b"\n")
    out.flush()
    return EXIT_OK


def _spool_drain(args: argparse.Namespace) -> int:
    cfg = _load(args)
    log.configure(cfg.log.level, cfg.log.format, secrets=config.secret_values(cfg))
    return asyncio.run(_drain(cfg, args.timeout, as_json=args.json))


async def _drain(cfg: config.Config, timeout_seconds: float, *, as_json: bool) -> int:
    from bridge.delivery import Replayer
    from bridge.publisher import AmqpPublisher
    from bridge.spool import SqliteSpool

    # The spool's lock refuses this while a bridge runs: that bridge replays by itself.
    async with await SqliteSpool.open(
        cfg.spool.dir, max_bytes=cfg.spool.max_bytes, max_events=cfg.spool.max_events
    ) as spool:
        publisher = AmqpPublisher(cfg.broker, exchanges=())
        await publisher.start()
        try:
            async with asyncio.timeout(timeout_seconds):
                await publisher.wait_connected()
            replayer = Replayer(
                spool,
                publisher,
                publish_timeout_seconds=cfg.broker.publish_timeout_seconds,
                batch_size=cfg.spool.replay_batch_size,
                max_attempts=cfg.spool.max_attempts,
            )
            replayed = await replayer.drain()
        except TimeoutError:
            print(f"one-bridge: broker not reachable within {timeout_seconds:g} s", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            await publisher.close()
        remaining = spool.stats().events
    result = {"replayed": replayed, "remaining": remaining}
    print(
        orjson.dumps(result).decode() if as_json else f"replayed {replayed}, remaining {remaining}"
    )
    return EXIT_OK if remaining == 0 else EXIT_FAILURE


def _sandbox(args: argparse.Namespace) -> int:
    from bridge.sandbox import serve_sandbox

    try:
        asyncio.run(serve_sandbox(args.host, args.port))
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        print(
            f"one-bridge sandbox: cannot listen on {args.host}:{args.port}"
            f" ({os.strerror(exc.errno) if exc.errno else exc});"
            " pick another with --port",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    return EXIT_OK
