"""One row per phone number of a broadcast; deleting the broadcast deletes its recipients."""

import peewee

from storage.migrations._steps import CreateTables, FrozenModel, reference, server_default

ADOPTS_EXISTING_TABLE = "whatsapp_broadcast_recipients"


class WhatsappBroadcastRecipient(FrozenModel):
    # No index of its own: the unique (broadcast_id, phone) index serves lookups by broadcast.
    broadcast = peewee.ForeignKeyField(
        reference("whatsapp_broadcasts"), column_name="broadcast_id", on_delete="CASCADE", index=False
    )
    business = peewee.ForeignKeyField(reference("businesses"), column_name="business_id")
    phone = peewee.CharField(max_length=20)
    lead_id = peewee.CharField(max_length=64, null=True)
    status = peewee.CharField(max_length=20, constraints=server_default("'queued'"))
    error_message = peewee.TextField(null=True)
    message_id = peewee.CharField(max_length=200, null=True, index=True)
    attempts = peewee.IntegerField(constraints=server_default("0"))
    next_attempt_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField()
    sent_at = peewee.DateTimeField(null=True)
    delivered_at = peewee.DateTimeField(null=True)
    read_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "whatsapp_broadcast_recipients"
        indexes = (
            (("broadcast_id", "phone"), True),
            (("broadcast_id", "status"), False),
        )


def forward(migrator):
    return [CreateTables(migrator, WhatsappBroadcastRecipient)]
