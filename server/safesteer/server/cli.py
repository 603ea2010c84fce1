"""The `safesteer` command: the toolkit's subcommands plus `serve`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from safesteer.adapters.cli import add_toolkit_commands
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.server.access import is_loopback
from safesteer.server.auth import KeysFileError
from safesteer.server.config import ConfigError
from safesteer.server.logs import configure_logging
from safesteer.server.ops_cli import add_ops_commands
from safesteer.server.settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `Settings` field, described by the field; unset flags fall back to env."""
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [env SAFESTEER_{name.upper()}; default {default}]"
        if field.annotation is bool:
            parser.add_argument(
                _flag(name), action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(_flag(name), default=argparse.SUPPRESS, help=help_text)


def _serve(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for error in exc.errors():
            flag = _flag(str(error["loc"][0])) if error["loc"] else "settings"
            print(f"error: {flag}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.keys_file is None and not is_loopback(settings.host):
        if not settings.insecure_no_auth:
            print(
                f"error: refusing to serve without API keys on {settings.host}: pass "
                "--keys-file (see `safesteer keys add`), bind 127.0.0.1, or accept the risk "
                "with --insecure-no-auth",
                file=sys.stderr,
            )
            return 2
        logging.getLogger(__name__).warning(
            "serving WITHOUT authentication on %s (--insecure-no-auth)", settings.host
        )
    import uvicorn

    from safesteer.server.app import create_app
    from safesteer.server.startup import build_server

    try:
        server = build_server(settings)
        app = create_app(settings, server)
    except (AdapterError, ModelLoadError, ConfigError, KeysFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safesteer",
        description="Serve-time safety adapters for fine-tuned LLMs, and the tools that make them.",
    )
    commands: Any = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Run the OpenAI-compatible server on a model with its family's safety "
        "adapter. Every flag can also be set by its SAFESTEER_ environment variable.",
    )
    add_settings_flags(serve)
    serve.set_defaults(func=_serve)
    add_toolkit_commands(commands)
    add_ops_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
