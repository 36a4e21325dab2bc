"""The command line as a user runs it: the main job, settings errors, and migrate."""

from __future__ import annotations

import json
import sqlite3

import pytest

from app.cli import main


def test_simulate_fast_runs_the_main_job_and_draws_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'callgate.db'}")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    plot_path = tmp_path / "call.png"
    assert main(["simulate", "--fast", "--plot", str(plot_path)]) == 0
    out = capsys.readouterr().out
    assert "caller talks during the greeting (must be ignored)" in out
    assert "server: Barge-in now ENABLED for rest of call" in out
    assert '"talk_over_ms":' in out
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_setting_is_a_clear_error_and_exit_status_2(monkeypatch, capsys):
    monkeypatch.setenv("CALLGATE_PORT", "abc")
    assert main(["serve"]) == 2
    assert "CALLGATE_PORT must be a whole number, got 'abc'" in capsys.readouterr().err


def test_migrate_applies_then_lists(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'm.db'}")
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["migrate", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "whatsapp" in listing.lower()


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["migrate", "--list", "--dry-run"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_serve_refuses_to_start_on_an_edited_migration(tmp_path, monkeypatch, capsys):
    database_path = tmp_path / "edited.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{database_path}")
    assert main(["migrate"]) == 0
    with sqlite3.connect(database_path) as connection:
        connection.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE id = 1")
    assert main(["serve", "--dev"]) == 1
    assert "start-up stopped" in capsys.readouterr().err


PRODUCTION = {"CALLGATE_TWILIO_AUTH_TOKEN": "token", "OPENAI_API_KEY": "sk-test", "CALLGATE_PUBLIC_HOST": "calls.example.com"}


@pytest.mark.parametrize("unset", [(), *PRODUCTION])
def test_serve_refuses_to_start_without_what_a_real_number_needs_unless_dev(tmp_path, monkeypatch, capsys, caplog,
                                                                          unset):
    database_path = tmp_path / "edited.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{database_path}")
    assert main(["migrate"]) == 0
    with sqlite3.connect(database_path) as connection:  # so that a serve that starts stops at once
        connection.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE id = 1")
    for name, value in PRODUCTION.items():
        if name not in unset:
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    if not unset:
        assert main(["serve"]) == 1 and "start-up stopped" in capsys.readouterr().err
        return
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"callgate: serve refuses to start without {unset}") and "serve --dev" in error
    assert main(["serve", "--dev"]) == 1
    assert f"call=- [SERVER] --dev: running without {unset}" in caplog.text


def test_broadcast_commands_are_wired(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'b.db'}")
    assert main(["business", "create", "Acme"]) == 0
    business_id = capsys.readouterr().out.strip()
    recipients = tmp_path / "r.csv"
    recipients.write_text("\ufeffname,phone\nדנה,050-234-5610\nAvi,+972502345611\n", encoding="utf-8")
    assert main(["broadcast", "create", "--business", business_id, "--name", "spring", "--template", "spring_sale",
                 "--lang", "he", "--recipients", str(recipients), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["recipients"], created["rejected"]) == (2, [])
    assert main(["broadcast", "pause", str(created["id"])]) == 0
    assert main(["broadcast", "send", str(created["id"])]) == 2
    assert "resume it first" in capsys.readouterr().err
    assert main(["broadcast", "status", str(created["id"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "paused"


@pytest.mark.parametrize("command", [["broadcast", "send", "1"], ["broadcast", "worker"]])
@pytest.mark.parametrize("setting, value, complaint", [
    ("WHATSAPP_ACCESS_TOKEN", "", "WHATSAPP_ACCESS_TOKEN is not set"),
    ("WHATSAPP_ACCESS_TOKEN", "EAAG token\n", "a stray newline or space"),
    ("WHATSAPP_PHONE_NUMBER_ID", "", "numeric id"),
    ("WHATSAPP_API_BASE", "graph.facebook.com", "must be an http(s) URL"),
    ("WHATSAPP_API_VERSION", "v21 .0", "Illegal target characters"),
    ("HTTPS_PROXY", "socks5://proxy.internal:1080", "not an http:// proxy URL"),
])
def test_sending_refuses_settings_no_send_could_work_with(tmp_path, monkeypatch, capsys, command, setting, value,
                                                           complaint):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'b.db'}")
    assert main(["business", "create", "Acme"]) == 0
    recipients = tmp_path / "r.csv"
    recipients.write_text("phone\n+972502345610\n")
    assert main(["broadcast", "create", "--business", "1", "--name", "spring", "--text", "hi",
                 "--recipients", str(recipients)]) == 0
    for name, good in (("WHATSAPP_ACCESS_TOKEN", "EAAG"), ("WHATSAPP_PHONE_NUMBER_ID", "1065"),
                       ("WHATSAPP_API_BASE", "https://graph.facebook.com")):
        monkeypatch.setenv(name, good)
    monkeypatch.setenv(setting, value)
    capsys.readouterr()
    assert main(command) == 2
    assert complaint in capsys.readouterr().err
    assert main(["broadcast", "status", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pending"


def test_simulate_plays_each_line_asked_for_and_draws_one_plot_per_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'callgate.db'}")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["simulate", "--fast", "--line", "clean", "--line", "speakerphone", "--plot", str(tmp_path / "call.png")]) == 0
    out = capsys.readouterr().out
    assert "--- line: clean" in out and "--- line: speakerphone" in out
    assert "caller switches to speakerphone" in out
    summary = json.loads(out[out.rindex('{\n  "talk_over_ms_by_line"'):])
    assert set(summary["talk_over_ms_by_line"]) == {"clean", "speakerphone"}
    assert all(120 <= talk_over <= 240 for talk_over in summary["talk_over_ms_by_line"].values())
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["call-clean.png", "call-speakerphone.png"]


def test_simulate_refuses_a_line_it_does_not_know(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--line", "satellite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'satellite'" in capsys.readouterr().err
