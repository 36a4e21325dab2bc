"""Apply the numbered modules of storage/migrations/, each once, recorded in schema_migrations.

A migration module `NNNN_name.py` defines `forward(migrator) -> list` of steps (objects with
`run()`: playhouse.migrate operations or the DDL steps of storage.migrations._steps), and may
set ADOPTS_EXISTING_TABLE: when that table already exists (made by the system we replace) and
the migration is not recorded, it is recorded as adopted and its steps are skipped.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator, Sequence

import peewee
from playhouse.migrate import SchemaMigrator

from storage.db import is_sqlite
from storage.models import utc_now

MIGRATIONS_PACKAGE = "storage.migrations"
MIGRATION_MODULE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+")
# Any fixed 64-bit number works; every callgate process must use the same one.
ADVISORY_LOCK_KEY = 0x63616C6C67617465  # "callgate"

APPLIED = "applied"
ADOPTED = "adopted"
PENDING = "pending"
CHANGED = "changed"
UNKNOWN = "unknown"


class MigrationError(RuntimeError):
    """A migration could not be applied or verified; the message starts with its name."""

    def __init__(self, migration_name: str, reason: str) -> None:
        super().__init__(f"migration {migration_name}: {reason}")
        self.migration_name = migration_name


@dataclass(frozen=True)
class Migration:
    id: int
    name: str
    checksum: str
    forward: Callable[[SchemaMigrator], list]
    adopts_table: str | None = None


@dataclass(frozen=True)
class MigrationOutcome:
    """What apply_migrations() did (or, in a dry run, would do) with one migration."""

    name: str
    how: str


@dataclass(frozen=True)
class MigrationStatus:
    id: int
    name: str
    state: str
    applied_at: datetime | None = None


class SchemaMigration(peewee.Model):
    id = peewee.IntegerField(primary_key=True)
    name = peewee.CharField(max_length=200)
    checksum = peewee.CharField(max_length=64)
    applied_at = peewee.DateTimeField()
    how = peewee.CharField(max_length=10)

    class Meta:
        table_name = "schema_migrations"


def load_migrations(package: str = MIGRATIONS_PACKAGE) -> list[Migration]:
    """Import every NNNN_name module of `package`, in number order."""
    root = importlib.import_module(package)
    module_names = (info.name for info in pkgutil.iter_modules(root.__path__))
    names = sorted(name for name in module_names if MIGRATION_MODULE_NAME.fullmatch(name))
    migrations = [_load_one(package, name) for name in names]
    _refuse_duplicate_numbers(migrations)
    return migrations


def apply_migrations(
    database: peewee.Database, *, dry_run: bool = False, migrations: Sequence[Migration] | None = None
) -> list[MigrationOutcome]:
    """Apply every migration not yet recorded, in order, each in its own locked transaction.

    Returns what was applied or adopted (with dry_run, what would be, changing nothing).
    Raises MigrationError naming the migration that failed; that migration is rolled back and
    the ones before it stay applied. Concurrent callers wait on the lock and apply nothing twice.
    """
    migrations = load_migrations() if migrations is None else list(migrations)
    with database.bind_ctx([SchemaMigration]):
        if dry_run:
            return _plan(database, migrations)
        with _locked_transaction(database):
            database.create_tables([SchemaMigration], safe=True)
        outcomes = [_apply_one(database, migration, migrations) for migration in migrations]
    return [outcome for outcome in outcomes if outcome is not None]


def migration_status(
    database: peewee.Database, *, migrations: Sequence[Migration] | None = None
) -> list[MigrationStatus]:
    """Every migration known to the code or recorded in the database, with its state."""
    migrations = load_migrations() if migrations is None else list(migrations)
    with database.bind_ctx([SchemaMigration]):
        recorded = _recorded(database)
    statuses = [_status_of(migration, recorded.get(migration.id)) for migration in migrations]
    known_ids = {migration.id for migration in migrations}
    statuses += [
        MigrationStatus(row.id, row.name, UNKNOWN, row.applied_at)
        for row in recorded.values()
        if row.id not in known_ids
    ]
    return sorted(statuses, key=lambda status: status.id)


def _load_one(package: str, module_name: str) -> Migration:
    module = importlib.import_module(f"{package}.{module_name}")
    return Migration(
        id=int(module_name[:4]),
        name=module_name,
        checksum=_checksum(module.__file__),
        forward=module.forward,
        adopts_table=getattr(module, "ADOPTS_EXISTING_TABLE", None),
    )


def _checksum(path: str) -> str:
    with open(path, "rb") as source:
        # Line endings are normalised so a checkout with CRLF is not an edit.
        return hashlib.sha256(source.read().replace(b"\r\n", b"\n")).hexdigest()


def _refuse_duplicate_numbers(migrations: list[Migration]) -> None:
    for earlier, later in zip(migrations, migrations[1:]):
        if earlier.id == later.id:
            raise MigrationError(later.name, f"has the same number as {earlier.name}; renumber one of them")


@contextmanager
def _locked_transaction(database: peewee.Database) -> Iterator[None]:
    """A transaction holding the migration lock: other starters wait until it commits."""
    if is_sqlite(database):
        with database.atomic(lock_type="IMMEDIATE"):
            yield
    elif isinstance(database, peewee.PostgresqlDatabase):
        with database.atomic():
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            yield
    else:
        raise ValueError(f"migrations support SQLite and PostgreSQL, not {type(database).__name__}")


def _apply_one(database: peewee.Database, migration: Migration, migrations: list[Migration]) -> MigrationOutcome | None:
    with _locked_transaction(database):
        # Read under the lock: another process may have applied this migration while we waited.
        recorded = _recorded(database)
        _verify_recorded(recorded, migrations)
        if migration.id in recorded:
            return None
        how = _how_to_apply(database, migration)
        if how == APPLIED:
            _run_steps(database, migration)
        SchemaMigration.create(
            id=migration.id, name=migration.name, checksum=migration.checksum, applied_at=utc_now(), how=how
        )
    return MigrationOutcome(migration.name, how)


def _run_steps(database: peewee.Database, migration: Migration) -> None:
    try:
        for step in migration.forward(SchemaMigrator.from_database(database)):
            step.run()
    except Exception as error:
        raise MigrationError(
            migration.name, f"failed and was rolled back, the database is as it was before it: {error}"
        ) from error


def _plan(database: peewee.Database, migrations: list[Migration]) -> list[MigrationOutcome]:
    recorded = _recorded(database)
    _verify_recorded(recorded, migrations)
    return [
        MigrationOutcome(migration.name, _how_to_apply(database, migration))
        for migration in migrations
        if migration.id not in recorded
    ]


def _how_to_apply(database: peewee.Database, migration: Migration) -> str:
    if migration.adopts_table and database.table_exists(migration.adopts_table):
        return ADOPTED
    return APPLIED


def _recorded(database: peewee.Database) -> dict[int, SchemaMigration]:
    if not database.table_exists(SchemaMigration._meta.table_name):
        return {}
    return {row.id: row for row in SchemaMigration.select().order_by(SchemaMigration.id)}


def _verify_recorded(recorded: dict[int, SchemaMigration], migrations: list[Migration]) -> None:
    """Refuse to go on when an applied migration was edited or is unknown to this code."""
    by_id = {migration.id: migration for migration in migrations}
    for row in recorded.values():
        migration = by_id.get(row.id)
        if migration is None:
            raise MigrationError(
                row.name, "is recorded in schema_migrations but this version of callgate does not have it; "
                "run the callgate version that applied it, or a newer one"
            )
        if migration.checksum != row.checksum or migration.name != row.name:
            raise MigrationError(
                migration.name, f"was edited after it was applied (recorded checksum {row.checksum[:12]}, "
                f"file now {migration.checksum[:12]}); restore the file and put the change in a new migration"
            )


def _status_of(migration: Migration, row: SchemaMigration | None) -> MigrationStatus:
    if row is None:
        return MigrationStatus(migration.id, migration.name, PENDING)
    state = row.how if row.checksum == migration.checksum else CHANGED
    return MigrationStatus(migration.id, migration.name, state, row.applied_at)
