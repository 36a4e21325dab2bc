"""Open the database named by DATABASE_URL: SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import peewee
import psycopg2
from playhouse.db_url import connect

# The models bind to this proxy; open_database() points it at the real database.
database_proxy = peewee.DatabaseProxy()

SQLITE_BUSY_TIMEOUT_S = 10
SQLITE_WAL_RETRY_S = 0.05
POSTGRES_CONNECT_TIMEOUT_S = 5


def open_database(url: str) -> peewee.Database:
    """Connect to `url` (sqlite:///path or postgresql://...) and bind the models to it.

    Raises ValueError naming the URL when its scheme is not one we support, and
    peewee.OperationalError when a SQLite file cannot be opened.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        # SQLite leaves foreign keys off unless asked, on every connection; sqlite3's timeout is
        # SQLite's busy timeout: how long to wait for a lock before failing.
        database = connect(url, pragmas={"foreign_keys": 1}, timeout=SQLITE_BUSY_TIMEOUT_S)
        _switch_to_wal(database)
    elif scheme.startswith("postgres"):
        # libpq waits for an unreachable server as long as the kernel does (minutes) unless told.
        database = connect(url, connect_timeout=POSTGRES_CONNECT_TIMEOUT_S)
    else:
        raise ValueError(f"DATABASE_URL must start with sqlite:/// or postgresql://, got {redacted(url)!r}")
    database_proxy.initialize(database)
    return database


def _switch_to_wal(database: peewee.SqliteDatabase) -> None:
    """Put the file in WAL mode (it stays so), letting readers run while the writer task writes.

    SQLite refuses a journal-mode change while another process holds the file, without waiting
    on the busy timeout, so processes starting together retry until it goes through.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            database.execute_sql("PRAGMA journal_mode = wal")
            return
        except peewee.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(SQLITE_WAL_RETRY_S)


@contextmanager
def dropping_the_connection_on_failure(database: peewee.Database) -> Iterator[None]:
    """Close this thread's connection when the block raises a peewee error: after a PostgreSQL restart
    or failover it is dead (psycopg2's "connection already closed", a peewee.InterfaceError), and
    peewee would hand the same one to the next query. The next query opens a new one."""
    try:
        yield
    except peewee.PeeweeException:
        database.close()
        raise


def database_answers(database: peewee.Database) -> None:
    """Raise the peewee error when the database does not answer a query."""
    with dropping_the_connection_on_failure(database):
        database.execute_sql("SELECT 1")


def is_sqlite(database: peewee.Database) -> bool:
    return isinstance(database, peewee.SqliteDatabase)


def redacted(database_url: str) -> str:
    """The URL with its password replaced, fit for a message or a log line."""
    parts = urlsplit(database_url)
    if not parts.password:
        return database_url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def run_outside_transaction(server_url: str, statement: str) -> None:
    """Run one statement in autocommit, as CREATE/DROP DATABASE need, on the PostgreSQL server at `server_url`."""
    connection = psycopg2.connect(server_url)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()
