"""Who stopped a broadcast and when: bolted on later by the old system, so adopted tables may have them."""

import peewee

from storage.migrations._steps import add_missing_columns


def forward(migrator):
    return add_missing_columns(
        migrator,
        "whatsapp_broadcasts",
        stopped_by=peewee.CharField(max_length=200, null=True),
        stopped_at=peewee.DateTimeField(null=True),
    )
