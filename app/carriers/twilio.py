"""Twilio Media Streams, sans-io: parse a text frame into a typed event, encode what we send."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Mapping, Union
from xml.sax.saxutils import escape, quoteattr

from app.json_fields import text

MEDIA_FRAME_MS = 20
MEDIA_FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law


class CarrierProtocolError(ValueError):
    """A frame from the carrier breaks the Media Streams protocol."""


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    encoding: str = "audio/x-mulaw"
    sample_rate_hz: int = 8000


@dataclass(frozen=True, slots=True)
class Media:
    payload: bytes
    timestamp_ms: int
    chunk: int


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Stop:
    call_sid: str


CarrierEvent = Union[Connected, Start, Media, Mark, Dtmf, Stop]


def parse(frame: str) -> CarrierEvent:
    """Parse one text frame from Twilio; raise CarrierProtocolError naming what is wrong."""
    try:
        message = json.loads(frame)
    except json.JSONDecodeError as error:
        raise CarrierProtocolError(f"malformed JSON from carrier: {error}") from None
    if not isinstance(message, dict):
        raise CarrierProtocolError("carrier frame is not a JSON object")
    kind = message.get("event")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise CarrierProtocolError(f"unknown carrier event {kind!r}")
    try:
        return parser(message)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:  # binascii.Error is a ValueError
        raise CarrierProtocolError(f"bad {kind!r} frame: {type(error).__name__} {error}") from None


def _parse_start(message: dict) -> Start:
    start = message["start"]
    media_format = start.get("mediaFormat") or {}
    return Start(
        stream_sid=text(start.get("streamSid") or message["streamSid"]),
        call_sid=text(start["callSid"]),
        custom_parameters={text(name): text(value) for name, value in (start.get("customParameters") or {}).items()},
        encoding=text(media_format.get("encoding", "audio/x-mulaw")),
        sample_rate_hz=int(media_format.get("sampleRate", 8000)),
    )


def _parse_media(message: dict) -> Media:
    media = message["media"]
    return Media(
        payload=base64.b64decode(media["payload"], validate=True),
        timestamp_ms=int(media.get("timestamp", 0)),
        chunk=int(media.get("chunk", 0)),
    )


def _lenient_call_sid(stop: object) -> str:
    """A stop is a hang-up however its details are malformed: losing it would keep the call open."""
    call_sid = stop.get("callSid") if isinstance(stop, dict) else None
    return call_sid if isinstance(call_sid, str) else ""


_PARSERS = {
    "connected": lambda message: Connected(protocol=text(message.get("protocol", ""))),
    "start": _parse_start,
    "media": _parse_media,
    "mark": lambda message: Mark(name=text(message["mark"]["name"])),
    "dtmf": lambda message: Dtmf(digit=text(message["dtmf"]["digit"])),
    "stop": lambda message: Stop(call_sid=_lenient_call_sid(message.get("stop"))),
}


def media(stream_sid: str, payload: bytes) -> str:
    """Outbound audio: mu-law 8 kHz bytes for Twilio to buffer and play in order."""
    return json.dumps(
        {"event": "media", "streamSid": stream_sid, "media": {"payload": base64.b64encode(payload).decode("ascii")}}
    )


def mark(stream_sid: str, name: str) -> str:
    """A mark that Twilio echoes back once everything queued before it has been played."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear(stream_sid: str) -> str:
    """Empty Twilio's playback buffer at once; pending marks come back as flushed."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})


def twiml_connect_stream(stream_url: str, parameters: Mapping[str, str], ended_url: str) -> str:
    """TwiML that connects the call to our media WebSocket, passing data as <Parameter>; when the stream
    ends, Twilio asks `ended_url` what comes next."""
    parameter_tags = "".join(
        f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>" for name, value in parameters.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect action={quoteattr(ended_url)}><Stream url={quoteattr(stream_url)}>{parameter_tags}"
        "</Stream></Connect></Response>"
    )


def twiml_after_stream(apology: str = "", dial: str = "") -> str:
    """TwiML for after the stream: `apology` in Twilio's voice when there is one, then the call goes to
    `dial` (a person) when set, else it hangs up."""
    said = f"<Say>{escape(apology)}</Say>" if apology else ""
    then = f"<Dial>{escape(dial)}</Dial>" if dial else "<Hangup/>"
    return f'<?xml version="1.0" encoding="UTF-8"?><Response>{said}{then}</Response>'


def twiml_reject_busy() -> str:
    """TwiML that turns the call away with a busy signal, before it is answered (nothing is billed)."""
    return '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy"/></Response>'


def request_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 over the URL and the sorted POST parameters."""
    signed = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_is_valid(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
    return hmac.compare_digest(request_signature(auth_token, url, params), signature)


def stream_token(secret: str, call_sid: str, parameters: Mapping[str, str], expires_at: int) -> str:
    """`<expiry>.<HMAC>` over the CallSid, the expiry (Unix seconds) and every other stream parameter:
    checkable by any process that shares the secret, and no parameter can be changed without failing it."""
    return f"{expires_at}.{_stream_token_digest(secret, call_sid, parameters, expires_at)}"


def _stream_token_digest(secret: str, call_sid: str, parameters: Mapping[str, str], expires_at: int) -> str:
    signed = json.dumps([call_sid, expires_at, sorted(parameters.items())])
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()


def stream_token_problem(secret: str, call_sid: str, custom_parameters: Mapping[str, str], now: float) -> str | None:
    """Why a stream's `token` parameter does not admit it (None when it does); the token covers the others."""
    parameters = {name: value for name, value in custom_parameters.items() if name != "token"}
    expiry, _, digest = custom_parameters.get("token", "").partition(".")
    if not (expiry.isascii() and expiry.isdigit()):
        return "bad or missing token"
    expected = _stream_token_digest(secret, call_sid, parameters, int(expiry))
    if not hmac.compare_digest(expected.encode(), digest.encode()):
        return "bad or missing token"
    if int(expiry) < now:
        return "token expired"
    return None
