"""The local model as the call code meets it: a Realtime WebSocket server, over loopback and memory streams."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    open_websocket_url,
    wrap_client_stream,
    wrap_server_stream,
)

from app.realtime.local import LocalRealtimeModel
from tests.test_local_model_helpers import (
    appends,
    audio_bytes,
    client,
    clip_pcmu,
    of_type,
    pcmu_session_update,
    receive_until,
    silence_pcmu,
)

AUTHORIZATION = [(b"authorization", b"Bearer local-model")]
# Fast enough that a whole clip streams in well under a second, slow enough to stay a stream.
FAST_SPEEDUP = 500.0


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def start_model(nursery: trio.Nursery, **options) -> str:
    return await nursery.start(LocalRealtimeModel(**options).serve)


async def open_session(websocket, seen: list[dict]) -> dict:
    """Take `session.created`, switch to mu-law, and return the `session.updated`."""
    await receive_until(websocket, "session.created", seen)
    await websocket.send_message(pcmu_session_update())
    return (await receive_until(websocket, "session.updated", seen))[-1]


async def test_a_whole_call_over_loopback_speaks_only_valid_server_events():
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        url = await start_model(nursery, stream_speedup=FAST_SPEEDUP)
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/v1/realtime")
        async with open_websocket_url(f"{url}?model=gpt-realtime-2.1", extra_headers=AUTHORIZATION) as websocket:
            updated = await open_session(websocket, seen)
            assert updated["session"]["model"] == "gpt-realtime-2.1"

            for message in appends(clip_pcmu("caller_question_en.wav") + silence_pcmu(1000)):
                await websocket.send_message(message)
            answer = await receive_until(websocket, "response.done", seen)
            assert [event["type"] for event in answer[:3]] == [
                "input_audio_buffer.speech_started",
                "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed",
            ]
            done = answer[-1]["response"]
            assert done["status"] == "completed"
            assert audio_bytes(answer, done["id"]) == clip_pcmu("bot_greeting_en.wav")
            item_id = done["output"][0]["id"]

            truncate = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0}
            await websocket.send_message(client({**truncate, "audio_end_ms": 60_000}))
            assert (await receive_until(websocket, "error", seen))[-1]["error"]["code"] == "invalid_value"
            await websocket.send_message(client({**truncate, "audio_end_ms": 1500}))
            assert (await receive_until(websocket, "conversation.item.truncated", seen))[-1]["audio_end_ms"] == 1500
            await websocket.send_message(client({"type": "conversation.item.delete", "item_id": item_id}))
            assert (await receive_until(websocket, "conversation.item.deleted", seen))[-1]["item_id"] == item_id

            await websocket.send_message(client({"type": "response.cancel"}))
            assert (await receive_until(websocket, "error", seen))[-1]["error"]["code"] == "response_cancel_not_active"
            await websocket.send_message("this is not JSON")
            assert (await receive_until(websocket, "error", seen))[-1]["error"]["code"] == "invalid_json"

            await websocket.send_message(client({"type": "response.create"}))
            second = await receive_until(websocket, "response.done", seen)
            assert audio_bytes(second, second[-1]["response"]["id"]) == clip_pcmu("bot_answer_en.wav")
        nursery.cancel_scope.cancel()
    assert len({event["event_id"] for event in seen}) == len(seen)


async def test_cancel_stops_the_deltas_and_ends_with_one_cancelled_response_done(autojump_clock):
    """Over in-memory streams, so the mock clock paces the stream: no sockets, no waiting."""
    seen: list[dict] = []
    model = LocalRealtimeModel(stream_speedup=1.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve_one_connection() -> None:
            await model.handle_request(await wrap_server_stream(nursery, server_stream))

        nursery.start_soon(serve_one_connection)
        websocket = await wrap_client_stream(nursery, client_stream, "127.0.0.1", "/v1/realtime?model=gpt-realtime-2.1")
        await open_session(websocket, seen)
        await websocket.send_message(client({"type": "response.create"}))
        opening = await receive_until(websocket, "response.output_audio.delta", seen)
        response_id = opening[0]["response"]["id"]

        await websocket.send_message(client({"type": "response.cancel", "response_id": response_id}))
        closing = await receive_until(websocket, "response.done", seen)
        assert closing[-1]["response"]["status"] == "cancelled"
        assert closing[-1]["response"]["status_details"]["reason"] == "client_cancelled"
        await trio.sleep(5)
        await websocket.send_message(client({"type": "input_audio_buffer.clear"}))
        after = await receive_until(websocket, "input_audio_buffer.cleared", seen)
        assert [event["type"] for event in after] == ["input_audio_buffer.cleared"]
        await websocket.aclose()
    streamed = audio_bytes(seen, response_id)
    assert 0 < len(streamed) < len(clip_pcmu("bot_greeting_en.wav"))
    assert len(of_type(seen, "response.done")) == 1


async def test_two_sessions_on_one_server_do_not_disturb_each_other():
    async with trio.open_nursery() as nursery:
        # Slow enough that the unruly caller's cancel lands while its response is still streaming.
        url = await start_model(nursery, stream_speedup=50.0)
        results: dict[str, list[dict]] = {}

        async def steady_caller() -> None:
            seen: list[dict] = []
            async with open_websocket_url(url, extra_headers=AUTHORIZATION) as websocket:
                await open_session(websocket, seen)
                await websocket.send_message(client({"type": "response.create"}))
                await receive_until(websocket, "response.done", seen)
            results["steady"] = seen

        async def unruly_caller() -> None:
            seen: list[dict] = []
            async with open_websocket_url(url, extra_headers=AUTHORIZATION) as websocket:
                await open_session(websocket, seen)
                for message in ("{", '{"type": ["not", "a", "name"]}', client({"type": "response.cancel"})):
                    await websocket.send_message(message)
                    await receive_until(websocket, "error", seen)
                await websocket.send_message(client({"type": "response.create"}))
                await receive_until(websocket, "response.output_audio.delta", seen)
                await websocket.send_message(client({"type": "response.cancel"}))
                await receive_until(websocket, "response.done", seen)
            results["unruly"] = seen

        async with trio.open_nursery() as callers:
            callers.start_soon(steady_caller)
            callers.start_soon(unruly_caller)
        nursery.cancel_scope.cancel()

    steady, unruly = results["steady"], results["unruly"]
    assert steady[0]["session"]["id"] != unruly[0]["session"]["id"]
    assert not of_type(steady, "error")
    assert len(of_type(unruly, "error")) == 3
    assert of_type(unruly, "response.done")[0]["response"]["status"] == "cancelled"
    steady_done = of_type(steady, "response.done")[0]["response"]
    assert steady_done["status"] == "completed"
    assert audio_bytes(steady, steady_done["id"]) == clip_pcmu("bot_greeting_en.wav")
    assert {event["response_id"] for event in of_type(steady, "response.output_audio.delta")} == {steady_done["id"]}


async def test_other_paths_are_refused_at_the_handshake():
    async with trio.open_nursery() as nursery:
        url = await start_model(nursery)
        with pytest.raises(ConnectionRejected) as rejection:
            async with open_websocket_url(url.replace("/v1/realtime", "/v1/other"), extra_headers=AUTHORIZATION):
                pass
        assert rejection.value.status_code == 404
        async with open_websocket_url(url, extra_headers=AUTHORIZATION) as websocket:
            assert json.loads(await websocket.get_message())["type"] == "session.created"
        nursery.cancel_scope.cancel()


async def test_a_session_that_fails_closes_alone(monkeypatch):
    model = LocalRealtimeModel(stream_speedup=FAST_SPEEDUP)
    real_new_session = model.new_session
    sessions = []

    def first_session_breaks(*args):
        session = real_new_session(*args)
        if not sessions:
            monkeypatch.setattr(session, "receive", lambda message: 1 / 0)
        sessions.append(session)
        return session

    monkeypatch.setattr(model, "new_session", first_session_breaks)
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        url = await nursery.start(model.serve)
        async with open_websocket_url(url, extra_headers=AUTHORIZATION) as broken:
            await receive_until(broken, "session.created", seen)
            async with open_websocket_url(url, extra_headers=AUTHORIZATION) as healthy:
                await open_session(healthy, seen)
                await broken.send_message(client({"type": "response.create"}))
                with pytest.raises(ConnectionClosed) as closed:
                    await broken.get_message()
                assert int(closed.value.reason.code) == 1011
                await healthy.send_message(client({"type": "response.create"}))
                answer = await receive_until(healthy, "response.done", seen)
                assert answer[-1]["response"]["status"] == "completed"
        nursery.cancel_scope.cancel()
