"""What crash-safe, rate-limited sending by several workers needs.

Recipients get a lease (`claimed_by`, `lease_expires_at`): a `sending` row whose lease expired
became `unknown` in a crash and is never resent by default. The claim index serves both the
claim (broadcast, `queued`) and the sweep of expired leases (broadcast, `sending`, lease < now);
it makes the old (broadcast_id, status) index a redundant prefix, so that one goes.

Broadcasts get `send_slot_at`, the next free send slot shared by every worker: a worker reserves
`max(send_slot_at, now) + k / rate_per_second` for its batch in the claim's transaction, so the
rate holds across workers. The counters are a funnel kept in the same transaction as each
recipient's status change (sent counts sent, delivered and read rows); the new ones start
equal to the rows, and adopted tables get the indexes their old system never made.
"""

import peewee

from storage.migrations._steps import (
    ExecuteSQL,
    add_missing_columns,
    add_missing_counters,
    add_missing_index,
    drop_indexes_on,
)

RECIPIENTS = "whatsapp_broadcast_recipients"
BROADCASTS = "whatsapp_broadcasts"
CLAIM_COLUMNS = ("broadcast_id", "status", "lease_expires_at")

BACKFILL_COUNTERS = """
UPDATE whatsapp_broadcasts SET
    delivered_count = (SELECT COUNT(*) FROM whatsapp_broadcast_recipients AS recipient
                       WHERE recipient.broadcast_id = whatsapp_broadcasts.id
                       AND recipient.status IN ('delivered', 'read')),
    read_count = (SELECT COUNT(*) FROM whatsapp_broadcast_recipients AS recipient
                  WHERE recipient.broadcast_id = whatsapp_broadcasts.id AND recipient.status = 'read'),
    unknown_count = (SELECT COUNT(*) FROM whatsapp_broadcast_recipients AS recipient
                     WHERE recipient.broadcast_id = whatsapp_broadcasts.id AND recipient.status = 'unknown')
"""


def forward(migrator):
    return [
        *add_missing_columns(
            migrator,
            RECIPIENTS,
            name=peewee.CharField(max_length=200, null=True),
            claimed_by=peewee.CharField(max_length=100, null=True),
            lease_expires_at=peewee.DateTimeField(null=True),
            error_code=peewee.IntegerField(null=True),
        ),
        *add_missing_columns(
            migrator,
            BROADCASTS,
            template_language=peewee.CharField(max_length=20, null=True),
            paused_reason=peewee.TextField(null=True),
            rate_per_second=peewee.FloatField(null=True),
            send_slot_at=peewee.DateTimeField(null=True),
        ),
        *add_missing_counters(migrator, BROADCASTS, "delivered_count", "read_count", "unknown_count"),
        ExecuteSQL(migrator, BACKFILL_COUNTERS),
        *add_missing_index(migrator, RECIPIENTS, f"{RECIPIENTS}_claim", CLAIM_COLUMNS),
        *drop_indexes_on(migrator, RECIPIENTS, ("broadcast_id", "status")),
        *add_missing_index(migrator, RECIPIENTS, f"{RECIPIENTS}_message_id", ("message_id",)),
        *add_missing_index(migrator, BROADCASTS, f"{BROADCASTS}_status", ("status",)),
    ]
