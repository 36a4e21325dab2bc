"""WhatsApp broadcasts, as the seed's "Migration 44" made them (stop columns come in 0004)."""

import peewee

from storage.migrations._steps import CreateTables, FrozenModel, reference, server_default

ADOPTS_EXISTING_TABLE = "whatsapp_broadcasts"


class WhatsappBroadcast(FrozenModel):
    business = peewee.ForeignKeyField(reference("businesses"), column_name="business_id")
    name = peewee.CharField(max_length=200)
    provider = peewee.CharField(max_length=50, constraints=server_default("'meta'"))
    message_type = peewee.CharField(max_length=20, constraints=server_default("'template'"))
    template_id = peewee.CharField(max_length=100, null=True)
    template_name = peewee.CharField(max_length=200, null=True)
    message_text = peewee.TextField(null=True)
    audience_filter = peewee.TextField(null=True)
    status = peewee.CharField(max_length=20, index=True, constraints=server_default("'pending'"))
    total_recipients = peewee.IntegerField(constraints=server_default("0"))
    sent_count = peewee.IntegerField(constraints=server_default("0"))
    failed_count = peewee.IntegerField(constraints=server_default("0"))
    created_by = peewee.CharField(max_length=200, null=True)
    created_at = peewee.DateTimeField()
    started_at = peewee.DateTimeField(null=True)
    completed_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "whatsapp_broadcasts"


def forward(migrator):
    return [CreateTables(migrator, WhatsappBroadcast)]
