"""The bodies of `callgate business ...` and `callgate broadcast create|status|pause|resume|cancel`.

Each takes the database URL and the out/err streams (sys.stdout/sys.stderr as they are at call
time when None), applies pending migrations first, and returns an exit status: 0 done, 1 a
migration failed, 2 the request cannot be carried out (the reason on err, nothing written).
"""

from __future__ import annotations

import getpass
import json
import logging
import sys
from typing import Callable, TextIO

import peewee

from app.logs import log_event
from app.whatsapp.recipients import RecipientFileError, RecipientList, parse_recipients
from storage.db import open_database, redacted
from storage.migrate import MigrationError, apply_migrations
from storage.models import (
    Business,
    WhatsappBroadcast,
    WhatsappBroadcastRecipient,
    recipient_status_counts,
    utc_now,
)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MIGRATION_FAILED = 1
EXIT_REFUSED = 2
NAME_MAX_LENGTH = 200
INSERT_BATCH_SIZE = 500
LAST_ERRORS_SHOWN = 10
ACTIVE_STATUSES = ("pending", "running")
STOPPABLE_STATUSES = ("pending", "running", "paused")


class CommandError(Exception):
    """The request cannot be carried out; the message says why and what to do instead."""


def business_create_command(
    database_url: str, name: str, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Create a business and print its id alone on a line."""
    out = sys.stdout if out is None else out

    def create() -> int:
        business = Business.create(name=_checked_name("business name", name))
        log_event(logger, "-", "BUSINESS", "created", business=business.id)
        print(business.id, file=out)
        return EXIT_OK

    return with_database(database_url, err, create)


def broadcast_create_command(
    database_url: str,
    *,
    business_id: int,
    name: str,
    recipients_path: str,
    default_region: str,
    text: str | None = None,
    template: str | None = None,
    language: str | None = None,
    as_json: bool = False,
    created_by: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Create a pending broadcast and its recipients from a CSV, all in one transaction.

    Prints `{"id", "recipients", "rejected": [{"line", "value", "reason"}]}` with as_json,
    plain lines otherwise. Writes nothing when the file, the message or the business is wrong.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        message = _message_fields(text, template, language)
        broadcast_name = _checked_name("broadcast name", name)
        parsed = _read_recipients(recipients_path, default_region)
    except CommandError as error:
        return _refuse(err, str(error))

    def create() -> int:
        broadcast_id = _store_broadcast(business_id, broadcast_name, message, parsed, created_by or _os_user())
        log_event(
            logger, "-", "BROADCAST", "created", broadcast=broadcast_id,
            recipients=len(parsed.recipients), rejected=len(parsed.rejected),
        )
        _report_created(out, broadcast_id, parsed, as_json)
        return EXIT_OK

    return with_database(database_url, err, create)


def broadcast_status_command(
    database_url: str, broadcast_id: int, *, as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Print the broadcast's status, its recipients counted by status from the rows, and the last errors."""
    out = sys.stdout if out is None else out

    def show() -> int:
        report = _status_report(_broadcast(broadcast_id))
        if as_json:
            print(json.dumps(report, ensure_ascii=False), file=out)
        else:
            _print_status(out, report)
        return EXIT_OK

    return with_database(database_url, err, show)


def broadcast_pause_command(
    database_url: str, broadcast_id: int, *, by: str | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Pause a pending or running broadcast; workers stop claiming its recipients."""
    fields = {"status": "paused", "paused_reason": f"paused by {by or _os_user()}"}
    return with_database(database_url, err, lambda: _change_status(
        out, broadcast_id, "paused", allowed_from=ACTIVE_STATUSES, fields=fields,
    ))


def broadcast_resume_command(
    database_url: str, broadcast_id: int, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Resume a paused broadcast: running again if it had started, pending otherwise."""
    started = WhatsappBroadcast.started_at.is_null(False)
    fields = {"status": peewee.Case(None, [(started, "running")], "pending"), "paused_reason": None}
    return with_database(database_url, err, lambda: _change_status(
        out, broadcast_id, "resumed", allowed_from=("paused",), fields=fields, already=ACTIVE_STATUSES,
    ))


def broadcast_cancel_command(
    database_url: str, broadcast_id: int, *, by: str | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Cancel a broadcast that has not finished, recording who stopped it and when; it cannot be resumed."""
    fields = {"status": "cancelled", "stopped_by": by or _os_user(), "stopped_at": utc_now()}
    return with_database(database_url, err, lambda: _change_status(
        out, broadcast_id, "cancelled", allowed_from=STOPPABLE_STATUSES, fields=fields,
    ))


def with_database(database_url: str, err: TextIO | None, action: Callable[[], int]) -> int:
    """Open the database, bring its schema up to date, run `action`, and turn failures into exit statuses."""
    err = sys.stderr if err is None else err
    try:
        database = open_database(database_url)
    except ValueError as error:
        return _refuse(err, str(error))
    except peewee.DatabaseError as error:
        return _refuse(err, f"cannot use the database at {redacted(database_url)}: {str(error).strip()}")
    try:
        apply_migrations(database)
        return action()
    except CommandError as error:
        return _refuse(err, str(error))
    except MigrationError as error:
        print(f"error: {error}", file=err)
        return EXIT_MIGRATION_FAILED
    except peewee.DatabaseError as error:
        return _refuse(err, f"cannot use the database at {redacted(database_url)}: {str(error).strip()}")
    finally:
        database.close()


def _refuse(err: TextIO, reason: str) -> int:
    print(f"error: {reason}", file=err)
    return EXIT_REFUSED


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown user"


def _checked_name(what: str, name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX_LENGTH:
        raise CommandError(f"the {what} must be 1-{NAME_MAX_LENGTH} characters, got {len(name)}")
    return name


def _message_fields(text: str | None, template: str | None, language: str | None) -> dict:
    """The broadcast's message columns: free text, or a template with its language code."""
    if (text is None) == (template is None):
        raise CommandError("give the message as either --text TEXT or --template NAME --lang CODE")
    if text is not None:
        if language is not None:
            raise CommandError("--lang goes with --template; a --text message has no template language")
        if not text.strip():
            raise CommandError("--text is empty; give the message to send")
        return {"message_type": "text", "message_text": text}
    if not language or not language.strip():
        raise CommandError(f"--template {template} needs --lang CODE, the template's language (e.g. he, en_US)")
    return {"message_type": "template", "template_name": template.strip(), "template_language": language.strip()}


def _read_recipients(recipients_path: str, default_region: str) -> RecipientList:
    try:
        with open(recipients_path, "rb") as recipient_file:
            content = recipient_file.read()
    except OSError as error:
        raise CommandError(f"cannot read the recipient file {recipients_path}: {error.strerror}") from None
    try:
        parsed = parse_recipients(content, default_region)
    except RecipientFileError as error:
        raise CommandError(f"{recipients_path}: {error}") from None
    if not parsed.recipients:
        reasons = "; ".join(f"line {row.line}: {row.reason}" for row in parsed.rejected[:5])
        raise CommandError(
            f"{recipients_path} has no valid recipient ({len(parsed.rejected)} rows rejected"
            + (f": {reasons}" if reasons else "") + ")"
        )
    return parsed


def _store_broadcast(business_id: int, name: str, message: dict, parsed: RecipientList, created_by: str) -> int:
    recipient = WhatsappBroadcastRecipient
    with Business._meta.database.atomic():
        business = Business.get_or_none(Business.id == business_id)
        if business is None:
            raise CommandError(f"no business with id {business_id}; create one with `callgate business create NAME`")
        broadcast = WhatsappBroadcast.create(
            business=business, name=name, status="pending", total_recipients=len(parsed.recipients),
            created_by=created_by, **message,
        )
        created_at = utc_now()
        rows = [
            (broadcast.id, business.id, entry.phone, entry.name, entry.lead_id, created_at)
            for entry in parsed.recipients
        ]
        columns = [recipient.broadcast, recipient.business, recipient.phone, recipient.name, recipient.lead_id,
                   recipient.created_at]
        for start in range(0, len(rows), INSERT_BATCH_SIZE):
            recipient.insert_many(rows[start:start + INSERT_BATCH_SIZE], fields=columns).execute()
    return broadcast.id


def _report_created(out: TextIO, broadcast_id: int, parsed: RecipientList, as_json: bool) -> None:
    rejected = [{"line": row.line, "value": row.value, "reason": row.reason} for row in parsed.rejected]
    if as_json:
        report = {"id": broadcast_id, "recipients": len(parsed.recipients), "rejected": rejected}
        print(json.dumps(report, ensure_ascii=False), file=out)
        return
    print(f"broadcast {broadcast_id} created with {len(parsed.recipients)} recipients, "
          f"{len(rejected)} rows rejected", file=out)
    for row in parsed.rejected:
        print(f"  line {row.line}: {row.value!r}: {row.reason}", file=out)


def _broadcast(broadcast_id: int) -> WhatsappBroadcast:
    broadcast = WhatsappBroadcast.get_or_none(WhatsappBroadcast.id == broadcast_id)
    if broadcast is None:
        raise CommandError(f"no broadcast with id {broadcast_id}")
    return broadcast


def _change_status(
    out: TextIO | None, broadcast_id: int, verb: str, *, allowed_from: tuple[str, ...], fields: dict,
    already: tuple[str, ...] | None = None,
) -> int:
    """Move the broadcast to its new status only if it is still in `allowed_from` when the update runs."""
    out = sys.stdout if out is None else out
    current = _broadcast(broadcast_id).status
    if current in (already or (fields["status"],)):
        print(f"broadcast {broadcast_id} is already {current}", file=out)
        return EXIT_OK
    moved = (
        WhatsappBroadcast.update(fields)
        .where(WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status.in_(allowed_from))
        .execute()
    )
    if not moved:
        current = _broadcast(broadcast_id).status
        raise CommandError(
            f"broadcast {broadcast_id} is {current}: only a {' or '.join(allowed_from)} broadcast can be {verb}"
        )
    status = _broadcast(broadcast_id).status
    log_event(logger, "-", "BROADCAST", verb, broadcast=broadcast_id, status=status)
    print(f"broadcast {broadcast_id} is now {status}", file=out)
    return EXIT_OK


def _status_report(broadcast: WhatsappBroadcast) -> dict:
    by_status = recipient_status_counts(broadcast.id)
    recipient = WhatsappBroadcastRecipient
    has_error = recipient.error_message.is_null(False) | recipient.error_code.is_null(False)
    errors = (
        recipient.select(recipient.phone, recipient.error_code, recipient.error_message, recipient.error_at)
        .where(recipient.broadcast == broadcast.id, has_error)
        .order_by(recipient.error_at.desc(nulls="LAST"), recipient.id.desc())
        .limit(LAST_ERRORS_SHOWN)
    )
    return {
        "id": broadcast.id,
        "name": broadcast.name,
        "status": broadcast.status,
        "paused_reason": broadcast.paused_reason,
        "stopped_by": broadcast.stopped_by,
        "stopped_at": broadcast.stopped_at.isoformat() if broadcast.stopped_at else None,
        "counts": {"total": sum(by_status.values()), **by_status},
        "last_errors": [
            {"phone": row.phone, "error_code": row.error_code, "error_message": row.error_message,
             "at": row.error_at.isoformat(timespec="seconds") if row.error_at else None} for row in errors
        ],
    }


def _print_status(out: TextIO, report: dict) -> None:
    print(f"broadcast {report['id']} {report['name']!r}: {report['status']}", file=out)
    if report["paused_reason"]:
        print(f"  {report['paused_reason']}", file=out)
    if report["stopped_by"]:
        print(f"  cancelled by {report['stopped_by']} at {report['stopped_at']} UTC", file=out)
    print("  " + "  ".join(f"{status} {count}" for status, count in report["counts"].items()), file=out)
    if report["last_errors"]:
        print("last errors:", file=out)
    for error in report["last_errors"]:
        print(f"  {error['at'] or '-'}  {error['phone']}  {error['error_code'] or '-'}  {error['error_message'] or ''}"
              .rstrip(), file=out)
