"""Building blocks shared by the migration modules.

Migrations depend on what these do, so a change here must keep every existing call behaving
the same; anything new belongs in a new function.
"""

from __future__ import annotations

import peewee
from playhouse.migrate import SchemaMigrator


class FrozenModel(peewee.Model):
    """Base of the table definitions a migration keeps as they were when it was written."""

    class Meta:
        legacy_table_names = False


def reference(table_name: str) -> type[peewee.Model]:
    """A stand-in for an existing table with an integer `id`, for foreign keys to point at."""
    meta = type("Meta", (), {"table_name": table_name})
    return type(f"Reference_{table_name}", (FrozenModel,), {"Meta": meta})


def server_default(sql: str) -> list[peewee.SQL]:
    """A DEFAULT the database applies itself, so rows inserted without Peewee get it too."""
    return [peewee.SQL(f"DEFAULT {sql}")]


class CreateTables:
    """A step creating tables (with their indexes) from frozen models; fails if one exists."""

    def __init__(self, migrator: SchemaMigrator, *models: type[peewee.Model]) -> None:
        self.database = migrator.database
        self.models = list(models)

    def run(self) -> None:
        with self.database.bind_ctx(self.models):
            self.database.create_tables(self.models, safe=False)


def add_missing_columns(migrator: SchemaMigrator, table: str, **fields: peewee.Field) -> list:
    """add_column operations for those of `fields` that `table` lacks (adopted tables vary)."""
    present = {column.name for column in migrator.database.get_columns(table)}
    return [migrator.add_column(table, name, field) for name, field in fields.items() if name not in present]


def add_missing_counters(migrator: SchemaMigrator, table: str, *names: str) -> list:
    """Columns INTEGER NOT NULL DEFAULT 0 that `table` lacks, added in one statement each (no table rebuild)."""
    counter = peewee.IntegerField(constraints=server_default("0"))
    present = {column.name for column in migrator.database.get_columns(table)}
    return [migrator.add_column(table, name, counter, allow_not_null=True) for name in names if name not in present]


class ExecuteSQL:
    """A step running one SQL statement: the data changes a schema change needs."""

    def __init__(self, migrator: SchemaMigrator, sql: str) -> None:
        self.database = migrator.database
        self.sql = sql

    def run(self) -> None:
        self.database.execute_sql(self.sql)


def add_missing_index(migrator: SchemaMigrator, table: str, name: str, columns: tuple[str, ...]) -> list:
    """A step creating index `name` unless `table` already has an index on exactly `columns` (under any name)."""
    if any(tuple(index.columns) == columns for index in migrator.database.get_indexes(table)):
        return []
    column_list = ", ".join(f'"{column}"' for column in columns)
    return [ExecuteSQL(migrator, f'CREATE INDEX "{name}" ON "{table}" ({column_list})')]


def drop_indexes_on(migrator: SchemaMigrator, table: str, columns: tuple[str, ...]) -> list:
    """drop_index operations for the non-unique indexes of `table` on exactly `columns`, whatever their names."""
    return [
        migrator.drop_index(table, index.name)
        for index in migrator.database.get_indexes(table)
        if tuple(index.columns) == columns and not index.unique
    ]
