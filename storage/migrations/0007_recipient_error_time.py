"""When each recipient's last error happened, so `broadcast status` lists the latest errors first.

Errors recorded before this column existed keep it NULL and are listed after the timed ones. The
index narrows that listing to one broadcast's rows (SQLite also reads them in error-time order).
"""

import peewee

from storage.migrations._steps import add_missing_columns, add_missing_index

RECIPIENTS = "whatsapp_broadcast_recipients"


def forward(migrator):
    return [
        *add_missing_columns(migrator, RECIPIENTS, error_at=peewee.DateTimeField(null=True)),
        *add_missing_index(migrator, RECIPIENTS, f"{RECIPIENTS}_errors", ("broadcast_id", "error_at")),
    ]
