"""A stand-in for the Cloud API send endpoint, sans-io: one request in, Meta's answer out.

It validates a send like Meta does, draws injected failures from a seeded RNG, and says which
messages count as accepted (and so belong in the record). Meta's documented HTTP status goes
with each error code: the throughput and call-rate codes (130429, 131056, 80007, 4, 613) come
back as HTTP 400, exactly as Meta sends them, so a sender that retries only on HTTP 429 fails
here as it would in production; a bare HTTP 429 is a separate failure kind (`429:` in the spec).
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace

from app.http import HttpRequest

TIMEOUT_KEY = "timeout"


@dataclass(frozen=True, slots=True)
class MetaError:
    """One of Meta's error codes with the HTTP status Meta answers it with."""

    code: int
    http_status: int
    message: str
    details: str
    subcode: int | None = None


_KNOWN_ERRORS = (
    MetaError(130429, 400, "(#130429) Rate limit hit", "Cloud API message throughput has been reached."),
    MetaError(131056, 400, "(#131056) (Business Account, Consumer Account) pair rate limit hit",
              "Too many messages sent from this phone number to the same recipient in a short period."),
    MetaError(80007, 400, "(#80007) Rate limit issues", "The WhatsApp Business Account has reached its rate limit."),
    MetaError(4, 400, "(#4) Application request limit reached", "Too many API calls for this app."),
    MetaError(613, 400, "(#613) Calls to this api have exceeded the rate limit.", "API call rate limit reached."),
    MetaError(131026, 400, "(#131026) Message Undeliverable.",
              "The recipient phone number is not a WhatsApp phone number."),
    MetaError(131047, 400, "(#131047) Re-engagement message",
              "More than 24 hours have passed since the recipient last replied to this number."),
    MetaError(131049, 400, "(#131049) This message was not delivered to maintain healthy ecosystem engagement.",
              "Marketing message not delivered because of the recipient's per-user limit."),
    MetaError(132000, 400, "(#132000) Number of parameters does not match the expected number of params",
              "The template's parameter count does not match."),
    # Meta's table lists 132001 as 404, the one 4xx of the set that is not a 400.
    MetaError(132001, 404, "(#132001) Template name does not exist in the translation",
              "The template does not exist in this language or is not approved."),
    MetaError(100, 400, "(#100) Invalid parameter", "A parameter is missing or not valid."),
    MetaError(190, 401, "Error validating access token: Session has expired.",
              "The access token has expired or was revoked.", subcode=463),
    MetaError(131000, 500, "(#131000) Something went wrong", "Message failed to send because of an unknown error."),
    MetaError(131016, 503, "(#131016) Service unavailable", "A service is temporarily unavailable."),
    MetaError(2, 503, "(#2) Service temporarily unavailable", "A temporary issue due to downtime."),
)
META_ERRORS = {error.code: error for error in _KNOWN_ERRORS}
# The body that goes with a bare HTTP status in a fail spec: Meta's own code for that kind of fault.
_CODE_FOR_HTTP_STATUS = {429: 130429, 500: 131000, 503: 131016}
_CODE_FOR_OTHER_5XX = 2


@dataclass(frozen=True, slots=True)
class NeverAnswer:
    """Accept and record the message, then hold the request unanswered until the client gives up."""


InjectedFailure = MetaError | NeverAnswer


@dataclass(frozen=True, slots=True)
class FailureRate:
    failure: InjectedFailure
    rate: float
    key: str


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict
    record: dict | None  # the record line when the message was accepted, else None


@dataclass(frozen=True, slots=True)
class Hold:
    record: dict


SandboxReply = Answer | Hold


def failure_for_key(key: str) -> InjectedFailure:
    """`timeout`, a Meta error code (with Meta's status) or an HTTP status 429 / 5xx (with a Meta-style body)."""
    if key == TIMEOUT_KEY:
        return NeverAnswer()
    if not (key.isascii() and key.isdigit()):
        raise ValueError(f"unknown failure {key!r}: use 'timeout', an HTTP status (429, 5xx) or a Meta error code")
    number = int(key)
    if number in META_ERRORS:
        return META_ERRORS[number]
    if number == 429 or 500 <= number <= 599:
        return replace(META_ERRORS[_CODE_FOR_HTTP_STATUS.get(number, _CODE_FOR_OTHER_5XX)], http_status=number)
    known = ", ".join(str(code) for code in sorted(META_ERRORS))
    raise ValueError(f"unknown failure {key!r}: HTTP statuses are 429 and 500-599; Meta codes are {known}")


def parse_fail_spec(spec: str) -> tuple[FailureRate, ...]:
    """Parse `KEY:RATE,KEY:RATE,...` (e.g. "429:0.1,500:0.05,timeout:0.02,131026:0.05").
    Raises ValueError saying what is wrong; the rates must add up to at most 1."""
    rates: list[FailureRate] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        key, separator, rate_text = item.partition(":")
        key = key.strip()
        try:
            rate = float(rate_text)
        except ValueError:
            rate = -1.0
        if not separator or not 0.0 <= rate <= 1.0:
            raise ValueError(f"fail spec item {item!r} must be KEY:RATE with RATE between 0 and 1")
        if any(existing.key == key for existing in rates):
            raise ValueError(f"fail spec names {key!r} twice")
        rates.append(FailureRate(failure_for_key(key), rate, key))
    total_rate = sum(rate.rate for rate in rates)
    if total_rate > 1.0 + 1e-9:
        raise ValueError(f"fail spec rates add up to {total_rate:g}; they must add up to at most 1")
    return tuple(rates)


def error_body(error: MetaError, fbtrace_id: str, details: str | None = None) -> dict:
    """Meta's error envelope; `error_subcode` is null where Meta has none for the code."""
    return {"error": {"message": error.message, "type": "OAuthException", "code": error.code,
                      "error_subcode": error.subcode,
                      "error_data": {"messaging_product": "whatsapp", "details": details or error.details},
                      "fbtrace_id": fbtrace_id}}


class CloudApiSandbox:
    """Answers sends like the Cloud API. Deterministic for a given seed and request sequence."""

    def __init__(self, failure_rates: Sequence[FailureRate] = (), *, seed: int = 0,
                 access_token: str | None = None) -> None:
        self._failure_rates = tuple(failure_rates)
        self._access_token = access_token
        self._failure_draws = random.Random(seed)
        # Ids come from their own stream so the failure draws depend on nothing but the request count.
        self._id_draws = random.Random(f"ids-{seed}")
        self.accepted_count = 0

    @property
    def may_hold(self) -> bool:
        """Whether some answers are held back (injected timeouts)."""
        return any(isinstance(rate.failure, NeverAnswer) for rate in self._failure_rates)

    def handle(self, request: HttpRequest, received_at_s: float) -> SandboxReply:
        """Validate `request`, then draw a failure; an accepted message gets an id and a record line."""
        message = self._validated_message(request)
        if isinstance(message, Answer):
            return message
        failure = self._draw_failure()
        if isinstance(failure, MetaError):
            return self._error_answer(failure)
        self.accepted_count += 1
        message_id = self._message_id(message["to"])
        record = {**message, "received_at": received_at_s, "message_id": message_id}
        if isinstance(failure, NeverAnswer):
            return Hold(record)
        body = {"messaging_product": "whatsapp", "contacts": [{"input": message["to"], "wa_id": message["to"]}],
                "messages": [{"id": message_id}]}
        return Answer(200, body, record)

    def _validated_message(self, request: HttpRequest) -> dict | Answer:
        """The parsed send, or the error answer Meta gives for it."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            unparsable_token = replace(META_ERRORS[190], subcode=None,
                                       message="Invalid OAuth access token - Cannot parse access token")
            return self._error_answer(unparsable_token, "An Authorization: Bearer token is required.")
        if self._access_token is not None and token.strip() != self._access_token:
            return self._error_answer(META_ERRORS[190], "The access token is not the one this server expects.")
        try:
            message = json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._error_answer(META_ERRORS[100], "The request body must be JSON.")
        problem = message_problem(message)
        return self._error_answer(META_ERRORS[100], problem) if problem else message

    def _error_answer(self, error: MetaError, details: str | None = None) -> Answer:
        return Answer(error.http_status, error_body(error, self._fbtrace_id(), details), None)

    def _draw_failure(self) -> InjectedFailure | None:
        draw = self._failure_draws.random()
        for failure_rate in self._failure_rates:
            if draw < failure_rate.rate:
                return failure_rate.failure
            draw -= failure_rate.rate
        return None

    def _message_id(self, to_digits: str) -> str:
        # Meta's ids are base64 of an opaque blob that holds the recipient; ours hold it and a count.
        blob = f"{to_digits}:{self.accepted_count}:".encode() + self._id_draws.randbytes(12)
        return "wamid." + base64.b64encode(blob).decode()

    def _fbtrace_id(self) -> str:
        return "".join(self._id_draws.choices(string.ascii_letters + string.digits + "-_", k=23))


def message_problem(message: object) -> str | None:
    """What makes `message` an invalid send, in Meta's `details` words, or None when it is valid."""
    if not isinstance(message, dict):
        return "The request body must be a JSON object."
    if message.get("messaging_product") != "whatsapp":
        return "The parameter messaging_product is required and must be 'whatsapp'."
    to = message.get("to")
    if not isinstance(to, str) or not (to.isascii() and to.isdigit()):
        return "The parameter to is required and must be the number's digits in international form."
    kind = message.get("type", "text")
    if kind == "text":
        text = message.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("body"), str) or not text["body"]:
            return "Param text['body'] is required for a text message."
        return None
    if kind == "template":
        template = message.get("template")
        if not isinstance(template, dict) or not isinstance(template.get("name"), str) or not template["name"]:
            return "Param template['name'] is required for a template message."
        language = template.get("language")
        if not isinstance(language, dict) or not isinstance(language.get("code"), str) or not language["code"]:
            return "Param template['language']['code'] is required for a template message."
        return None
    return f"The sandbox sends text and template messages only, not type {kind!r}."
