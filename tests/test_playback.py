"""Outbound playback in virtual time: pacing at a bounded lead, media+mark pairs, stop by cancel scope."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import trio

from app.playback import CARRIER_OUTBOX_LIMIT_MS, CarrierNotReading, CarrierOutbox, Playback, PlayoutReference
from app.turn_events import PlayAudio
from dsp.g711 import ulaw_decode

CHUNK = b"\x00" * 800  # 100 ms of loud mu-law


def playback_under_test(lead_ms: int = 200):
    chunks_send, chunks = trio.open_memory_channel(math.inf)
    reference = PlayoutReference()
    outbox = CarrierOutbox("MZ1", reference)
    return Playback(chunks, outbox, lead_ms), chunks_send, outbox, reference


async def collect(outbox, into):
    """A carrier that reads everything at once."""
    while True:
        message = json.loads(await outbox.next_message())
        into.append((trio.current_time(), message))


async def test_audio_goes_out_in_order_each_chunk_followed_by_its_mark_at_a_bounded_lead(autojump_clock):
    playback, chunks, carrier, _ = playback_under_test(lead_ms=200)
    sent = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playback.run)
        nursery.start_soon(collect, carrier, sent)
        for number in range(10):
            chunks.send_nowait(PlayAudio("resp_1", CHUNK, f"resp_1:{number}"))
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    kinds = [message["event"] for _, message in sent]
    assert kinds == ["media", "mark"] * 10
    assert [message["mark"]["name"] for _, message in sent if message["event"] == "mark"] == [
        f"resp_1:{number}" for number in range(10)]
    media_times = [round(at, 3) for at, message in sent if message["event"] == "media"]
    # 300 ms go out at once (the lead plus the chunk playing), then one chunk per 100 ms of playout.
    assert media_times == [0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


async def test_stop_cancels_the_response_and_drops_its_queued_chunks_but_not_the_next_response(autojump_clock):
    playback, chunks, carrier, reference = playback_under_test(lead_ms=0)
    sent = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playback.run)
        nursery.start_soon(collect, carrier, sent)
        for number in range(5):
            chunks.send_nowait(PlayAudio("resp_1", CHUNK, f"resp_1:{number}"))
        await trio.sleep(0.15)
        playback.stop("resp_1")
        playback.carrier_cleared()
        chunks.send_nowait(PlayAudio("resp_2", CHUNK, "resp_2:0"))
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    marks = [message["mark"]["name"] for _, message in sent if message["event"] == "mark"]
    assert marks == ["resp_1:0", "resp_1:1", "resp_2:0"]
    assert [message["event"] for _, message in sent].count("clear") == 1
    assert reference.pop_frame().any()  # what now plays is resp_2's audio, resp_1's was cleared


def test_the_playout_reference_hands_out_one_frame_per_inbound_frame_then_silence():
    reference = PlayoutReference()
    reference.extend(np.arange(1, 241, dtype=np.int16))
    assert reference.pop_frame().tolist() == list(range(1, 161))
    second = reference.pop_frame()
    assert second[:80].tolist() == list(range(161, 241)) and not second[80:].any()
    assert not reference.pop_frame().any()
    reference.extend(np.ones(400, dtype=np.int16))
    reference.clear()
    assert not reference.pop_frame().any()


async def test_media_and_marks_carry_the_stream_sid_and_the_reference_is_the_decoded_audio(autojump_clock):
    playback, chunks, carrier, reference = playback_under_test(lead_ms=0)
    sent = []
    audio = bytes(range(256)) * 5 + bytes(range(64))  # 1344 bytes: 8.4 frames of every mu-law code
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playback.run)
        nursery.start_soon(collect, carrier, sent)
        chunks.send_nowait(PlayAudio("resp_1", audio, "resp_1:0"))
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert {message["streamSid"] for _, message in sent} == {"MZ1"}
    expected = ulaw_decode(np.frombuffer(audio, dtype=np.uint8))
    played = np.concatenate([reference.pop_frame() for _ in range(9)])
    assert played.dtype == np.int16
    assert played[:len(expected)].tolist() == expected.tolist() and not played[len(expected):].any()


async def test_each_chunk_leaves_exactly_when_the_carrier_buffer_falls_to_the_lead(autojump_clock):
    playback, chunks, carrier, _ = playback_under_test(lead_ms=150)
    sent = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playback.run)
        nursery.start_soon(collect, carrier, sent)
        for number in range(4):
            chunks.send_nowait(PlayAudio("resp_1", CHUNK, f"resp_1:{number}"))
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    media_times = [at for at, message in sent if message["event"] == "media"]
    # Buffered audio ends at 0.1, 0.2, 0.3 s: the next chunk may leave 150 ms before that.
    assert media_times == [0.0, 0.0, pytest.approx(0.05, abs=1e-9), pytest.approx(0.15, abs=1e-9)]


async def test_stop_is_safe_before_any_audio_between_responses_and_for_a_finished_response(autojump_clock):
    playback, chunks, carrier, _ = playback_under_test(lead_ms=0)
    sent = []
    async with trio.open_nursery() as nursery:
        playback.stop("resp_0")  # nothing has played yet
        nursery.start_soon(playback.run)
        nursery.start_soon(collect, carrier, sent)
        chunks.send_nowait(PlayAudio("resp_1", CHUNK, "resp_1:0"))
        chunks.send_nowait(PlayAudio("resp_2", CHUNK, "resp_2:0"))
        await trio.sleep(0.05)
        playback.stop("resp_1")  # already sent in full: resp_2 plays on
        await trio.sleep(0.5)
        playback.stop("resp_2")  # cancelled while idle
        await trio.sleep(0.1)
        playback.stop("resp_3")  # nothing is playing
        chunks.send_nowait(PlayAudio("resp_4", CHUNK, "resp_4:0"))
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    marks = [message["mark"]["name"] for _, message in sent if message["event"] == "mark"]
    assert marks == ["resp_1:0", "resp_2:0", "resp_4:0"]


def test_the_playout_reference_is_always_a_full_int16_frame():
    reference = PlayoutReference()
    assert reference.pop_frame().dtype == np.int16 and len(reference.pop_frame()) == 160
    reference.extend(np.full(100, 7, dtype=np.int16))
    partial = reference.pop_frame()
    assert partial.dtype == np.int16 and len(partial) == 160
    reference.extend(np.full(160, 5, dtype=np.int16))
    reference.clear()
    reference.extend(np.full(160, 3, dtype=np.int16))
    after_clear = reference.pop_frame()
    assert after_clear.dtype == np.int16 and after_clear.tolist() == [3] * 160


def unsent_chunk(number: int) -> bytes:
    return bytes([number]) * 160


async def test_a_clear_overtakes_the_unsent_audio_which_never_reaches_the_carrier_or_the_reference():
    reference = PlayoutReference()
    outbox = CarrierOutbox("MZ1", reference)
    for number in range(3):
        outbox.put_audio(unsent_chunk(number), f"resp_1:{number}")
    assert json.loads(await outbox.next_message())["event"] == "media"  # the first chunk is on its way
    outbox.clear()
    outbox.put_audio(unsent_chunk(9), "resp_2:0")
    sent = [json.loads(await outbox.next_message()) for _ in range(3)]
    assert [message["event"] for message in sent] == ["clear", "media", "mark"]
    assert {message["streamSid"] for message in sent} == {"MZ1"}
    assert sent[2]["mark"]["name"] == "resp_2:0"
    assert reference.pop_frame().tolist() == ulaw_decode(np.frombuffer(unsent_chunk(9), dtype=np.uint8)).tolist()
    assert not reference.pop_frame().any()


async def test_audio_enters_the_playout_reference_when_it_leaves_for_the_carrier_not_when_queued():
    reference = PlayoutReference()
    outbox = CarrierOutbox("MZ1", reference)
    outbox.put_audio(unsent_chunk(5), "resp_1:0")
    assert not reference.pop_frame().any()
    await outbox.next_message()
    assert reference.pop_frame().tolist() == ulaw_decode(np.frombuffer(unsent_chunk(5), dtype=np.uint8)).tolist()


async def test_a_carrier_that_stops_reading_is_found_out_once_the_outbox_holds_its_bound(autojump_clock):
    playback, chunks, outbox, _ = playback_under_test(lead_ms=0)
    for number in range(CARRIER_OUTBOX_LIMIT_MS // 100 + 1):
        chunks.send_nowait(PlayAudio("resp_1", CHUNK, f"resp_1:{number}"))
    with pytest.raises(CarrierNotReading, match=f"{CARRIER_OUTBOX_LIMIT_MS} ms of audio unsent"):
        await playback.run()
    assert trio.current_time() == pytest.approx(CARRIER_OUTBOX_LIMIT_MS / 1000)


async def test_the_outbox_bound_counts_only_audio_unsent_now():
    outbox = CarrierOutbox("MZ1", PlayoutReference())
    limit_bytes = CARRIER_OUTBOX_LIMIT_MS * 8
    outbox.put_audio(b"\xff" * 800, "resp_1:0")
    outbox.clear()
    outbox.put_audio(b"\xff" * limit_bytes, "resp_2:0")  # exactly the bound, once the clear emptied it
    with pytest.raises(CarrierNotReading):
        outbox.put_audio(b"\xff", "resp_2:1")
    for _ in range(3):  # the clear, then the carrier takes the chunk and its mark
        await outbox.next_message()
    outbox.put_audio(b"\xff" * limit_bytes, "resp_2:2")
