"""callgate serve | simulate | migrate."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import pathlib
import sys
import tempfile
import uuid
from functools import partial

import trio

from app.carriers.simulated_twilio import PHONE_LINES
from app.logs import configure_logging
from app.settings import Settings, SettingsError
from app.whatsapp import cli as whatsapp_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server: Twilio webhook and media streams on one port")
    serve.add_argument("--dev", action="store_true",
                       help="run without Twilio's auth token, an OpenAI key or a public host (never on a real number)")
    simulate = commands.add_parser("simulate", help="play one full simulated call against the local model")
    simulate.add_argument("--fast", action="store_true", help="run in virtual time instead of real time")
    simulate.add_argument("--plot", metavar="PNG", help="draw the call's waveforms to this file (needs the plot extra)")
    simulate.add_argument("--verbose", action="store_true", help="also print the server's log lines")
    simulate.add_argument(
        "--line", action="append", choices=[*PHONE_LINES, "all"], metavar="LINE",
        help=f"the caller's line: {', '.join(PHONE_LINES)} (default: echoing), or all; repeat to play several")
    migrate = commands.add_parser("migrate", help="apply the database migrations")
    mode = migrate.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list migrations and whether they are applied")
    mode.add_argument("--dry-run", action="store_true", help="say what would be applied, change nothing")
    whatsapp_cli.add_commands(commands)
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"callgate: {error}", file=sys.stderr)
        return 2
    quiet_simulation = args.command == "simulate" and not args.verbose
    configure_logging("WARNING" if quiet_simulation else settings.log_level)
    _freeze_what_lives_forever()
    if args.command == "serve":
        missing = settings.missing_for_production()
        if missing and not args.dev:
            print("callgate: serve refuses to start without " + "; ".join(missing)
                  + " (serve --dev runs without them, for trying it out)", file=sys.stderr)
            return 2
        for what in missing:
            logging.getLogger("callgate").warning("call=- [SERVER] --dev: running without %s", what)
        return _serve(settings)
    if args.command == "simulate":
        lines = list(PHONE_LINES) if "all" in (args.line or []) else list(dict.fromkeys(args.line or ["echoing"]))
        return _simulate(settings, fast=args.fast, plot_path=args.plot, line_names=lines)
    if args.command in ("business", "broadcast", "whatsapp-sandbox"):
        return whatsapp_cli.run(args, settings)
    from storage.commands import migrate_command

    return migrate_command(settings.database_url, list_only=args.list, dry_run=args.dry_run)


def _freeze_what_lives_forever() -> None:
    """Modules and classes live as long as the process: a full collection that scanned them would stall
    the event loop for tens of ms, a late frame on a call or a burst of sends at the provider."""
    gc.freeze()


def _serve(settings: Settings) -> int:
    from app.server import serve
    from storage.migrate import MigrationError

    _freeze_what_lives_forever()  # again, now that the call path's modules are loaded

    try:
        trio.run(partial(serve, settings, drain_on_sigterm=True))
    except KeyboardInterrupt:
        logging.getLogger("callgate").info("call=- [SERVER] stopped")
    except MigrationError as error:
        print(f"callgate: start-up stopped by the database schema: {error}", file=sys.stderr)
        return 1
    return 0


def _simulate(settings: Settings, *, fast: bool, plot_path: str | None, line_names: list[str]) -> int:
    from app.simulate import plot_call, simulate_call

    if not settings.uses_local_model:
        print("callgate simulate always uses the built-in local model; OPENAI_API_KEY is ignored", file=sys.stderr)
    from trio.testing import MockClock  # it imports pytest: only for a simulation in virtual time

    reports = []
    for line_name in line_names:
        clock = MockClock(autojump_threshold=0) if fast else None
        # A throwaway database: a simulated call must never land among real calls.
        with tempfile.TemporaryDirectory(prefix="callgate-simulate-") as scratch:
            simulation_settings = dataclasses.replace(
                settings, openai_api_key="", database_url=f"sqlite:///{scratch}/simulated-calls.db",
                spill_dir=f"{scratch}/spill")
            report = trio.run(simulate_call, simulation_settings, "CA" + uuid.uuid4().hex, PHONE_LINES[line_name],
                              clock=clock)
        if len(line_names) > 1:
            print(f"--- line: {line_name}")
        for at_s, what in report.timeline.events:
            print(f"{at_s:8.2f}s  {what}")
        print(json.dumps(report.summary(), indent=2))
        if plot_path:
            # One drawing per line: call.png becomes call-clean.png, call-hybrid.png, ...
            path = plot_path if len(line_names) == 1 else _suffixed(plot_path, line_name)
            plot_call(report, path)
            print(f"plot written to {path}")
        reports.append(report)
    if len(reports) > 1:
        print(json.dumps({"talk_over_ms_by_line": {report.line: report.talk_over_ms for report in reports}}, indent=2))
    return 0 if all(report.talk_over_ms is not None and not report.greeting_cleared for report in reports) else 1


def _suffixed(path: str, suffix: str) -> str:
    plot = pathlib.Path(path)
    return str(plot.with_name(f"{plot.stem}-{suffix}{plot.suffix}"))


if __name__ == "__main__":
    sys.exit(main())
