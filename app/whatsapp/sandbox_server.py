"""`callgate whatsapp-sandbox`: the Cloud API sandbox on a local port, recording what it accepts."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import TextIO

import trio

from app.http import HttpRequest, HttpResponse, Router
from app.logs import log_event
from app.whatsapp.sandbox import Answer, CloudApiSandbox, Hold, parse_fail_spec

logger = logging.getLogger("callgate.whatsapp.sandbox")

MESSAGES_PATH = "/{version}/{phone_number_id}/messages"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090


class SandboxService:
    """The sandbox's trio side: the send route, the record file, and requests held unanswered."""

    def __init__(self, sandbox: CloudApiSandbox, record_file: TextIO | None = None) -> None:
        self._sandbox = sandbox
        self._record_file = record_file
        self.router = Router()
        self.router.http("POST", MESSAGES_PATH, self.send_message, may_hold=sandbox.may_hold)
        self.connections_opened = 0
        self.requests_on_hold = 0

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        self.connections_opened += 1
        await self.router.handle_connection(stream)

    async def send_message(self, request: HttpRequest) -> HttpResponse:
        """Answer like Meta. An injected timeout is recorded, then never answered: the router
        cancels this handler once the client hangs up."""
        reply = self._sandbox.handle(request, received_at_s=time.time())
        if reply.record is not None:
            self._append_record(reply.record)
        if isinstance(reply, Hold):
            log_event(logger, "-", "WA_SANDBOX", "accepted, holding the answer (injected timeout)",
                      to=reply.record["to"], message_id=reply.record["message_id"])
            self.requests_on_hold += 1
            try:
                await trio.sleep_forever()
            finally:
                self.requests_on_hold -= 1
        return self._logged_response(reply)

    def _logged_response(self, answer: Answer) -> HttpResponse:
        if answer.record is not None:
            log_event(logger, "-", "WA_SANDBOX", "accepted", level=logging.DEBUG,
                      to=answer.record["to"], message_id=answer.record["message_id"])
        else:
            error = answer.body["error"]
            log_event(logger, "-", "WA_SANDBOX", "refused", status=answer.status, code=error["code"],
                      details=error["error_data"]["details"])
        return HttpResponse.json(answer.status, answer.body)

    def _append_record(self, record: dict) -> None:
        if self._record_file is None:
            return
        # A plain blocking write: one short line, flushed so a reader (a test, a crash check) sees it at once.
        self._record_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._record_file.flush()

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound port (useful with port 0) through task_status."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self.handle_connection, port, host=host))
            bound_port = listeners[0].socket.getsockname()[1]
            log_event(logger, "-", "WA_SANDBOX", "listening", url=f"http://{host}:{bound_port}")
            task_status.started(bound_port)


async def serve_sandbox(host: str, port: int, *, record_path: str | Path | None, fail_spec: str, seed: int,
                        access_token: str | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the sandbox until cancelled, appending accepted messages to `record_path` (if given).
    Raises ValueError for a bad `fail_spec` and OSError when the port cannot be bound."""
    sandbox = CloudApiSandbox(parse_fail_spec(fail_spec), seed=seed, access_token=access_token)
    if record_path is None:
        await SandboxService(sandbox).serve(host, port, task_status=task_status)
        return
    with open(record_path, "a", encoding="utf-8") as record_file:
        await SandboxService(sandbox, record_file).serve(host, port, task_status=task_status)


def _checked_fail_spec(spec: str) -> str:
    try:
        parse_fail_spec(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return spec


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port, 0 for any free one (default {DEFAULT_PORT})")
    parser.add_argument("--record", metavar="FILE.jsonl",
                        help="append every accepted message to this file, one JSON object a line")
    parser.add_argument("--fail", metavar="SPEC", type=_checked_fail_spec, default="",
                        help='inject failures by rate, e.g. "429:0.1,500:0.05,timeout:0.02,131026:0.05"')
    parser.add_argument("--seed", type=int, default=0, help="seed of the failure draws (default 0)")
    parser.add_argument("--access-token", metavar="TOKEN", help="accept only this Bearer token (default: any)")


def sandbox_main(args: argparse.Namespace) -> int:
    """Run the sandbox in the foreground until Ctrl-C; the exit status for the CLI."""
    try:
        trio.run(partial(serve_sandbox, args.host, args.port, record_path=args.record, fail_spec=args.fail,
                         seed=args.seed, access_token=args.access_token))
    except KeyboardInterrupt:
        log_event(logger, "-", "WA_SANDBOX", "stopped")
    except OSError as error:
        print(f"callgate whatsapp-sandbox: cannot serve on {args.host}:{args.port} or write the record: {error}",
              file=sys.stderr)
        return 1
    return 0
