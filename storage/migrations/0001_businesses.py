"""The businesses that broadcasts and calls belong to."""

import peewee

from storage.migrations._steps import CreateTables, FrozenModel

ADOPTS_EXISTING_TABLE = "businesses"


class Business(FrozenModel):
    name = peewee.CharField(max_length=200)
    created_at = peewee.DateTimeField()

    class Meta:
        table_name = "businesses"


def forward(migrator):
    return [CreateTables(migrator, Business)]
