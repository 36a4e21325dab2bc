"""Records the database could not take, kept on disk as JSON lines until it can.

Each writer of each process appends to its own file (`<kind>.<instance>.jsonl`), so processes
sharing a directory never write into one file; at start a writer claims every file of its kind
that another instance left behind. All functions block: call them through `trio.to_thread`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import uuid
from datetime import datetime
from pathlib import Path

from app.logs import log_event
from storage.records import (
    CallEnded, CallEventRecord, CallRecord, CallStarted, TranscriptTurnRecord, WhatsappStatusRecord,
)

logger = logging.getLogger(__name__)

RECORD_TYPES = {kind.__name__: kind for kind in (
    CallStarted, CallEventRecord, TranscriptTurnRecord, CallEnded, WhatsappStatusRecord)}
_DATETIME_KEY = "$datetime"


class SpillError(ValueError):
    """A spill file line that is not a record we wrote."""


def encode_record(record: CallRecord) -> str:
    """One JSON line naming the record's type; datetimes keep their offset."""
    return json.dumps({"type": type(record).__name__, "fields": dataclasses.asdict(record)},
                      default=_encode_datetime, ensure_ascii=False)


def decode_record(line: str) -> CallRecord:
    try:
        value = json.loads(line, object_hook=_decode_datetime)
        return RECORD_TYPES[value["type"]](**value["fields"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SpillError(f"not a spilled record: {type(error).__name__}: {error}") from None


def _encode_datetime(value: object) -> object:
    if isinstance(value, datetime):
        return {_DATETIME_KEY: value.isoformat()}
    raise TypeError(f"{type(value).__name__} cannot be spilled")


def _decode_datetime(value: dict) -> object:
    if set(value) == {_DATETIME_KEY}:
        return datetime.fromisoformat(value[_DATETIME_KEY])
    return value


def _host_name() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: they separate a file name's parts


def _owner_is_alive(file_name: str) -> bool:
    """Whether the instance that names this file is a running process on this host."""
    parts = file_name.split(".")[1].rsplit("-", 2) if file_name.count(".") >= 2 else []
    if len(parts) != 3 or parts[0] != _host_name() or not parts[1].isdigit():
        return False
    if int(parts[1]) == os.getpid():
        return False  # an earlier run under our pid (a restarted container): not us, so dead
    try:
        os.kill(int(parts[1]), 0)  # pragma: no mutate (signal 1 there would hang up a live process)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, run by another user
    return True


class SpillFile:
    """One writer's spill file: records appended in submission order, taken back oldest first."""

    def __init__(self, directory: Path, kind: str, instance: str | None = None) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.instance = instance or f"{_host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = self.directory / f"{kind}.{self.instance}.jsonl"

    def append(self, records: list[CallRecord]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.writelines(encode_record(record) + "\n" for record in records)
            file.flush()
            os.fsync(file.fileno())

    def prepend(self, records: list[CallRecord]) -> None:
        """Put `records` ahead of what the file holds: they are older than everything spilled."""
        self._replace([encode_record(record) + "\n" for record in records] + self._lines())

    def take(self, limit: int) -> list[CallRecord]:
        """Remove and return the oldest `limit` records (a line that does not decode is logged and dropped)."""
        lines = self._lines()
        taken, kept = lines[:limit], lines[limit:]
        self._replace(kept)
        return [record for record in map(self._decoded_or_none, taken) if record is not None]

    def is_empty(self) -> bool:
        return not self.path.exists() or self.path.stat().st_size == 0

    def claim_leftovers(self) -> int:
        """Move every other spill file of this kind in the directory into ours; returns the lines moved.

        A rename claims a file, so two processes starting at once never replay one file twice; the
        files of a live process on this host are its own.
        """
        if not self.directory.is_dir():
            return 0
        moved = 0
        for other in sorted(self.directory.glob(f"{self.kind}.*")):
            if other == self.path or _owner_is_alive(other.name):
                continue
            if other.name.endswith(".staged"):
                other.unlink(missing_ok=True)  # a rewrite cut short: the file it would have replaced is intact
                continue
            claimed = self.path.with_name(f"{self.path.name}.claiming")
            try:
                other.rename(claimed)
            except FileNotFoundError:
                continue  # another process claimed it first
            lines = claimed.read_text(encoding="utf-8").splitlines(keepends=True)
            self._replace(self._lines() + [line if line.endswith("\n") else line + "\n" for line in lines])
            claimed.unlink()
            moved += len(lines)
        return moved

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return self.path.read_text(encoding="utf-8").splitlines(keepends=True)

    def _replace(self, lines: list[str]) -> None:
        """Write the file anew through a rename, so a crash leaves the old file or the new one."""
        if not lines:
            self.path.unlink(missing_ok=True)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f"{self.path.name}.staged")
        with staged.open("w", encoding="utf-8") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
        staged.replace(self.path)

    def _decoded_or_none(self, line: str) -> CallRecord | None:
        try:
            return decode_record(line)
        except SpillError as error:
            # A crash mid-append leaves a partial last line; what it held cannot be known.
            log_event(logger, "-", "STORAGE", "spilled line unreadable; dropped",
                      level=logging.ERROR, file=str(self.path), error=str(error))
            return None
