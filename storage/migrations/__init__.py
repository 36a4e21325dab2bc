"""Numbered schema migrations, applied in order by storage.migrate. Never edit one once released."""
