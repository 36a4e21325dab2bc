"""The migration runner on a fresh, an older, a legacy, a tampered and a contended database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from storage.migrate import (
    ADOPTED,
    APPLIED,
    CHANGED,
    PENDING,
    UNKNOWN,
    MigrationError,
    MigrationStatus,
    _checksum,
    apply_migrations,
    load_migrations,
    migration_status,
)
from storage.models import Business, WhatsappBroadcast, WhatsappBroadcastRecipient, utc_now
from tests.storage_fixtures import (  # noqa: F401 (fixtures)
    create_legacy_tables,
    database,
    database_url,
    migrations_package,
    snapshot,
    table_rows,
)

ALL_NAMES = [migration.name for migration in load_migrations()]
# Migrations a test adds after the real ones, numbered to follow whatever the last real one is.
BROKEN_NAME = f"{len(ALL_NAMES) + 1:04d}_broken"
SLOW_NAME = f"{len(ALL_NAMES) + 1:04d}_slow"
CALLGATE_TABLES = {
    "businesses", "whatsapp_broadcasts", "whatsapp_broadcast_recipients",
    "calls", "call_events", "transcript_turns", "media_stream_claims", "schema_migrations",
}

BROKEN_MIGRATION = '''
import peewee

from storage.migrations._steps import CreateTables, FrozenModel


class Region(FrozenModel):
    name = peewee.CharField()

    class Meta:
        table_name = "regions"


def forward(migrator):
    return [
        CreateTables(migrator, Region),
        migrator.add_column("businesses", "region", peewee.CharField(null=True)),
        migrator.add_column("no_such_table", "region", peewee.CharField(null=True)),
    ]
'''

# Sleeps inside its transaction, so a starter that did not wait on the lock would collide with it.
SLOW_MIGRATION = '''
import time

import peewee

from storage.migrations._steps import CreateTables, FrozenModel


class Marker(FrozenModel):
    note = peewee.CharField()

    class Meta:
        table_name = "concurrency_markers"


class Pause:
    def run(self):
        time.sleep(0.3)


def forward(migrator):
    return [Pause(), CreateTables(migrator, Marker)]
'''

MIGRATE_IN_A_PROCESS = """
import json, os, sys, time
from storage.db import open_database
from storage.migrate import apply_migrations, load_migrations
database_url, package, gate = sys.argv[1:]
migrations = load_migrations(package)
database = open_database(database_url)
print("ready", flush=True)
while not os.path.exists(gate):
    time.sleep(0.005)
print(json.dumps([outcome.name for outcome in apply_migrations(database, migrations=migrations)]))
"""


def test_a_fresh_database_gets_every_migration_recorded_once(database):
    outcomes = apply_migrations(database)

    assert [(outcome.name, outcome.how) for outcome in outcomes] == [(name, APPLIED) for name in ALL_NAMES]
    assert CALLGATE_TABLES <= set(database.get_tables())
    recorded = database.execute_sql("SELECT id, name, checksum, how FROM schema_migrations ORDER BY id").fetchall()
    assert recorded == [(m.id, m.name, m.checksum, APPLIED) for m in load_migrations()]


def test_a_second_run_is_a_no_op(database):
    apply_migrations(database)
    before = snapshot(database)

    assert apply_migrations(database) == []
    assert snapshot(database) == before


def test_a_dry_run_reports_the_plan_and_changes_nothing(database):
    apply_migrations(database, migrations=load_migrations()[:2])
    before = snapshot(database)

    planned = apply_migrations(database, dry_run=True)

    assert [(outcome.name, outcome.how) for outcome in planned] == [(name, APPLIED) for name in ALL_NAMES[2:]]
    assert snapshot(database) == before


def test_a_dry_run_on_a_legacy_database_plans_to_adopt_its_tables(database):
    create_legacy_tables(database, with_recipients=True, with_stop_columns=False)

    planned = {outcome.name: outcome.how for outcome in apply_migrations(database, dry_run=True)}

    assert planned["0001_businesses"] == planned["0002_whatsapp_broadcasts"] == ADOPTED
    assert planned["0004_broadcast_stop_columns"] == APPLIED


def test_the_status_lists_every_migration_with_its_state_and_when_it_was_applied(database, migrations_package):
    assert migration_status(database) == [MigrationStatus(m.id, m.name, PENDING) for m in load_migrations()]
    newer = load_migrations(migrations_package(extra={f"{SLOW_NAME}.py": SLOW_MIGRATION}))
    apply_migrations(database, migrations=newer)
    applied_at = dict(database.execute_sql("SELECT id, applied_at FROM schema_migrations").fetchall())

    statuses = migration_status(database)

    assert all(status.applied_at is not None for status in statuses)
    assert [(status.id, status.name, status.state) for status in statuses] == [
        (m.id, m.name, APPLIED) for m in load_migrations()] + [(newer[-1].id, SLOW_NAME, UNKNOWN)]
    assert [str(status.applied_at)[:19] for status in statuses] == [str(applied_at[s.id])[:19] for s in statuses]


def test_a_checkout_with_crlf_line_endings_has_the_same_checksum(tmp_path):
    (tmp_path / "lf.py").write_bytes(b"def forward(migrator):\n    return []\n")
    (tmp_path / "crlf.py").write_bytes(b"def forward(migrator):\r\n    return []\r\n")
    (tmp_path / "edited.py").write_bytes(b"def forward(migrator):\n    return [] \n")

    assert _checksum(str(tmp_path / "crlf.py")) == _checksum(str(tmp_path / "lf.py"))
    assert _checksum(str(tmp_path / "edited.py")) != _checksum(str(tmp_path / "lf.py"))


def test_two_migrations_with_one_number_are_refused_by_name(migrations_package):
    number = len(ALL_NAMES) + 1
    package = migrations_package(extra={f"{number:04d}_first.py": SLOW_MIGRATION, f"{number:04d}_second.py": SLOW_MIGRATION})

    with pytest.raises(MigrationError) as caught:
        load_migrations(package)

    assert str(caught.value) == (
        f"migration {number:04d}_second: has the same number as {number:04d}_first; renumber one of them")


@pytest.mark.parametrize(
    "stopped_before", ["0004_broadcast_stop_columns", "0005_call_records", "0006_broadcast_sending"]
)
def test_an_upgrade_from_an_older_database_keeps_its_rows(database, stopped_before):
    migrations = load_migrations()
    applied_count = ALL_NAMES.index(stopped_before)
    apply_migrations(database, migrations=migrations[:applied_count])
    create_rows = [
        "INSERT INTO businesses (id, name, created_at) VALUES (1, 'Acme', '2025-01-02 03:04:05')",
        "INSERT INTO whatsapp_broadcasts (id, business_id, name, created_at) "
        "VALUES (1, 1, 'Launch', '2025-01-02 03:04:05')",
        "INSERT INTO whatsapp_broadcast_recipients (broadcast_id, business_id, phone, created_at) "
        "VALUES (1, 1, '+15550001111', '2025-01-02 03:04:05')",
    ]
    for statement in create_rows:
        database.execute_sql(statement)
    recipient_columns = ["broadcast_id", "phone", "status", "attempts"]
    rows_before = table_rows(database, "whatsapp_broadcast_recipients", recipient_columns)

    outcomes = apply_migrations(database, migrations=migrations)

    assert [outcome.name for outcome in outcomes] == ALL_NAMES[applied_count:]
    broadcast = WhatsappBroadcast.get_by_id(1)
    assert (broadcast.name, broadcast.status, broadcast.stopped_at) == ("Launch", "pending", None)
    assert table_rows(database, "whatsapp_broadcast_recipients", recipient_columns) == rows_before
    assert rows_before == [(1, "+15550001111", "queued", 0)]


def test_a_failing_migration_rolls_back_and_names_itself(database, migrations_package):
    migrations = load_migrations(migrations_package(extra={f"{BROKEN_NAME}.py": BROKEN_MIGRATION}))
    apply_migrations(database, migrations=migrations[:-1])
    Business.create(name="Acme")
    before = snapshot(database)

    with pytest.raises(MigrationError) as caught:
        apply_migrations(database, migrations=migrations)

    assert caught.value.migration_name == BROKEN_NAME
    assert str(caught.value).startswith(f"migration {BROKEN_NAME}: failed and was rolled back")
    assert snapshot(database) == before
    assert migration_status(database, migrations=migrations)[-1].state == PENDING


def test_an_edited_applied_migration_is_refused_before_anything_is_applied(database, migrations_package):
    apply_migrations(database)
    edited = load_migrations(migrations_package(
        edit={"0002_whatsapp_broadcasts.py": "\n# a late edit\n"},
        extra={f"{SLOW_NAME}.py": SLOW_MIGRATION},
    ))
    before = snapshot(database)

    with pytest.raises(MigrationError) as caught:
        apply_migrations(database, migrations=edited)

    assert caught.value.migration_name == "0002_whatsapp_broadcasts"
    recorded = next(m for m in load_migrations() if m.name == "0002_whatsapp_broadcasts").checksum
    now = next(m for m in edited if m.name == "0002_whatsapp_broadcasts").checksum
    assert str(caught.value) == (
        f"migration 0002_whatsapp_broadcasts: was edited after it was applied (recorded checksum {recorded[:12]}, "
        f"file now {now[:12]}); restore the file and put the change in a new migration")
    assert snapshot(database) == before
    states = {status.name: status.state for status in migration_status(database, migrations=edited)}
    assert states["0002_whatsapp_broadcasts"] == CHANGED


def test_a_database_from_a_newer_version_is_refused(database, migrations_package):
    apply_migrations(database, migrations=load_migrations(migrations_package(extra={f"{SLOW_NAME}.py": SLOW_MIGRATION})))

    with pytest.raises(MigrationError) as caught:
        apply_migrations(database)

    assert str(caught.value) == (
        f"migration {SLOW_NAME}: is recorded in schema_migrations but this version of callgate does not have it; "
        "run the callgate version that applied it, or a newer one")


@pytest.mark.parametrize(
    "with_recipients, with_stop_columns",
    [(False, False), (True, False), (True, True)],
    ids=["broadcasts-only", "both-tables", "stop-columns-already-bolted-on"],
)
def test_a_legacy_database_is_adopted_without_losing_rows(database, with_recipients, with_stop_columns):
    create_legacy_tables(database, with_recipients=with_recipients, with_stop_columns=with_stop_columns)
    broadcast_columns = ["id", "business_id", "name", "template_name", "audience_filter", "status", "sent_count"]
    broadcasts_before = table_rows(database, "whatsapp_broadcasts", broadcast_columns)
    recipient_columns = ["broadcast_id", "phone", "status", "message_id"]
    recipients_before = []
    if with_recipients:
        recipients_before = table_rows(database, "whatsapp_broadcast_recipients", recipient_columns)

    outcomes = {outcome.name: outcome.how for outcome in apply_migrations(database)}

    assert outcomes == {
        "0001_businesses": ADOPTED,
        "0002_whatsapp_broadcasts": ADOPTED,
        "0003_whatsapp_broadcast_recipients": ADOPTED if with_recipients else APPLIED,
        **{name: APPLIED for name in ALL_NAMES[3:]},
    }
    assert table_rows(database, "whatsapp_broadcasts", broadcast_columns) == broadcasts_before
    assert table_rows(database, "whatsapp_broadcast_recipients", recipient_columns) == recipients_before
    assert apply_migrations(database) == []


def test_an_adopted_broadcast_table_gets_the_stop_columns_and_works_with_the_models(database):
    create_legacy_tables(database, with_recipients=False)
    apply_migrations(database)

    broadcast = WhatsappBroadcast.get_by_id(3)
    broadcast.stopped_by, broadcast.stopped_at = "ops@example.com", utc_now()
    broadcast.save()
    WhatsappBroadcastRecipient.create(broadcast=broadcast, business=7, phone="+972501234567")

    reloaded = WhatsappBroadcast.get_by_id(3)
    assert (reloaded.name, reloaded.audience_filter) == ("מבצע אביב", {"tag": "vip"})
    assert reloaded.stopped_by == "ops@example.com"
    assert [recipient.status for recipient in reloaded.recipients] == ["queued"]


def test_processes_migrating_at_once_apply_each_migration_exactly_once(
    database, database_url, migrations_package, tmp_path
):
    package = migrations_package(extra={f"{SLOW_NAME}.py": SLOW_MIGRATION})
    gate = tmp_path / "go"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_IN_A_PROCESS, database_url, package, str(gate)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        )
        for _ in range(3)
    ]
    for process in processes:
        assert process.stdout.readline().strip() == "ready"
    gate.touch()
    results = [process.communicate(timeout=60) for process in processes]

    assert [process.returncode for process in processes] == [0, 0, 0], [stderr for _, stderr in results]
    applied_by_each = [json.loads(stdout) for stdout, _ in results]
    every_name = ALL_NAMES + [SLOW_NAME]
    assert sorted(name for names in applied_by_each for name in names) == sorted(every_name)
    recorded = database.execute_sql("SELECT name FROM schema_migrations ORDER BY id").fetchall()
    assert [name for name, in recorded] == every_name


def test_an_upgrade_from_0007_keeps_the_calls_and_takes_numbers_of_any_length(database):
    migrations = load_migrations()
    apply_migrations(database, migrations=migrations[:ALL_NAMES.index("0008_call_numbers_as_text")])
    database.execute_sql("INSERT INTO calls (call_sid, stream_sid, from_number, to_number, started_at) "
                         "VALUES ('CA1', 'MZ1', '+972501234567', '+15550001111', '2025-01-02 03:04:05')")
    sip_caller = "sip:+14155550100@callgate-test.sip.us1.twilio.com;transport=tls"

    upgrade = migrations[:ALL_NAMES.index("0008_call_numbers_as_text") + 1]
    assert [outcome.name for outcome in apply_migrations(database, migrations=upgrade)] == [
        "0008_call_numbers_as_text"]

    database.execute_sql("INSERT INTO calls (call_sid, stream_sid, from_number, to_number, started_at) "
                         f"VALUES ('CA2', 'MZ2', '{sip_caller}', '{sip_caller}', '2025-01-02 03:04:06')")
    assert table_rows(database, "calls", ["call_sid", "from_number"]) == [
        ("CA1", "+972501234567"), ("CA2", sip_caller)]
