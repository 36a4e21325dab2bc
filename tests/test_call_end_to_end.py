"""Whole calls over real loopback sockets, in virtual time: the server, the local model and a simulated phone."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

from app.carriers.simulated_twilio import FRAME_S, PHONE_LINES, SimulatedPhone, run_phone_call
from app.realtime.local import LocalRealtimeModel
from app.server import serve
from app.settings import Settings
from app.simulate import StandardCall, measure, simulate_call, wait_for_quiet, wait_until
from storage.db import open_database
from storage.migrate import apply_migrations
from storage.models import Business, Call, CallEvent, TranscriptTurn


def answer_ms_heard_at_the_phone(report) -> int:
    """Bot audio the phone played from the answer's first frame to the barge-in's `clear`."""
    played = report.timeline.played
    heard_start_s = next(at for at, what in report.timeline.events if what == "caller hears the answer start")
    first = next(index for index in range(int(heard_start_s / FRAME_S) - 5, len(played)) if np.any(played[index]))
    return (report.timeline.clear_frames[-1] - first) * 20


@pytest.fixture
def settings(tmp_path):
    return Settings(database_url=f"sqlite:///{tmp_path / 'calls.db'}", spill_dir=str(tmp_path / "spill"), host="127.0.0.1", port=0)


async def test_the_seeds_manual_checks_on_a_whole_simulated_call(settings, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    report = await simulate_call(settings)
    log = caplog.text
    # 1. The bot says its first sentence; 2. talking during it changes nothing.
    assert "[FIRST_UTTERANCE] NO barge-in until first response completes resp=" in log
    assert report.greeting_cleared is False
    assert "caller speech ignored while the first utterance plays" in log
    # Onsets rest for the debounce between them, on the call's own clock.
    ignored_at = [at for at, what in report.timeline.events if "caller speech ignored" in what]
    assert len(ignored_at) >= 2 and min(b - a for a, b in zip(ignored_at, ignored_at[1:])) >= 0.35
    # 3. Once it has been heard to the end, barge-in is on.
    assert "[FIRST_UTTERANCE] Barge-in now ENABLED for rest of call" in log
    enabled_at = next(at for at, what in report.timeline.events if what.startswith("server: Barge-in now ENABLED"))
    greeting_heard_at = next(at for at, what in report.timeline.events if what == "greeting heard to the end")
    assert enabled_at < greeting_heard_at
    # 4. Talking during the answer stops it at once: within the 6-frame onset plus a few frames.
    assert "[BARGE_IN]" in log and "talk_over_ms=120" in log
    assert report.talk_over_ms is not None and 120 <= report.talk_over_ms <= 240
    assert report.stop_after_onset_ms is not None and report.stop_after_onset_ms <= 240
    # The model took our cancel and truncate as valid: no error came back.
    assert "[MODEL_ERROR]" not in log and "bad event" not in log


async def test_a_simulated_call_leaves_its_records(settings, autojump_clock):
    report = await simulate_call(settings, call_sid="CA" + "7" * 32)
    assert report.talk_over_ms is not None
    database = open_database(settings.database_url)
    with database.bind_ctx([Call, CallEvent, TranscriptTurn]):
        call = Call.get(Call.call_sid == "CA" + "7" * 32)
        assert call.ended_at is not None and call.end_reason == "carrier_stop"
        kinds = [event.kind for event in CallEvent.select().where(CallEvent.call == call)]
        assert kinds.count("first_utterance_end") == 1 and kinds.count("barge_in") == 1
        turns = list(TranscriptTurn.select().where(TranscriptTurn.call == call).order_by(TranscriptTurn.id))
        assert [turn.truncated for turn in turns[:2]] == [False, True]
        # What the marks say was heard is what the phone played, to within one 100 ms chunk.
        assert abs(turns[1].heard_ms - answer_ms_heard_at_the_phone(report)) <= settings.playback_chunk_ms
        # Record times are on the call's clock: the answer began when the phone started hearing it.
        heard_at = dict((what, at) for at, what in report.timeline.events)
        answer_after_s = (turns[1].started_at - turns[0].started_at).total_seconds()
        assert abs(answer_after_s - (heard_at["caller hears the answer start"]
                                     - heard_at["caller hears the greeting start"])) <= 0.2
        barge_in = CallEvent.get(CallEvent.call == call, CallEvent.kind == "barge_in")
        assert abs((barge_in.at - call.started_at).total_seconds() - report.barge_in_clear_s) <= 0.2
        assert barge_in.detail["talk_over_ms"] == report.talk_over_ms
        assert abs((call.ended_at - call.started_at).total_seconds() - heard_at["caller hangs up"]) <= 0.2
    database.close()


async def test_ten_concurrent_calls_in_one_server_do_not_disturb_each_other(settings, autojump_clock):
    reports = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, settings)

        async def one_call(number: int) -> None:
            phone, caller = SimulatedPhone(seed=number), StandardCall()
            await run_phone_call("127.0.0.1", port, f"CA{number:032d}", caller, phone)
            reports.append(measure(phone, caller))

        async with trio.open_nursery() as calls:
            for number in range(10):
                calls.start_soon(one_call, number)
        nursery.cancel_scope.cancel()
    assert len(reports) == 10
    assert all(not report.greeting_cleared for report in reports)
    assert all(report.talk_over_ms is not None and 120 <= report.talk_over_ms <= 240 for report in reports)
    assert all(len(report.timeline.clear_times_s) == 1 for report in reports)


async def test_on_a_line_without_echo_a_barge_in_early_in_the_answer_silences_the_bot_at_once(
        settings, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    call_sid = "CA" + "8" * 32
    report = await simulate_call(settings, call_sid, PHONE_LINES["clean"], StandardCall(barge_in_after_s=1.5))
    assert report.line == "clean" and not report.greeting_cleared
    # Silenced within 160 ms of the caller's first audible frame: the 120 ms onset and at most two frames more.
    assert report.stop_after_onset_ms is not None and report.stop_after_onset_ms <= 160
    assert len(report.timeline.clear_times_s) == 1
    # One cancel: a second would draw the model's "no active response" error.
    assert caplog.text.count("[BARGE_IN]") == 1 and "[MODEL_ERROR]" not in caplog.text
    database = open_database(settings.database_url)
    with database.bind_ctx([Call, TranscriptTurn]):
        call = Call.get(Call.call_sid == call_sid)
        answer = list(TranscriptTurn.select().where(TranscriptTurn.call == call).order_by(TranscriptTurn.id))[1]
        # The model's memory is cut to what the caller heard, to within one 100 ms chunk.
        assert answer.truncated
        assert abs(answer.heard_ms - answer_ms_heard_at_the_phone(report)) <= settings.playback_chunk_ms
    database.close()


@pytest.mark.parametrize("line", ["hybrid", "speakerphone"])
async def test_every_simulated_line_keeps_the_greeting_and_stops_the_answer_at_once(settings, autojump_clock, line):
    report = await simulate_call(settings, line=PHONE_LINES[line])
    assert not report.greeting_cleared
    assert report.talk_over_ms is not None and 120 <= report.talk_over_ms <= 240
    assert len(report.timeline.clear_times_s) == 1


class TalkOverThenListen(StandardCall):
    """Hears the greeting out, asks, talks over the answer 2 s in, then listens to whatever the bot says next."""

    def __init__(self) -> None:
        super().__init__(barge_in_after_s=2.0)
        self.talked_over_frame = 0

    async def __call__(self, phone: SimulatedPhone, elapsed_s) -> None:
        await wait_until(lambda: phone.bot_playing, "the greeting")
        await wait_for_quiet(phone)
        phone.say(self.question)
        await wait_until(lambda: phone.bot_playing, "the answer")
        await trio.sleep(self.barge_in_after_s)
        self.utterances_before_barge_in = len(phone.timeline.speech_onset_frames)
        self.talked_over_frame = len(phone.timeline.played)
        phone.say(self.interrupt)
        await trio.sleep(3.0)
        await wait_until(lambda: phone.bot_playing, "the reply after the caller spoke")
        await wait_for_quiet(phone)


def bot_frames(report, first: int, last: int | None = None) -> int:
    """Frames of bot audio the phone played from frame `first` to `last`."""
    return sum(bool(np.any(frame)) for frame in report.timeline.played[first:last])


async def test_after_a_barge_in_the_reply_to_the_caller_is_heard_in_full(settings, autojump_clock):
    caller = TalkOverThenListen()
    report = await simulate_call(settings, "CA" + "6" * 32, PHONE_LINES["clean"], caller)
    assert len(report.timeline.clear_frames) == 1
    cleared = report.timeline.clear_frames[0]
    assert cleared - caller.talked_over_frame <= 8  # the onset and a frame or two
    # Nothing more of the stopped answer: silence while the caller goes on talking.
    assert bot_frames(report, cleared + 1, caller.talked_over_frame + len(caller.interrupt) // 160) == 0
    # The next response plays after the clear: its audio is not taken for the stopped one's.
    assert bot_frames(report, cleared + 5) >= 50
    database = open_database(settings.database_url)
    with database.bind_ctx([Call, TranscriptTurn]):
        turns = list(TranscriptTurn.select().join(Call).where(Call.call_sid == "CA" + "6" * 32)
                     .order_by(TranscriptTurn.id))
        assert [turn.truncated for turn in turns] == [False, True, False]
        assert turns[2].heard_ms > 1000
    database.close()


async def test_a_number_configured_without_barge_in_talks_over_the_caller_to_the_end(settings, autojump_clock):
    database = open_database(settings.database_url)
    apply_migrations(database)
    business = Business.create(name="Acme")
    database.close()
    caller = TalkOverThenListen()
    report = await simulate_call(settings, "CA" + "4" * 32, PHONE_LINES["clean"], caller,
                                 call_options={"barge_in": "false", "business_id": str(business.id)})
    assert report.timeline.clear_frames == []
    # The caller talked over the bot for the clip's length and the bot went on all along.
    talking = len(caller.interrupt) // 160
    assert bot_frames(report, caller.talked_over_frame, caller.talked_over_frame + talking) >= 0.8 * talking
    database = open_database(settings.database_url)
    with database.bind_ctx([Call, CallEvent, TranscriptTurn]):
        call = Call.get(Call.call_sid == "CA" + "4" * 32)
        assert (call.business_id, call.from_number, call.to_number) == (business.id, "+15550001111", "+15550002222")
        assert [event.kind for event in CallEvent.select().where(CallEvent.call == call)] == ["first_utterance_end"]
        turns = list(TranscriptTurn.select().where(TranscriptTurn.call == call).order_by(TranscriptTurn.id))
        assert not any(turn.truncated for turn in turns)
    database.close()


async def test_the_seeds_rms_mode_does_not_hear_a_caller_below_its_floor_over_the_bot(settings, autojump_clock):
    caller = TalkOverThenListen()
    caller.interrupt = (caller.interrupt * 0.05).astype(np.int16)  # well under the 200 rms floor
    rms_settings = dataclasses.replace(settings, echo_gate_mode="rms")
    report = await simulate_call(rms_settings, "CA" + "3" * 32, PHONE_LINES["clean"], caller)
    assert report.timeline.clear_frames == []


async def test_a_call_at_its_maximum_duration_hears_a_closing_line_to_the_end_then_is_hung_up(settings, autojump_clock):
    settings = dataclasses.replace(settings, max_call_s=12.0)
    phone = SimulatedPhone(seed=3)

    async def silent_caller(phone, elapsed_s):
        await trio.sleep(60.0)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, settings)
        await run_phone_call("127.0.0.1", port, "CA" + "8" * 32, silent_caller, phone)
        nursery.cancel_scope.cancel()

    hung_up_at = next(at for at, what in phone.timeline.events if what == "server hung up")
    database = open_database(settings.database_url)
    with database.bind_ctx([Call, CallEvent, TranscriptTurn]):
        call = Call.get(Call.call_sid == "CA" + "8" * 32)
        closing = CallEvent.get((CallEvent.call == call) & (CallEvent.kind == "closing"))
        turns = list(TranscriptTurn.select().where(TranscriptTurn.call == call).order_by(TranscriptTurn.id))
    database.close()
    assert call.end_reason == "max_duration" and closing.detail == {"reason": "max_duration"}
    # Greeting, then the closing line (the local model's answer clip, 14.3 s), heard whole before the hang-up.
    assert [turn.truncated for turn in turns] == [False, False]
    assert 12.0 + 14.2 < hung_up_at < 12.0 + 20.0
    assert (turns[1].started_at - call.started_at).total_seconds() == pytest.approx(12.0, abs=0.5)


class DroppingRelay:
    """A Realtime endpoint relaying to the built-in local model; its first link drops `after_s` into the call."""

    def __init__(self, upstream_url: str, after_s: float) -> None:
        self.upstream_url = upstream_url
        self.after_s = after_s
        self.sent_by_link: list[list[dict]] = []  # what callgate sent on each link

    async def handle(self, request) -> None:
        sent: list[dict] = []
        self.sent_by_link.append(sent)
        first_link = len(self.sent_by_link) == 1
        client = await request.accept()
        query = request.path.partition("?")[2]
        async with open_websocket_url(f"{self.upstream_url}?{query}") as upstream, trio.open_nursery() as nursery:
            async def from_callgate() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        message = await client.get_message()
                        sent.append(json.loads(message))
                        await upstream.send_message(message)
                nursery.cancel_scope.cancel()

            async def to_callgate() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await client.send_message(await upstream.get_message())
                nursery.cancel_scope.cancel()

            nursery.start_soon(from_callgate)
            nursery.start_soon(to_callgate)
            if first_link:
                await trio.sleep(self.after_s)
                await client.aclose(1011, "relay dropped")
                nursery.cancel_scope.cancel()


async def test_a_model_link_dropped_mid_call_is_reopened_with_what_the_caller_heard(settings, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    async with trio.open_nursery() as nursery:
        local_url = await nursery.start(LocalRealtimeModel().serve)
        relay = DroppingRelay(local_url, after_s=6.0)  # the greeting heard, the caller asking
        relay_server = await nursery.start(serve_websocket, relay.handle, "127.0.0.1", 0, None)
        report = await simulate_call(dataclasses.replace(
            settings, openai_api_key="sk-test", realtime_url=f"ws://127.0.0.1:{relay_server.port}/v1/realtime"))
        nursery.cancel_scope.cancel()
    assert len(relay.sent_by_link) == 2
    greeting = report_transcripts(settings)[0]
    restored = [event for event in relay.sent_by_link[1] if event["type"] != "input_audio_buffer.append"]
    assert [event["type"] for event in restored[:3]] == ["session.update", "conversation.item.create", "response.create"]
    # The greeting was cut by the drop: the new session hears the words the caller heard, and is asked to go on.
    heard = restored[1]["item"]
    assert (heard["role"], heard["content"][0]["type"]) == ("assistant", "output_text")
    assert greeting.truncated and 0 < len(heard["content"][0]["text"]) < len(greeting.text)
    assert greeting.text.startswith(heard["content"][0]["text"])
    assert restored[2]["event_id"] == "callgate_first_response_2"
    # The new session answers and the caller's barge-in still stops it at once.
    assert report.talk_over_ms is not None and report.talk_over_ms <= 240
    assert "[MODEL] model session reopened; the call so far restored turns=1" in caplog.text


def report_transcripts(settings) -> list:
    database = open_database(settings.database_url)
    with database.bind_ctx([TranscriptTurn]):
        turns = list(TranscriptTurn.select().order_by(TranscriptTurn.id))
    database.close()
    return turns
