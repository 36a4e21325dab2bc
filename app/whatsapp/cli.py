"""The WhatsApp part of the command line: `business`, `broadcast` and `whatsapp-sandbox`."""

from __future__ import annotations

import argparse
import sys

from app.settings import Settings
from app.whatsapp import commands
from app.whatsapp.sandbox_server import add_sandbox_arguments, sandbox_main
from app.whatsapp.send_command import broadcast_send_command, broadcast_worker_command


def add_commands(subcommands: argparse._SubParsersAction) -> None:
    business = subcommands.add_parser("business", help="manage businesses").add_subparsers(
        dest="business_command", required=True)
    business.add_parser("create", help="create a business and print its id").add_argument("name")

    broadcast = subcommands.add_parser("broadcast", help="WhatsApp broadcast campaigns").add_subparsers(
        dest="broadcast_command", required=True)
    create = broadcast.add_parser("create", help="create a broadcast from a CSV of recipients")
    create.add_argument("--business", type=int, required=True, metavar="ID")
    create.add_argument("--name", required=True)
    message = create.add_mutually_exclusive_group(required=True)
    message.add_argument("--text", help="free text (delivered only inside the 24-hour window)")
    message.add_argument("--template", metavar="NAME", help="an approved template (needs --lang)")
    create.add_argument("--lang", metavar="CODE", help="the template's language code, e.g. he or en_US")
    create.add_argument("--recipients", required=True, metavar="FILE.csv")
    create.add_argument("--json", action="store_true", help="print one JSON object")

    send = broadcast.add_parser("send", help="mark it running and send until nothing is left")
    send.add_argument("id", type=int)
    send.add_argument("--rate", type=float, help="messages per second for all workers together; 0: no limit")
    send.add_argument("--workers", type=int, default=1, help="worker processes (PostgreSQL only)")
    send.add_argument("--resend-unknown", action="store_true",
                      help="send again to recipients whose earlier send may or may not have gone out")
    worker = broadcast.add_parser("worker", help="keep sending every running broadcast until SIGTERM")
    worker.add_argument("--broadcast", type=int, metavar="ID", help="work on this broadcast only, until it is done")

    status = broadcast.add_parser("status", help="status, counts and the last errors")
    status.add_argument("id", type=int)
    status.add_argument("--json", action="store_true")
    for verb in ("pause", "resume", "cancel"):
        broadcast.add_parser(verb, help=f"{verb} a broadcast").add_argument("id", type=int)

    add_sandbox_arguments(subcommands.add_parser(
        "whatsapp-sandbox", help="a local WhatsApp Cloud API send endpoint for offline broadcasts and tests"))


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "whatsapp-sandbox":
        return sandbox_main(args)
    url = settings.database_url
    if args.command == "business":
        return commands.business_create_command(url, args.name)
    match args.broadcast_command:
        case "create":
            return commands.broadcast_create_command(
                url, business_id=args.business, name=args.name, recipients_path=args.recipients,
                default_region=settings.default_region, text=args.text, template=args.template, language=args.lang,
                as_json=args.json)
        case "send":
            if args.rate is not None and args.rate < 0 or args.workers < 1:
                print("error: --rate must be 0 (no limit) or more and --workers at least 1", file=sys.stderr)
                return commands.EXIT_REFUSED
            return broadcast_send_command(settings, args.id, rate=args.rate, workers=args.workers,
                                          resend_unknown=args.resend_unknown)
        case "worker":
            return broadcast_worker_command(settings, only_broadcast=args.broadcast)
        case "status":
            return commands.broadcast_status_command(url, args.id, as_json=args.json)
        case "pause":
            return commands.broadcast_pause_command(url, args.id)
        case "resume":
            return commands.broadcast_resume_command(url, args.id)
        case "cancel":
            return commands.broadcast_cancel_command(url, args.id)
    raise AssertionError(f"unhandled broadcast command {args.broadcast_command}")
