"""A simulated Twilio caller: the voice webhook, then a bidirectional Media Stream, byte-exact.

`SimulatedPhone` is the phone line with no I/O: it plays what the server sends in real time,
returns marks once the audio before them has been played (at once, as flushed, on `clear`), and
makes the microphone signal: the caller's voice plus the bot's own voice echoed back as its
`PhoneLine` returns it (not at all on a clean 4-wire leg; louder once a speakerphone is switched on).
`run_phone_call` drives it over real sockets, one 20 ms tick at a time.
"""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping
from urllib.parse import urlencode, urlsplit

import h11
import numpy as np
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from dsp.g711 import ulaw_decode, ulaw_encode
from dsp.level import rms

FRAME_SAMPLES = 160
FRAME_S = 0.02
CALLER_VOICE_RMS = 100.0  # clearly above the line noise: where the caller is first audibly talking


@dataclass(frozen=True)
class PhoneLine:
    """How the caller's line echoes the bot: `echo_return_loss_db` None means no echo at all.

    `speakerphone_return_loss_db`, when set, is the echo once the caller switches the speakerphone on,
    which `SimulatedPhone.switch_to_speakerphone` does.
    """

    name: str
    echo_delay_ms: int
    echo_return_loss_db: float | None
    speakerphone_return_loss_db: float | None = None


PHONE_LINES = {
    line.name: line for line in (
        PhoneLine("echoing", echo_delay_ms=60, echo_return_loss_db=12.0),
        PhoneLine("clean", echo_delay_ms=60, echo_return_loss_db=None),
        PhoneLine("hybrid", echo_delay_ms=180, echo_return_loss_db=18.0),
        PhoneLine("speakerphone", echo_delay_ms=60, echo_return_loss_db=30.0, speakerphone_return_loss_db=6.0),
    )
}
"""The lines `callgate simulate --line` plays: an echoing handset (the default), a clean 4-wire leg,
a long-haul PSTN hybrid, and a quiet handset switched to speakerphone after the greeting."""


@dataclass
class PhoneTimeline:
    """Everything the caller's side saw and did, for the timeline, the plot and the tests."""

    mic: list[np.ndarray] = field(default_factory=list)
    played: list[np.ndarray] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    clear_times_s: list[float] = field(default_factory=list)
    clear_frames: list[int] = field(default_factory=list)
    speech_onset_frames: list[int] = field(default_factory=list)
    marks_returned: int = 0

    def note(self, at_s: float, what: str) -> None:
        self.events.append((round(at_s, 3), what))


def _echo_gain(return_loss_db: float | None) -> float:
    return 0.0 if return_loss_db is None else 10 ** (-return_loss_db / 20)


class SimulatedPhone:
    """The caller's handset and line, advanced one 20 ms frame at a time."""

    def __init__(self, *, line: PhoneLine = PHONE_LINES["echoing"], noise_rms: float = 20.0, seed: int = 7) -> None:
        self._speaker: list[bytes | str] = []  # audio chunks and mark names, in the order received
        self._speaker_offset = 0
        self._speech = np.zeros(0, dtype=np.int16)
        self._awaiting_speech_onset = False
        self.line = line
        self._echo_gain = _echo_gain(line.echo_return_loss_db)
        self._echo_history = np.zeros(line.echo_delay_ms * 8 + FRAME_SAMPLES, dtype=np.float64)
        self._noise_rms = noise_rms
        self._random = np.random.default_rng(seed)
        self.timeline = PhoneTimeline()
        self.vanished = False

    @property
    def bot_playing(self) -> bool:
        return any(isinstance(entry, bytes) for entry in self._speaker)

    @property
    def caller_talking(self) -> bool:
        return len(self._speech) > 0

    def switch_to_speakerphone(self, now_s: float) -> None:
        """The caller turns the speakerphone on, if the line has one: the bot's echo gets louder from now."""
        if self.line.speakerphone_return_loss_db is not None:
            self._echo_gain = _echo_gain(self.line.speakerphone_return_loss_db)
            self.timeline.note(now_s, f"caller switches to speakerphone (echo {self.line.speakerphone_return_loss_db:g} dB down)")

    def say(self, pcm: np.ndarray) -> None:
        """The caller starts speaking `pcm` from the next frame on."""
        self._speech = np.concatenate((self._speech, pcm.astype(np.int16)))
        self._awaiting_speech_onset = True

    def vanish(self, now_s: float) -> None:
        """The carrier goes away without a word: no more frames, no close, nothing read; the socket stays open."""
        self.vanished = True
        self.timeline.note(now_s, "carrier vanished")

    def on_server_message(self, text: str, now_s: float, stream_sid: str) -> list[str]:
        """Take one frame from the server; returns marks to send back right away (flushed by clear).

        A message naming another stream is not for this call: it plays nothing, and the timeline notes it.
        """
        message = json.loads(text)
        if message.get("streamSid") != stream_sid:
            self.timeline.note(now_s, f"{message.get('event')} for stream {message.get('streamSid')!r} ignored")
            return []
        kind = message["event"]
        if kind == "media":
            self._speaker.append(base64.b64decode(message["media"]["payload"]))
        elif kind == "mark":
            self._speaker.append(message["mark"]["name"])
        elif kind == "clear":
            flushed = [entry for entry in self._speaker if isinstance(entry, str)]
            self._speaker.clear()
            self._speaker_offset = 0
            self.timeline.clear_times_s.append(now_s)
            self.timeline.clear_frames.append(len(self.timeline.played))
            self.timeline.note(now_s, "carrier buffer cleared: bot silenced")
            return flushed
        return []

    def tick(self) -> tuple[bytes, list[str]]:
        """Play 20 ms from the speaker and record 20 ms from the microphone; returns (mic payload, marks played)."""
        played, marks_played = self._play_frame()
        caller = np.zeros(FRAME_SAMPLES)
        spoken = self._speech[:FRAME_SAMPLES]
        caller[: len(spoken)] = spoken
        self._speech = self._speech[FRAME_SAMPLES:]
        if self._awaiting_speech_onset and rms(caller) > CALLER_VOICE_RMS:
            self._awaiting_speech_onset = False
            self.timeline.speech_onset_frames.append(len(self.timeline.mic))
        self._echo_history = np.concatenate((self._echo_history[FRAME_SAMPLES:], played.astype(np.float64)))
        echo = self._echo_history[:FRAME_SAMPLES] * self._echo_gain
        noise = self._random.normal(0.0, self._noise_rms, FRAME_SAMPLES)
        mic = np.clip(np.round(caller + echo + noise), -32768, 32767).astype(np.int16)
        self.timeline.mic.append(mic)
        self.timeline.played.append(played)
        return ulaw_encode(mic).tobytes(), marks_played

    def _play_frame(self) -> tuple[np.ndarray, list[str]]:
        out = bytearray()
        marks_played: list[str] = []
        while self._speaker and (len(out) < FRAME_SAMPLES or isinstance(self._speaker[0], str)):
            head = self._speaker[0]
            if isinstance(head, str):
                marks_played.append(self._speaker.pop(0))
                continue
            take = head[self._speaker_offset:self._speaker_offset + FRAME_SAMPLES - len(out)]
            out += take
            self._speaker_offset += len(take)
            if self._speaker_offset >= len(head):
                self._speaker.pop(0)
                self._speaker_offset = 0
        played = ulaw_decode(np.frombuffer(bytes(out), dtype=np.uint8))
        return np.concatenate((played, np.zeros(FRAME_SAMPLES - len(played), dtype=np.int16))), marks_played


async def post_voice_webhook(host: str, port: int, form: dict[str, str], query: Mapping[str, str]) -> str:
    """POST Twilio's voice webhook to our server and return the TwiML body."""
    body = urlencode(form).encode()
    client = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(host, port)
    target = "/twilio/voice" + (f"?{urlencode(query)}" if query else "")
    async with stream:
        request = h11.Request(method="POST", target=target, headers=[
            ("Host", f"{host}:{port}"), ("Content-Type", "application/x-www-form-urlencoded"),
            ("Content-Length", str(len(body))), ("Connection", "close")])
        await stream.send_all(client.send(request) + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
        response_body = bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response) and event.status_code != 200:
                raise RuntimeError(f"voice webhook answered HTTP {event.status_code}")
            elif isinstance(event, h11.Data):
                response_body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return response_body.decode()


def stream_from_twiml(twiml: str) -> tuple[str, dict[str, str]]:
    """The <Stream url> path and its <Parameter>s, as Twilio reads them."""
    stream = ElementTree.fromstring(twiml).find("./Connect/Stream")
    if stream is None:
        raise ValueError("TwiML has no <Connect><Stream>")
    parameters = {element.get("name", ""): element.get("value", "") for element in stream.findall("Parameter")}
    return urlsplit(stream.get("url", "")).path, parameters


CallerScript = Callable[[SimulatedPhone, Callable[[], float]], Awaitable[None]]


async def run_phone_call(host: str, port: int, call_sid: str, script: CallerScript, phone: SimulatedPhone,
                         *, call_options: Mapping[str, str] | None = None) -> None:
    """Place one call: webhook (its URL carrying `call_options`, as a number's webhook URL may), media stream
    with 20 ms real-time frames, `script` speaking, then `stop`."""
    twiml = await post_voice_webhook(host, port, {"CallSid": call_sid, "From": "+15550001111", "To": "+15550002222"},
                                     call_options or {})
    path, parameters = stream_from_twiml(twiml)
    stream_sid = "MZ" + call_sid[2:]
    started_at = trio.current_time()

    def elapsed_s() -> float:
        return trio.current_time() - started_at

    async with open_websocket_url(f"ws://{host}:{port}{path}") as socket:
        await socket.send_message(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await socket.send_message(json.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
            "start": {"accountSid": "AC" + "0" * 32, "streamSid": stream_sid, "callSid": call_sid,
                      "tracks": ["inbound"], "customParameters": parameters,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        async with trio.open_nursery() as nursery:
            sequence = _Sequence(start=2)
            nursery.start_soon(_listen, socket, phone, stream_sid, sequence, elapsed_s, nursery.cancel_scope)
            nursery.start_soon(_send_frames, socket, phone, stream_sid, sequence, started_at)
            await script(phone, elapsed_s)
            await socket.send_message(json.dumps({
                "event": "stop", "sequenceNumber": str(sequence.next()), "streamSid": stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": call_sid}}))
            nursery.cancel_scope.cancel()


class _Sequence:
    def __init__(self, start: int) -> None:
        self._value = start - 1

    def next(self) -> int:
        self._value += 1
        return self._value


def _mark_message(stream_sid: str, name: str, sequence: _Sequence) -> str:
    return json.dumps({"event": "mark", "sequenceNumber": str(sequence.next()), "streamSid": stream_sid,
                       "mark": {"name": name}})


async def _listen(socket: WebSocketConnection, phone: SimulatedPhone, stream_sid: str, sequence: _Sequence,
                  elapsed_s: Callable[[], float], call_scope: trio.CancelScope) -> None:
    """Hear the server until it hangs up, which ends the whole call, script included."""
    try:
        while True:
            message = await socket.get_message()
            if phone.vanished:
                await trio.sleep_forever()
            for name in phone.on_server_message(message, elapsed_s(), stream_sid):
                await socket.send_message(_mark_message(stream_sid, name, sequence))
    except ConnectionClosed:
        phone.timeline.note(elapsed_s(), "server hung up")
        call_scope.cancel()


async def _send_frames(socket: WebSocketConnection, phone: SimulatedPhone, stream_sid: str, sequence: _Sequence,
                       started_at: float) -> None:
    chunk = 0
    while not socket.closed:
        chunk += 1
        await trio.sleep_until(started_at + chunk * FRAME_S)
        if phone.vanished:
            await trio.sleep_forever()
        payload, marks_played = phone.tick()
        await socket.send_message(json.dumps({
            "event": "media", "sequenceNumber": str(sequence.next()), "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20),
                      "payload": base64.b64encode(payload).decode("ascii")}}))
        for name in marks_played:
            phone.timeline.marks_returned += 1
            await socket.send_message(_mark_message(stream_sid, name, sequence))
