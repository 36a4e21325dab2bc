"""A stream token is spent once, whichever process asks first."""

from __future__ import annotations

from storage.migrate import apply_migrations
from storage.models import MediaStreamClaim, claim_media_stream
from tests.storage_fixtures import database, database_url  # noqa: F401 (fixtures)


def test_the_first_claim_of_a_call_wins_and_every_later_one_fails(database):
    apply_migrations(database)
    assert claim_media_stream(database, "CA1")
    assert not claim_media_stream(database, "CA1")
    assert claim_media_stream(database, "CA2")
    assert sorted(claim.call_sid for claim in MediaStreamClaim.select()) == ["CA1", "CA2"]
