"""Command line: run, check-config, send. Exit codes: 0 success, 1 failure, 2 usage or config."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bridge import __version__, config, log
from bridge.errors import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"one-bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
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

    from bridge import sender

    send = commands.add_parser("send", help="post realistic ONe callbacks to a running bridge")
    sender.add_arguments(send)
    send.set_defaults(handler=_send)
    return parser


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
    log.configure(cfg.log.level, cfg.log.format)
    from bridge.app import serve

    return asyncio.run(serve(cfg))


def _check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    effective = config.effective(cfg)
    if args.json:
        print(orjson.dumps(effective, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"configuration is valid ({args.config or 'defaults and environment'})")
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
