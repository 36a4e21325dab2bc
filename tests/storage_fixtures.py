"""Databases for the storage tests: a file SQLite always, a PostgreSQL database when
CALLGATE_TEST_PG_URL is set (an empty one created per test and dropped afterwards, or a migrated one
shared by the session and emptied after each test)."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from storage.db import is_sqlite, open_database, run_outside_transaction
from storage.migrate import apply_migrations

PG_URL_VARIABLE = "CALLGATE_TEST_PG_URL"
PG_REQUIRED_VARIABLE = "CALLGATE_TEST_PG_REQUIRED"
"""Set where PostgreSQL is available (CI sets it with the URL): its cases must run, not skip."""
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "storage" / "migrations"
_package_numbers = itertools.count()


def postgres_server_url(environ=os.environ) -> str:
    """The PostgreSQL server the storage tests use; skips them without one, unless one is required."""
    server_url = environ.get(PG_URL_VARIABLE)
    if not server_url:
        if environ.get(PG_REQUIRED_VARIABLE):
            pytest.fail(f"{PG_REQUIRED_VARIABLE} is set but {PG_URL_VARIABLE} is not: the PostgreSQL cases would be skipped")
        pytest.skip(f"{PG_URL_VARIABLE} is not set")
    return server_url


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    server_url = postgres_server_url()
    name = f"callgate_test_{uuid.uuid4().hex[:12]}"
    run_outside_transaction(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        run_outside_transaction(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'callgate.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def postgres_database_url():
    """For what only a PostgreSQL server does (its connections, its timeouts)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def shared_migrated_postgres_url():
    with fresh_postgres_database() as url:
        database = open_database(url)
        apply_migrations(database)
        database.close()
        yield url


def empty_every_table(url: str) -> None:
    """Delete every row but the migrations' own, after ending the sessions a test left open (they would block it)."""
    database = open_database(url)
    try:
        database.execute_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        tables = ", ".join(f'"{table}"' for table in database.get_tables() if table != "schema_migrations")
        database.execute_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    finally:
        database.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_database_url(request, tmp_path):
    """A database with every migration applied, for tests that never change the schema.

    Emptying the session's PostgreSQL database takes a fifth of the time of making and migrating one,
    which is most of a storage test's time, many times over under mutation testing."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'callgate.db'}"
        database = open_database(url)
        apply_migrations(database)
        database.close()
        yield url
        return
    url = request.getfixturevalue("shared_migrated_postgres_url")
    yield url
    empty_every_table(url)


@pytest.fixture
def migrated_database(migrated_database_url):
    database = open_database(migrated_database_url)
    yield database
    database.close()


@pytest.fixture
def database(database_url):
    database = open_database(database_url)
    yield database
    database.close()


@pytest.fixture
def migrations_package(tmp_path, monkeypatch):
    """Build an importable copy of the real migrations, edited or extended, and load it.

    Call it with `extra={"0007_name.py": source}` to add modules and `edit={"0002_...py": text}`
    to append text to a copied one; it returns the package name, for load_migrations().
    """
    monkeypatch.syspath_prepend(str(tmp_path))

    def build(*, extra: dict[str, str] | None = None, edit: dict[str, str] | None = None) -> str:
        package = f"test_migrations_{os.getpid()}_{next(_package_numbers)}"
        target = tmp_path / package
        shutil.copytree(MIGRATIONS_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
        for file_name, source in (extra or {}).items():
            (target / file_name).write_text(source)
        for file_name, appended in (edit or {}).items():
            with open(target / file_name, "a") as module:
                module.write(appended)
        return package

    yield build
    for name in [name for name in sys.modules if name.startswith("test_migrations_")]:
        del sys.modules[name]


def snapshot(database) -> dict:
    """Every table's columns, indexes, foreign keys and rows: equal snapshots mean an unchanged database."""
    return {table: _table_snapshot(database, table) for table in database.get_tables()}


def _table_snapshot(database, table: str) -> dict:
    return {
        "columns": sorted((column.name, column.data_type, column.null) for column in database.get_columns(table)),
        "indexes": sorted((index.name, tuple(index.columns), index.unique) for index in database.get_indexes(table)),
        "foreign_keys": sorted(
            (key.column, key.dest_table, key.dest_column) for key in database.get_foreign_keys(table)
        ),
        "rows": sorted(map(repr, database.execute_sql(f'SELECT * FROM "{table}"').fetchall())),
    }


# The tables as the system we replace made them: "Migration 44", without stopped_by/stopped_at.
LEGACY_BUSINESSES = """CREATE TABLE businesses (id {id}, name VARCHAR(255) NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"""
LEGACY_BROADCASTS = """CREATE TABLE whatsapp_broadcasts (id {id},
    business_id INTEGER NOT NULL REFERENCES businesses(id), name VARCHAR(255) NOT NULL,
    provider VARCHAR(50) DEFAULT 'meta', message_type VARCHAR(20) DEFAULT 'template',
    template_id VARCHAR(100), template_name VARCHAR(255), message_text TEXT, audience_filter TEXT,
    status VARCHAR(20) DEFAULT 'pending', total_recipients INTEGER DEFAULT 0, sent_count INTEGER DEFAULT 0,
    failed_count INTEGER DEFAULT 0, created_by VARCHAR(100), created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    started_at TIMESTAMP, completed_at TIMESTAMP{extra_columns})"""
LEGACY_RECIPIENTS = """CREATE TABLE whatsapp_broadcast_recipients (id {id},
    broadcast_id INTEGER NOT NULL REFERENCES whatsapp_broadcasts(id) ON DELETE CASCADE,
    business_id INTEGER NOT NULL REFERENCES businesses(id), phone VARCHAR(20) NOT NULL, lead_id VARCHAR(64),
    status VARCHAR(20) DEFAULT 'queued', error_message TEXT, message_id VARCHAR(200), attempts INTEGER DEFAULT 0,
    next_attempt_at TIMESTAMP, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, sent_at TIMESTAMP,
    delivered_at TIMESTAMP, read_at TIMESTAMP, UNIQUE (broadcast_id, phone))"""
LEGACY_ROWS = [
    "INSERT INTO businesses (id, name) VALUES (7, 'מספרת דנה')",
    "INSERT INTO whatsapp_broadcasts (id, business_id, name, template_name, audience_filter, status, total_recipients, "
    "sent_count) VALUES (3, 7, 'מבצע אביב', 'spring_sale', '{\"tag\": \"vip\"}', 'completed', 2, 2)",
]
LEGACY_RECIPIENT_ROWS = [
    "INSERT INTO whatsapp_broadcast_recipients (broadcast_id, business_id, phone, status, message_id) "
    "VALUES (3, 7, '+972501234567', 'delivered', 'wamid.A')",
    "INSERT INTO whatsapp_broadcast_recipients (broadcast_id, business_id, phone, status, message_id) "
    "VALUES (3, 7, '+972521234567', 'read', 'wamid.B')",
]


def create_legacy_tables(database, *, with_recipients: bool, with_stop_columns: bool = False) -> None:
    """Make the old system's broadcast tables, with rows, by raw SQL and record nothing."""
    id_column = "INTEGER PRIMARY KEY" if is_sqlite(database) else "SERIAL PRIMARY KEY"
    extra_columns = ", stopped_by VARCHAR(100), stopped_at TIMESTAMP" if with_stop_columns else ""
    statements = [
        LEGACY_BUSINESSES.format(id=id_column),
        LEGACY_BROADCASTS.format(id=id_column, extra_columns=extra_columns),
        *LEGACY_ROWS,
    ]
    if with_recipients:
        statements += [LEGACY_RECIPIENTS.format(id=id_column), *LEGACY_RECIPIENT_ROWS]
    with database.atomic():
        for statement in statements:
            database.execute_sql(statement)


def table_rows(database, table: str, columns: list[str]) -> list[tuple]:
    column_list = ", ".join(columns)
    return database.execute_sql(f"SELECT {column_list} FROM {table} ORDER BY id").fetchall()
