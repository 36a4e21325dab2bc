"""The recipient CSV: headers in any order and case, BOM, Hebrew, national and international numbers."""

from __future__ import annotations

import pytest

from app.whatsapp.recipients import (
    PhoneNumberError,
    Recipient,
    RecipientFileError,
    RejectedRow,
    e164_phone,
    parse_recipients,
)


def parse(text: str, region: str = "IL"):
    return parse_recipients(text, region)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("0502345678", "+972502345678"),
        ("050-234-5678", "+972502345678"),
        ("+972 50 234 5678", "+972502345678"),
        ("00972502345678", "+972502345678"),
        ("972502345678", "+972502345678"),
        ("502345678", "+972502345678"),
        ("+1 (202) 555-0123", "+12025550123"),
        ("+44 7911 123456", "+447911123456"),
    ],
)
def test_national_and_international_numbers_become_e164(raw, expected):
    assert e164_phone(raw, "IL") == expected


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty"),
        ("call me", "not a phone number"),
        ("12345", "not a valid number for IL (+972)"),
        ("+1 202 555 01", "not a valid number for US (+1)"),
    ],
)
def test_bad_numbers_say_why(raw, reason):
    with pytest.raises(PhoneNumberError) as caught:
        e164_phone(raw, "IL")
    assert str(caught.value) == reason


def test_the_default_region_reads_national_numbers():
    assert e164_phone("(202) 555-0123", "US") == "+12025550123"
    with pytest.raises(PhoneNumberError):
        e164_phone("(202) 555-0123", "IL")


def test_a_bom_hebrew_names_crlf_and_columns_in_any_order_and_case():
    content = "\ufeffLead_ID,Name,PHONE\r\nL-1,דנה כהן,050-234-5678\r\nL-2,יוסי,+972523456789\r\n".encode()

    parsed = parse_recipients(content, "IL")

    assert parsed.recipients == [
        Recipient(2, "+972502345678", "דנה כהן", "L-1"),
        Recipient(3, "+972523456789", "יוסי", "L-2"),
    ]
    assert parsed.rejected == []


def test_only_a_phone_column_is_needed():
    parsed = parse("phone\n0502345678\n")

    assert parsed.recipients == [Recipient(2, "+972502345678")]


def test_bad_rows_are_reported_with_spreadsheet_line_numbers_and_good_rows_kept():
    content = 'name,phone\nדנה,0502345678\n"two\nlines",abc\n,\nרון,\nיעל,0523456789\n'

    parsed = parse(content)

    assert [recipient.phone for recipient in parsed.recipients] == ["+972502345678", "+972523456789"]
    assert parsed.recipients[1].line == 6
    assert parsed.rejected == [
        RejectedRow(3, "abc", "not a phone number"),
        RejectedRow(5, "", "empty"),
    ]


def test_duplicates_after_normalisation_merge_into_the_first_and_are_reported():
    content = "phone,name\n050-234-5678,First\n+972 50 234 5678,Second\n0523456789,Other\n972502345678,Third\n"

    parsed = parse(content)

    assert parsed.recipients == [Recipient(2, "+972502345678", "First"), Recipient(4, "+972523456789", "Other")]
    assert parsed.rejected == [
        RejectedRow(3, "+972 50 234 5678", "duplicate of line 2"),
        RejectedRow(5, "972502345678", "duplicate of line 2"),
    ]


def test_semicolon_files_from_spreadsheets_are_read():
    parsed = parse("name;phone\nדנה;0502345678\n")

    assert parsed.recipients == [Recipient(2, "+972502345678", "דנה")]


def test_a_too_long_lead_id_rejects_the_row():
    parsed = parse(f"phone,lead_id\n0502345678,{'x' * 65}\n")

    assert parsed.recipients == []
    assert [(row.line, row.reason) for row in parsed.rejected] == [(2, "lead_id longer than 64 characters")]


def test_a_header_only_file_has_no_recipients_and_no_rejections():
    assert parse("phone,name\r\n") == parse_recipients(b"phone,name\r\n\r\n", "IL")
    assert parse("phone,name\r\n").recipients == []


@pytest.mark.parametrize(
    "content", ["", "   \n", "\ufeff", b"\xef\xbb\xbf\r\n"], ids=["empty", "blank", "bom", "bom-bytes"]
)
def test_an_empty_file_is_an_error(content):
    with pytest.raises(RecipientFileError, match="is empty"):
        parse_recipients(content, "IL")


@pytest.mark.parametrize(
    "content, shown",
    [
        ("name,lead_id\nדנה,L-1\n", "'name', 'lead_id'"),
        ("0502345678,דנה\n0523456789,יוסי\n", "'0502345678', 'דנה'"),
    ],
    ids=["missing-column", "headerless"],
)
def test_a_file_without_a_phone_header_is_an_error_that_shows_the_first_row(content, shown):
    with pytest.raises(RecipientFileError) as caught:
        parse(content)
    assert "header with a phone column" in str(caught.value)
    assert shown in str(caught.value)


def test_two_phone_columns_are_an_error():
    with pytest.raises(RecipientFileError, match="more than one 'phone' column"):
        parse("phone,Phone\n0502345678,0523456789\n")


def test_a_file_that_is_not_utf8_is_an_error():
    with pytest.raises(RecipientFileError, match="not UTF-8"):
        parse_recipients("name,phone\nדנה,0502345678\n".encode("cp1255"), "IL")
