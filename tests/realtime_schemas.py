"""The openai package's own event unions, untouched: what every event on the wire must validate against."""

from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import TypeAdapter

SDK_CLIENT_EVENTS = TypeAdapter(RealtimeClientEvent)
SDK_SERVER_EVENTS = TypeAdapter(RealtimeServerEvent)
