"""The body of `callgate migrate [--list | --dry-run]`: plain lines out, an exit status back."""

from __future__ import annotations

import sys
from typing import TextIO

import peewee

from storage.db import open_database, redacted
from storage.migrate import CHANGED, UNKNOWN, MigrationError, apply_migrations, migration_status

EXIT_OK = 0
EXIT_MIGRATION_FAILED = 1
EXIT_BAD_DATABASE = 2


def migrate_command(database_url: str, *, list_only: bool, dry_run: bool, out: TextIO | None = None) -> int:
    """Apply pending migrations, or only list them (--list) or say what would be done (--dry-run).

    Writes to `out` (sys.stdout as it is at call time when None). Returns 0 on success, 1 when a
    migration fails or is refused, 2 when the database cannot be used.
    """
    out = sys.stdout if out is None else out
    try:
        database = open_database(database_url)
    except ValueError as error:
        print(f"error: {error}", file=out)
        return EXIT_BAD_DATABASE
    except peewee.DatabaseError as error:
        return _cannot_use(database_url, error, out)
    try:
        if list_only:
            return _list(database, out)
        if dry_run:
            return _dry_run(database, out)
        return _apply(database, out)
    except MigrationError as error:
        print(f"error: {error}", file=out)
        return EXIT_MIGRATION_FAILED
    except peewee.DatabaseError as error:
        return _cannot_use(database_url, error, out)
    finally:
        database.close()


def _cannot_use(database_url: str, error: peewee.DatabaseError, out: TextIO) -> int:
    print(f"error: cannot use the database at {redacted(database_url)}: {str(error).strip()}", file=out)
    return EXIT_BAD_DATABASE


def _list(database: peewee.Database, out: TextIO) -> int:
    statuses = migration_status(database)
    width = max((len(status.name) for status in statuses), default=0)
    for status in statuses:
        applied_at = status.applied_at.strftime("%Y-%m-%d %H:%M:%S UTC") if status.applied_at else ""
        print(f"{status.name:<{width}}  {status.state:<8} {applied_at}".rstrip(), file=out)
    troubled = [status for status in statuses if status.state in (CHANGED, UNKNOWN)]
    for status in troubled:
        print(f"error: migration {status.name} is {_TROUBLE[status.state]}", file=out)
    return EXIT_MIGRATION_FAILED if troubled else EXIT_OK


_TROUBLE = {
    CHANGED: "edited since it was applied; restore the file and put the change in a new migration",
    UNKNOWN: "recorded in the database but missing from this version of callgate",
}


def _dry_run(database: peewee.Database, out: TextIO) -> int:
    planned = apply_migrations(database, dry_run=True)
    for outcome in planned:
        verb = "adopt" if outcome.how == "adopted" else "apply"
        print(f"would {verb} {outcome.name}", file=out)
    if not planned:
        print("nothing to apply: the database is up to date", file=out)
    return EXIT_OK


def _apply(database: peewee.Database, out: TextIO) -> int:
    done = apply_migrations(database)
    for outcome in done:
        print(f"{outcome.how} {outcome.name}", file=out)
    if not done:
        print("nothing to apply: the database is up to date", file=out)
    return EXIT_OK

