"""Opening the database: SQLite settings, the models' proxy, unsupported URLs."""

from __future__ import annotations

import pytest

from storage.db import database_proxy, open_database, redacted
from tests.storage_fixtures import PG_REQUIRED_VARIABLE, PG_URL_VARIABLE, database, database_url  # noqa: F401 (fixtures)
from tests.storage_fixtures import postgres_server_url


def test_sqlite_is_opened_with_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'callgate.db'}")

    settings = [
        database.execute_sql(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "foreign_keys", "busy_timeout")
    ]

    assert settings == ["wal", 1, 10_000]
    database.close()


def test_the_models_use_the_database_opened_last(database):
    assert database_proxy.obj is database


def test_an_unsupported_url_is_refused_without_showing_its_password():
    with pytest.raises(ValueError, match=r"got 'mysql://app:\*\*\*@db/callgate'"):
        open_database("mysql://app:hunter2@db/callgate")


def test_redacted_leaves_a_url_without_password_alone():
    assert redacted("sqlite:///callgate.db") == "sqlite:///callgate.db"
    assert redacted("postgresql://app:s3cret@db:5432/callgate") == "postgresql://app:***@db:5432/callgate"


def test_the_postgresql_cases_skip_without_a_server_and_fail_where_one_is_required():
    with pytest.raises(pytest.skip.Exception):
        postgres_server_url({})
    with pytest.raises(pytest.fail.Exception, match=PG_URL_VARIABLE):
        postgres_server_url({PG_REQUIRED_VARIABLE: "1"})
    assert postgres_server_url({PG_URL_VARIABLE: "postgresql://db/x"}) == "postgresql://db/x"
