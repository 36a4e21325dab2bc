"""A broadcast's recipient CSV, parsed: numbers in E.164, and every row left out with its reason.

Pure: text or bytes in, a RecipientList out. Lines are counted as a spreadsheet counts rows
(the header is line 1, a quoted cell spanning lines is one row). A number seen on an earlier
line is merged into it (the first row's name and lead id win) and reported as a duplicate, so
every data row is either a recipient or in `rejected`. Blank rows are skipped silently.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import phonenumbers

PHONE_COLUMN = "phone"
NAME_COLUMN = "name"
LEAD_ID_COLUMN = "lead_id"
NAME_MAX_LENGTH = 200
LEAD_ID_MAX_LENGTH = 64
# Spreadsheets in many locales save CSV with semicolons or tabs; the header tells which it is.
DELIMITERS = (",", ";", "\t")


class RecipientFileError(ValueError):
    """The file as a whole cannot be used: empty, not UTF-8, or no `phone` column in its header."""


class PhoneNumberError(ValueError):
    """One value is not a usable phone number; the message is the reason, fit for a report."""


@dataclass(frozen=True, slots=True)
class Recipient:
    line: int
    phone: str
    name: str | None = None
    lead_id: str | None = None


@dataclass(frozen=True, slots=True)
class RejectedRow:
    line: int
    value: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecipientList:
    recipients: list[Recipient]
    rejected: list[RejectedRow]


def parse_recipients(content: str | bytes, default_region: str) -> RecipientList:
    """Parse a recipient CSV; national numbers are read as numbers of `default_region` (e.g. "IL").

    Raises RecipientFileError when the file is empty, not UTF-8, or its first row is not a
    header naming a `phone` column (in any position, any case).
    """
    text = _decoded(content)
    if not text.strip():
        raise RecipientFileError("the recipient file is empty; it needs a header row with a phone column")
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    columns = _columns(next(rows))
    recipients: list[Recipient] = []
    rejected: list[RejectedRow] = []
    first_line_of_phone: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        outcome = _recipient(line, row, columns, default_region)
        if isinstance(outcome, RejectedRow):
            rejected.append(outcome)
        elif outcome.phone in first_line_of_phone:
            first_line = first_line_of_phone[outcome.phone]
            rejected.append(RejectedRow(line, _cell(row, columns[PHONE_COLUMN]), f"duplicate of line {first_line}"))
        else:
            first_line_of_phone[outcome.phone] = line
            recipients.append(outcome)
    return RecipientList(recipients, rejected)


def _decoded(content: str | bytes) -> str:
    if isinstance(content, str):
        return content.removeprefix("\ufeff")
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecipientFileError(
            f"the recipient file is not UTF-8 text (byte {error.start}); save it as \"CSV UTF-8\""
        ) from None


def _delimiter(text: str) -> str:
    header_line = text.splitlines()[0]
    return max(DELIMITERS, key=header_line.count)


def _columns(header: list[str]) -> dict[str, int]:
    """The position of each column we read; raises RecipientFileError without a single phone column."""
    names = [cell.strip().lower() for cell in header]
    positions = {
        column: [i for i, name in enumerate(names) if name == column]
        for column in (PHONE_COLUMN, NAME_COLUMN, LEAD_ID_COLUMN)
    }
    if not positions[PHONE_COLUMN]:
        shown = ", ".join(repr(cell.strip()) for cell in header)
        raise RecipientFileError(
            f"the recipient file's first row must be a header with a phone column; it has {shown}"
        )
    repeated = [name for name, found in positions.items() if len(found) > 1]
    if repeated:
        raise RecipientFileError(f"the recipient file's header has more than one {repeated[0]!r} column")
    return {name: found[0] for name, found in positions.items() if found}


def _cell(row: list[str], position: int | None) -> str:
    if position is None or position >= len(row):
        return ""
    return row[position].strip()


def _recipient(line: int, row: list[str], columns: dict[str, int], default_region: str) -> Recipient | RejectedRow:
    raw_phone = _cell(row, columns[PHONE_COLUMN])
    try:
        phone = e164_phone(raw_phone, default_region)
    except PhoneNumberError as error:
        return RejectedRow(line, raw_phone, str(error))
    name = _cell(row, columns.get(NAME_COLUMN))
    lead_id = _cell(row, columns.get(LEAD_ID_COLUMN))
    if len(name) > NAME_MAX_LENGTH:
        return RejectedRow(line, name, f"name longer than {NAME_MAX_LENGTH} characters")
    if len(lead_id) > LEAD_ID_MAX_LENGTH:
        return RejectedRow(line, lead_id, f"lead_id longer than {LEAD_ID_MAX_LENGTH} characters")
    return Recipient(line, phone, name or None, lead_id or None)


def e164_phone(raw_phone: str, default_region: str) -> str:
    """The number in E.164 ("+972501234567"); raises PhoneNumberError saying why it is not one.

    Digits that are no valid national number but are one with a "+" in front ("972501234567",
    as spreadsheets strip the plus) are read as international.
    """
    if not raw_phone:
        raise PhoneNumberError("empty")
    try:
        number = phonenumbers.parse(raw_phone, default_region)
    except phonenumbers.NumberParseException:
        raise PhoneNumberError("not a phone number") from None
    if not phonenumbers.is_valid_number(number) and raw_phone.isdigit():
        number = _as_international(raw_phone) or number
    if not phonenumbers.is_valid_number(number):
        region = phonenumbers.region_code_for_country_code(number.country_code)
        raise PhoneNumberError(f"not a valid number for {region} (+{number.country_code})")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _as_international(digits: str) -> phonenumbers.PhoneNumber | None:
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return None
    return number if phonenumbers.is_valid_number(number) else None
