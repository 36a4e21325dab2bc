"""A short history of a few rows of signal, appended to in chunks: the echo gate's streaming buffers."""

from __future__ import annotations

import numpy as np


class RowHistory:
    """At least the last `length` columns of `rows` rows, oldest first in `values[:, :end]`.

    The buffer is twice as long as the history and trimmed in bulk, so an append is one copy.
    """

    def __init__(self, rows: int, length: int) -> None:
        self.length = length
        self.values = np.zeros((rows, 2 * length))
        self.end = length

    def append(self, columns: np.ndarray) -> None:
        """Add `columns` (rows x width, width <= length) after the newest column."""
        end = self.end
        width = columns.shape[1]
        if end + width > self.values.shape[1]:
            self.values[:, : self.length] = self.values[:, end - self.length:end]
            end = self.length
        self.values[:, end:end + width] = columns
        self.end = end + width
