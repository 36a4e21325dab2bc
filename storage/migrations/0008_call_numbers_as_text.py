"""A call's numbers hold whatever the carrier sends: a SIP caller id (`sip:+14155550100@x.pstn.twilio.com`)
is longer than the 32 characters 0005 allowed, and on PostgreSQL it failed the call's first record and
so all the others. SQLite never enforced the length, so it has nothing to change.
"""

from storage.db import is_sqlite
from storage.migrations._steps import ExecuteSQL


def forward(migrator):
    if is_sqlite(migrator.database):
        return []
    return [ExecuteSQL(migrator, 'ALTER TABLE "calls" ALTER COLUMN "from_number" TYPE text, '
                                 'ALTER COLUMN "to_number" TYPE text')]
