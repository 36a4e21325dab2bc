"""Shared pieces of the local model tests: the SDK event schemas, ready-made client events, session drivers."""

from __future__ import annotations

import base64
import json


from app.clips import load_clip
from app.realtime.local import LocalRealtimeModel
from app.realtime import protocol
from app.realtime.local_session import LocalSession
from app.settings import Settings
from tests.realtime_schemas import SDK_CLIENT_EVENTS, SDK_SERVER_EVENTS
from dsp.g711 import ulaw_encode

FRAME_BYTES = 160
SILENCE_CODE = 0xFF
MODEL = LocalRealtimeModel()


def client(event: dict) -> str:
    """A client event as the wire carries it, after checking it against the SDK's schema."""
    SDK_CLIENT_EVENTS.validate_python(event)
    return json.dumps(event)


def pcmu_session_update(
    *, create_response: bool = True, interrupt_response: bool = False, threshold: float = 0.82
) -> str:
    """The session.update the call path sends (mu-law both ways, server VAD), with turn detection varied."""
    event = protocol.session_update(Settings(instructions="Answer briefly.", server_vad_threshold=threshold))
    turn_detection = event["session"]["audio"]["input"]["turn_detection"]
    turn_detection.update(create_response=create_response, interrupt_response=interrupt_response)
    return client(event)


def clip_pcmu(name: str) -> bytes:
    return ulaw_encode(load_clip(name)).tobytes()


def silence_pcmu(duration_ms: int) -> bytes:
    return bytes([SILENCE_CODE]) * (duration_ms * 8)


def appends(pcmu: bytes) -> list[str]:
    """`input_audio_buffer.append` messages of 20 ms each, as a carrier delivers them."""
    frames = [pcmu[start : start + FRAME_BYTES] for start in range(0, len(pcmu), FRAME_BYTES)]
    return [client({"type": "input_audio_buffer.append", "audio": base64.b64encode(f).decode()}) for f in frames]


def validate_all(events: list[dict]) -> None:
    for event in events:
        SDK_SERVER_EVENTS.validate_python(event)


def of_type(events: list[dict], event_type: str) -> list[dict]:
    return [event for event in events if event["type"] == event_type]


def audio_bytes(events: list[dict], response_id: str) -> bytes:
    return b"".join(
        base64.b64decode(event["delta"])
        for event in events
        if event["type"] == "response.output_audio.delta" and event["response_id"] == response_id
    )


async def receive_until(websocket, last_type: str, seen: list[dict]) -> list[dict]:
    """Read events, each checked against the SDK's schema, up to and including one of `last_type`.

    Every event read is also appended to `seen`, the whole conversation's record.
    """
    received = []
    while not received or received[-1]["type"] != last_type:
        event = json.loads(await websocket.get_message())
        SDK_SERVER_EVENTS.validate_python(event)
        received.append(event)
        seen.append(event)
    return received


def new_session(**update) -> LocalSession:
    session = MODEL.new_session()
    session.open()
    session.receive(pcmu_session_update(**update))
    return session


def speak(session: LocalSession, pcmu: bytes) -> list[dict]:
    return [event for message in appends(pcmu) for event in session.receive(message)]


def stream_to_end(session: LocalSession) -> list[dict]:
    events = []
    while session.active_response_id is not None:
        events += session.stream_step()
    return events


def start_response(session: LocalSession) -> tuple[list[dict], str, str]:
    """Create a response and stream two deltas of it; returns the events, response id and item id."""
    events = session.receive(client({"type": "response.create"}))
    events += session.stream_step() + session.stream_step()
    created = of_type(events, "response.created")[0]
    item = of_type(events, "response.output_item.added")[0]["item"]
    return events, created["response"]["id"], item["id"]


def user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def single_error(events: list[dict]) -> dict:
    assert [event["type"] for event in events] == ["error"]
    return events[0]["error"]
