"""One message to the Cloud API over the worker's pooled HTTP client, and what its fate means for a retry."""

from __future__ import annotations

import json
import random
import urllib.request
from dataclasses import dataclass

from app.http_client import HttpClient, NoAnswer, RequestNotSent, request_head_for
from app.whatsapp.cloud_api import RetryLater, SendOutcome, classify_response

REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
RETRY_BASE_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 60.0


@dataclass(frozen=True, slots=True)
class OutcomeUnknown:
    """The request left this machine but no answer came: Meta may have sent it, so it is never resent by default."""

    reason: str


@dataclass(frozen=True, slots=True)
class NotSendable:
    """The request could not even be built (a setting h11 refuses): nothing left, and no recipient is to blame."""

    reason: str


def new_client(max_connections: int, lease_s: float) -> HttpClient:
    """One pooled client per worker: connection reuse, bounded concurrency, and a timeout on the whole
    exchange well inside the claim's lease, so a live worker always records its result before the lease ends."""
    timeout_s = min(REQUEST_TIMEOUT_S, lease_s / 2)
    # HTTPS_PROXY and NO_PROXY, read as curl and urllib read them: often the only way out of a production network.
    return HttpClient(max_connections=max_connections, timeout_s=timeout_s, connect_timeout_s=CONNECT_TIMEOUT_S,
                      proxies=urllib.request.getproxies_environment())


def check_sending_setup(url: str, access_token: str) -> None:
    """ValueError when no message could be sent with this URL, token or proxy setting, before anyone is claimed."""
    new_client(1, 1.0)
    request_head_for("POST", url, 0, _headers(access_token))


def _headers(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"}


async def post_message(client: HttpClient, url: str, access_token: str,
                       body: dict) -> SendOutcome | OutcomeUnknown | NotSendable:
    try:
        answer = await client.post(url, json.dumps(body, ensure_ascii=False).encode(), _headers(access_token))
    except ValueError as error:
        return NotSendable(str(error))
    except RequestNotSent as error:
        return RetryLater(None, f"not sent: {error}")
    except NoAnswer as error:
        return OutcomeUnknown(str(error))
    return classify_response(answer.status, answer.body)


def retry_delay_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter, so throttled workers do not come back in step."""
    ceiling = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** max(0, attempt - 1))
    return ceiling * (0.5 + 0.5 * rng.random())
