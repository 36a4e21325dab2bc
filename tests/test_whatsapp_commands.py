"""`callgate business create` and `callgate broadcast create|status|pause|resume|cancel` on a real database."""

from __future__ import annotations

import io
import json
from datetime import datetime

import pytest

from app.whatsapp.commands import (
    broadcast_cancel_command,
    broadcast_create_command,
    broadcast_pause_command,
    broadcast_resume_command,
    broadcast_status_command,
    business_create_command,
)
from storage.models import WhatsappBroadcast, WhatsappBroadcastRecipient, move_recipients, utc_now
from tests.storage_fixtures import database, database_url  # noqa: F401 (fixtures)

RECIPIENTS_CSV = (
    "\ufeffname,phone,lead_id\r\nדנה כהן,050-234-5678,L-1\r\nיוסי,+972523456789,\r\nבלי מספר,abc,\r\n"
)


def run(command, *args, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = command(*args, out=out, err=err, **kwargs)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def business_id(database_url):
    status, out, _ = run(business_create_command, database_url, "מספרת דנה")
    assert status == 0
    return int(out)


@pytest.fixture
def recipients_file(tmp_path):
    path = tmp_path / "recipients.csv"
    path.write_text(RECIPIENTS_CSV, encoding="utf-8")
    return path


def create(database_url, business_id, recipients_path, **message) -> tuple[int, str, str]:
    message = message or {"template": "spring_sale", "language": "he"}
    return run(
        broadcast_create_command, database_url, business_id=business_id, name="מבצע אביב",
        recipients_path=str(recipients_path), default_region="IL", as_json=True, **message,
    )


@pytest.fixture
def broadcast_id(database_url, business_id, recipients_file):
    status, out, _ = create(database_url, business_id, recipients_file)
    assert status == 0
    return json.loads(out)["id"]


def test_business_create_prints_each_new_id(database_url):
    first = run(business_create_command, database_url, "מספרת דנה")
    second = run(business_create_command, database_url, "Acme")

    assert (first[0], second[0]) == (0, 0)
    assert int(second[1]) == int(first[1]) + 1
    assert first[1].endswith("\n") and first[2] == ""


def test_business_create_refuses_an_empty_name(database_url):
    status, out, err = run(business_create_command, database_url, "  ")

    assert (status, out) == (2, "")
    assert err.startswith("error: the business name must be 1-200 characters")


def test_create_with_json_prints_the_id_recipients_and_rejected_rows(
    database_url, business_id, recipients_file, database
):
    status, out, err = create(database_url, business_id, recipients_file)

    assert (status, err) == (0, "")
    report = json.loads(out)
    assert report == {
        "id": report["id"], "recipients": 2, "rejected": [{"line": 4, "value": "abc", "reason": "not a phone number"}],
    }
    broadcast = WhatsappBroadcast.get_by_id(report["id"])
    assert (broadcast.status, broadcast.total_recipients, broadcast.business_id) == ("pending", 2, business_id)
    assert (broadcast.message_type, broadcast.template_name, broadcast.template_language) == (
        "template", "spring_sale", "he"
    )
    recipients = broadcast.recipients.order_by(WhatsappBroadcastRecipient.id)
    assert [(row.phone, row.name, row.lead_id, row.status) for row in recipients] == [
        ("+972502345678", "דנה כהן", "L-1", "queued"),
        ("+972523456789", "יוסי", None, "queued"),
    ]


def test_create_without_json_prints_plain_lines(database_url, business_id, recipients_file, database):
    status, out, _ = run(
        broadcast_create_command, database_url, business_id=business_id, name="Hello", text="שלום!",
        recipients_path=str(recipients_file), default_region="IL",
    )

    broadcast = WhatsappBroadcast.get()
    assert status == 0
    assert out.splitlines() == [
        f"broadcast {broadcast.id} created with 2 recipients, 1 rows rejected",
        "  line 4: 'abc': not a phone number",
    ]
    assert (broadcast.message_type, broadcast.message_text, broadcast.template_name) == ("text", "שלום!", None)


@pytest.mark.parametrize(
    "csv_text, business_offset, message, expected_error",
    [
        (RECIPIENTS_CSV, 1, {}, "no business with id"),
        (None, 0, {}, "cannot read the recipient file"),
        ("", 0, {}, "is empty"),
        ("0502345678,דנה\n", 0, {}, "header with a phone column"),
        ("name,lead_id\nדנה,L-1\n", 0, {}, "header with a phone column"),
        ("phone\nabc\n\n12345\n", 0, {}, "has no valid recipient (2 rows rejected: line 2: not a phone number"),
        (RECIPIENTS_CSV, 0, {"template": "spring_sale"}, "needs --lang CODE"),
        (RECIPIENTS_CSV, 0, {"text": "hi", "template": "spring_sale", "language": "he"}, "either --text"),
    ],
    ids=["unknown-business", "missing-file", "empty", "headerless", "no-phone-column", "no-valid-recipient",
         "template-without-language", "text-and-template"],
)
def test_a_refused_create_exits_2_and_writes_nothing(
    database_url, business_id, tmp_path, database, csv_text, business_offset, message, expected_error
):
    path = tmp_path / "recipients.csv"
    if csv_text is not None:
        path.write_text(csv_text, encoding="utf-8")

    status, out, err = create(database_url, business_id + business_offset, path, **message)

    assert (status, out) == (2, "")
    assert err.startswith("error: ") and expected_error in err
    assert WhatsappBroadcast.select().count() == 0
    assert WhatsappBroadcastRecipient.select().count() == 0


def test_status_counts_the_rows_and_shows_the_latest_errors_first(database_url, broadcast_id, database):
    recipient = WhatsappBroadcastRecipient
    first_row, second_row = recipient.select().where(recipient.broadcast == broadcast_id).order_by(recipient.id)
    move_recipients(broadcast_id, "queued", "sending", recipient.id == first_row.id)
    move_recipients(broadcast_id, "sending", "unknown", recipient.id == first_row.id,
                    error_message="worker lost while sending", error_at=datetime(2026, 11, 25, 9, 30, 5, 250000))
    move_recipients(broadcast_id, "queued", "failed", recipient.id == second_row.id,
                    error_code=131026, error_message="Message undeliverable")  # untimed, as before migration 0007

    status, out, _ = run(broadcast_status_command, database_url, broadcast_id, as_json=True)
    text_status, text_out, _ = run(broadcast_status_command, database_url, broadcast_id)

    report = json.loads(out)
    assert (status, text_status) == (0, 0)
    assert (report["id"], report["name"], report["status"]) == (broadcast_id, "מבצע אביב", "pending")
    assert report["counts"] == {
        "total": 2, "queued": 0, "claimed": 0, "sending": 0, "sent": 0, "delivered": 0, "read": 0, "failed": 1, "unknown": 1,
    }
    assert report["last_errors"] == [
        {"phone": first_row.phone, "error_code": None, "error_message": "worker lost while sending",
         "at": "2026-11-25T09:30:05"},
        {"phone": second_row.phone, "error_code": 131026, "error_message": "Message undeliverable", "at": None},
    ]
    assert text_out.splitlines() == [
        f"broadcast {broadcast_id} 'מבצע אביב': pending",
        "  total 2  queued 0  claimed 0  sending 0  sent 0  delivered 0  read 0  failed 1  unknown 1",
        "last errors:",
        f"  2026-11-25T09:30:05  {first_row.phone}  -  worker lost while sending",
        f"  -  {second_row.phone}  131026  Message undeliverable",
    ]


def test_status_of_an_unknown_broadcast_exits_2(database_url, business_id):
    status, out, err = run(broadcast_status_command, database_url, 404)

    assert (status, out, err) == (2, "", "error: no broadcast with id 404\n")


def test_pause_and_resume_a_pending_broadcast(database_url, broadcast_id, database):
    pause = run(broadcast_pause_command, database_url, broadcast_id, by="ops@example.com")
    paused = WhatsappBroadcast.get_by_id(broadcast_id)
    pause_again = run(broadcast_pause_command, database_url, broadcast_id)
    resume = run(broadcast_resume_command, database_url, broadcast_id)

    assert pause == (0, f"broadcast {broadcast_id} is now paused\n", "")
    assert (paused.status, paused.paused_reason) == ("paused", "paused by ops@example.com")
    assert pause_again == (0, f"broadcast {broadcast_id} is already paused\n", "")
    assert resume == (0, f"broadcast {broadcast_id} is now pending\n", "")
    resumed = WhatsappBroadcast.get_by_id(broadcast_id)
    assert (resumed.status, resumed.paused_reason) == ("pending", None)


def test_a_started_broadcast_resumes_running(database_url, broadcast_id, database):
    WhatsappBroadcast.update(status="running", started_at=utc_now()).execute()

    assert run(broadcast_pause_command, database_url, broadcast_id)[0] == 0
    assert run(broadcast_resume_command, database_url, broadcast_id)[1] == f"broadcast {broadcast_id} is now running\n"
    assert run(broadcast_resume_command, database_url, broadcast_id)[1] == (
        f"broadcast {broadcast_id} is already running\n"
    )


def test_cancel_records_who_and_when_and_the_broadcast_cannot_be_resumed(database_url, broadcast_id, database):
    before = utc_now()
    cancel = run(broadcast_cancel_command, database_url, broadcast_id, by="ops@example.com")
    resume = run(broadcast_resume_command, database_url, broadcast_id)
    pause = run(broadcast_pause_command, database_url, broadcast_id)

    cancelled = WhatsappBroadcast.get_by_id(broadcast_id)
    assert cancel == (0, f"broadcast {broadcast_id} is now cancelled\n", "")
    assert (cancelled.status, cancelled.stopped_by, cancelled.completed_at) == ("cancelled", "ops@example.com", None)
    assert cancelled.stopped_at >= before
    assert resume == (2, "", f"error: broadcast {broadcast_id} is cancelled: only a paused broadcast can be resumed\n")
    assert pause[0] == 2 and "is cancelled" in pause[2]


def test_cancel_without_by_records_the_os_user(database_url, broadcast_id, database, monkeypatch):
    monkeypatch.setenv("USER", "dana")
    monkeypatch.setenv("LOGNAME", "dana")

    assert run(broadcast_cancel_command, database_url, broadcast_id)[0] == 0
    assert WhatsappBroadcast.get_by_id(broadcast_id).stopped_by == "dana"


@pytest.mark.parametrize("command", [broadcast_cancel_command, broadcast_pause_command, broadcast_resume_command])
def test_a_completed_broadcast_cannot_be_paused_resumed_or_cancelled(database_url, broadcast_id, database, command):
    WhatsappBroadcast.update(status="completed", completed_at=utc_now()).execute()

    status, out, err = run(command, database_url, broadcast_id)

    assert (status, out) == (2, "")
    assert err.startswith(f"error: broadcast {broadcast_id} is completed: only a ")
    assert WhatsappBroadcast.get_by_id(broadcast_id).status == "completed"


def test_an_unusable_database_url_exits_2():
    status, out, err = run(business_create_command, "mysql://root:secret@localhost/callgate", "Acme")

    assert (status, out) == (2, "")
    assert "mysql://root:***@localhost/callgate" in err
