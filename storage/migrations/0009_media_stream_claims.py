"""One row per media stream admitted, so that a stream token opens one stream only, whichever of
many processes sharing the database it reaches."""

import peewee

from storage.migrations._steps import CreateTables, FrozenModel


class MediaStreamClaim(FrozenModel):
    call_sid = peewee.CharField(max_length=64, primary_key=True)
    claimed_at = peewee.DateTimeField()

    class Meta:
        table_name = "media_stream_claims"


def forward(migrator):
    return [CreateTables(migrator, MediaStreamClaim)]
