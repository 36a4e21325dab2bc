"""`callgate migrate [--list | --dry-run]`: what it prints and the status it returns."""

from __future__ import annotations

import io

from storage.commands import migrate_command
from storage.db import open_database
from storage.migrate import load_migrations
from tests.storage_fixtures import create_legacy_tables, database_url  # noqa: F401 (fixtures)

ALL_NAMES = [migration.name for migration in load_migrations()]


def run_migrate(database_url: str, *, list_only: bool = False, dry_run: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = migrate_command(database_url, list_only=list_only, dry_run=dry_run, out=out)
    return status, out.getvalue().splitlines()


def tables_in(database_url: str) -> list[str]:
    database = open_database(database_url)
    try:
        return database.get_tables()
    finally:
        database.close()


def test_list_on_a_fresh_database_shows_every_migration_pending(database_url):
    status, lines = run_migrate(database_url, list_only=True)

    assert status == 0
    assert [line.split() for line in lines] == [[name, "pending"] for name in ALL_NAMES]
    assert tables_in(database_url) == []


def test_dry_run_says_what_it_would_apply_and_changes_nothing(database_url):
    status, lines = run_migrate(database_url, dry_run=True)

    assert status == 0
    assert lines == [f"would apply {name}" for name in ALL_NAMES]
    assert tables_in(database_url) == []


def test_dry_run_on_a_legacy_database_says_what_it_would_adopt(database_url):
    database = open_database(database_url)
    create_legacy_tables(database, with_recipients=True)
    database.close()

    status, lines = run_migrate(database_url, dry_run=True)

    assert status == 0
    assert lines == [
        "would adopt 0001_businesses",
        "would adopt 0002_whatsapp_broadcasts",
        "would adopt 0003_whatsapp_broadcast_recipients",
        *(f"would apply {name}" for name in ALL_NAMES[3:]),
    ]


def test_migrate_applies_then_reports_the_database_up_to_date(database_url):
    first_status, first_lines = run_migrate(database_url)
    second_status, second_lines = run_migrate(database_url)
    list_status, list_lines = run_migrate(database_url, list_only=True)

    assert (first_status, second_status, list_status) == (0, 0, 0)
    assert first_lines == [f"applied {name}" for name in ALL_NAMES]
    assert second_lines == ["nothing to apply: the database is up to date"]
    assert [line.split()[:2] for line in list_lines] == [[name, "applied"] for name in ALL_NAMES]
    assert all(line.endswith(" UTC") for line in list_lines)


def test_an_edited_migration_fails_migrate_and_list_naming_it(database_url):
    run_migrate(database_url)
    database = open_database(database_url)
    database.execute_sql("UPDATE schema_migrations SET checksum = 'feedface' WHERE id = 2")
    database.close()

    status, lines = run_migrate(database_url)
    list_status, list_lines = run_migrate(database_url, list_only=True)

    assert status == 1
    assert lines[-1].startswith("error: migration 0002_whatsapp_broadcasts: was edited after it was applied")
    assert list_status == 1
    assert list_lines[1].split()[:2] == ["0002_whatsapp_broadcasts", "changed"]
    assert list_lines[-1].startswith("error: migration 0002_whatsapp_broadcasts is edited since it was applied")


def test_an_unusable_database_url_exits_2_with_the_reason(tmp_path):
    unsupported_status, unsupported_lines = run_migrate("mysql://root:secret@localhost/callgate")
    missing_status, missing_lines = run_migrate(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")

    assert unsupported_status == 2
    assert unsupported_lines == [
        "error: DATABASE_URL must start with sqlite:/// or postgresql://, got 'mysql://root:***@localhost/callgate'"
    ]
    assert missing_status == 2
    assert missing_lines[0].startswith("error: cannot use the database at sqlite:///")


def test_output_goes_to_stdout_as_it_is_when_called(database_url, capsys):
    status = migrate_command(database_url, list_only=True, dry_run=False)

    assert status == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [ALL_NAMES[0], "pending"]
