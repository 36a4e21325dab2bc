"""One message to the Cloud API over a shared httpx client, and what its fate means for a retry."""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from app.whatsapp.cloud_api import RetryLater, SendOutcome, classify_response

REQUEST_TIMEOUT_S = 10.0
RETRY_BASE_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 60.0


@dataclass(frozen=True, slots=True)
class OutcomeUnknown:
    """The request left this machine but no answer came: Meta may have sent it, so it is never resent by default."""

    reason: str


def new_client(max_connections: int, lease_s: float) -> httpx.AsyncClient:
    """One pooled client per worker: connection reuse, bounded concurrency, and timeouts on every phase,
    well inside the claim's lease so a live worker always records its result before the lease ends."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(min(REQUEST_TIMEOUT_S, lease_s / 2)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


async def post_message(
    client: httpx.AsyncClient, url: str, access_token: str, body: dict,
) -> SendOutcome | OutcomeUnknown:
    try:
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {access_token}"})
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
        return RetryLater(None, f"not sent: {type(error).__name__}")  # the request never left this machine
    except (httpx.TimeoutException, httpx.TransportError) as error:
        return OutcomeUnknown(f"{type(error).__name__} after the request went out")
    return classify_response(response.status_code, response.content)


def retry_delay_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter, so throttled workers do not come back in step."""
    ceiling = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** max(0, attempt - 1))
    return ceiling * (0.5 + 0.5 * rng.random())
