"""Open the database named by DATABASE_URL: SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import peewee
from playhouse.db_url import connect

# The models bind to this proxy; open_database() points it at the real database.
database_proxy = peewee.DatabaseProxy()

SQLITE_BUSY_TIMEOUT_S = 10

# WAL lets readers run while the writer task writes; SQLite leaves foreign keys off unless asked.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": SQLITE_BUSY_TIMEOUT_S * 1000}


def open_database(url: str) -> peewee.Database:
    """Connect to `url` (sqlite:///path or postgresql://...) and bind the models to it.

    Raises ValueError naming the URL when its scheme is not one we support.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        database = connect(url, pragmas=SQLITE_PRAGMAS, timeout=SQLITE_BUSY_TIMEOUT_S)
    elif scheme.startswith("postgres"):
        database = connect(url)
    else:
        raise ValueError(f"DATABASE_URL must start with sqlite:/// or postgresql://, got {redacted(url)!r}")
    database_proxy.initialize(database)
    return database


def is_sqlite(database: peewee.Database) -> bool:
    return isinstance(database, peewee.SqliteDatabase)


def redacted(database_url: str) -> str:
    """The URL with its password replaced, fit for a message or a log line."""
    parts = urlsplit(database_url)
    if not parts.password:
        return database_url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
