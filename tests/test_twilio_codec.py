"""Twilio Media Streams frames in and out, and the webhook's security, without sockets."""

from __future__ import annotations

import base64
import json
from xml.etree import ElementTree

import pytest

from app.carriers import twilio
from app.carriers.simulated_twilio import stream_from_twiml


def test_every_inbound_event_parses_to_its_type():
    payload = bytes(range(160))
    frames = {
        '{"event":"connected","protocol":"Call","version":"1.0.0"}': twilio.Connected("Call"),
        json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
            "accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
            "customParameters": {"token": "t"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}):
            twilio.Start("MZ1", "CA1", {"token": "t"}, "audio/x-mulaw", 8000),
        json.dumps({"event": "media", "sequenceNumber": "3", "streamSid": "MZ1", "media": {
            "track": "inbound", "chunk": "2", "timestamp": "40",
            "payload": base64.b64encode(payload).decode()}}): twilio.Media(payload, 40, 2),
        '{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"r1:12"}}': twilio.Mark("r1:12"),
        '{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"1"}}': twilio.Dtmf("1"),
        '{"event":"stop","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}': twilio.Stop("CA1"),
    }
    for text, expected in frames.items():
        assert twilio.parse(text) == expected


@pytest.mark.parametrize("text, complaint", [
    ("{nope", "malformed JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"event":"hangup"}', "unknown carrier event 'hangup'"),
    ('{"event":"media","media":{"payload":"***"}}', "bad 'media' frame"),
    ('{"event":"start","start":{}}', "bad 'start' frame"),
    ('{"event":"mark"}', "bad 'mark' frame"),
])
def test_bad_frames_raise_a_clear_protocol_error(text, complaint):
    with pytest.raises(twilio.CarrierProtocolError, match=complaint):
        twilio.parse(text)


def test_outbound_frames_are_twilios():
    assert json.loads(twilio.media("MZ1", b"\xff\x7f")) == {
        "event": "media", "streamSid": "MZ1", "media": {"payload": "/38="}}
    assert json.loads(twilio.mark("MZ1", "resp_1:3")) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "resp_1:3"}}
    assert json.loads(twilio.clear("MZ1")) == {"event": "clear", "streamSid": "MZ1"}


def test_request_signature_matches_twilios_documented_vector():
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio.request_signature("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio.signature_is_valid("12345", url, params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio.signature_is_valid("12345", url, {**params, "Digits": "9"}, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")


def test_twiml_connects_a_wss_stream_without_a_query_string_and_passes_parameters():
    twiml = twilio.twiml_connect_stream("wss://calls.example.com/media/twilio", {"token": 'a"<b', "from": "+1555"},
                                        "https://calls.example.com/twilio/stream-ended")
    path, parameters = stream_from_twiml(twiml)
    assert 'url="wss://calls.example.com/media/twilio"' in twiml
    assert path == "/media/twilio"
    assert parameters == {"token": 'a"<b', "from": "+1555"}
    assert ElementTree.fromstring(twiml).find("./Connect").get("action") == "https://calls.example.com/twilio/stream-ended"


def test_twiml_after_the_stream_apologises_only_when_asked_then_dials_or_hangs_up():
    assert twilio.twiml_after_stream() == '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>'
    apology = ElementTree.fromstring(twilio.twiml_after_stream("Sorry <all> of us & you"))
    assert [(element.tag, element.text) for element in apology] == [("Say", "Sorry <all> of us & you"), ("Hangup", None)]
    handed_over = ElementTree.fromstring(twilio.twiml_after_stream("Sorry", dial="+15550009999"))
    assert [(element.tag, element.text) for element in handed_over] == [("Say", "Sorry"), ("Dial", "+15550009999")]


def test_stream_tokens_are_bound_to_their_call_its_parameters_and_their_expiry():
    parameters = {"from": "+15550001111", "to": "+15550002222", "business_id": "3"}
    token = twilio.stream_token("secret", "CA1", parameters, expires_at=1_000)
    signed = {**parameters, "token": token}
    assert twilio.stream_token_problem("secret", "CA1", signed, now=1_000) is None
    assert twilio.stream_token_problem("secret", "CA1", signed, now=1_000.5) == "token expired"
    assert twilio.stream_token_problem("secret", "CA2", signed, now=0) == "bad or missing token"
    assert twilio.stream_token_problem("other", "CA1", signed, now=0) == "bad or missing token"
    for tampered in ({**signed, "business_id": "4"}, {**signed, "barge_in": "false"},
                     {name: value for name, value in signed.items() if name != "to"},
                     {**signed, "token": token.replace("1000.", "9999.", 1)},
                     {**signed, "token": token[:-1]}, {**signed, "token": "١٠٠٠." + token.split(".")[1]},
                     {**signed, "token": "é" + token}, parameters):
        assert twilio.stream_token_problem("secret", "CA1", tampered, now=0) == "bad or missing token"


@pytest.mark.parametrize("details", [None, [], {"callSid": 5}, {}])
def test_a_stop_with_malformed_details_is_still_a_stop(details):
    assert twilio.parse(json.dumps({"event": "stop", "stop": details})) == twilio.Stop(call_sid="")
