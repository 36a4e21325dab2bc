"""A pytest plugin for mutation runs (`-p scripts.mutation_order`): a mutant's tests run fastest first.

mutmut stops a mutant at its first failing test, and records each test's duration in
mutmut-stats.json beside the tests it runs; without that record (its first, timing run) the order
is left alone. A mutant the quick unit tests kill no longer waits behind the end-to-end calls.
"""

from __future__ import annotations

import json
from pathlib import Path

STATS = Path("mutmut-stats.json")


def pytest_collection_modifyitems(items: list) -> None:
    if not STATS.exists():
        return
    durations = json.loads(STATS.read_text())["duration_by_test"]
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
