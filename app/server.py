"""The callgate server: Twilio's webhook and media streams on one port, one nursery per call."""

from __future__ import annotations

import json
import logging
import secrets
import signal
import time
from functools import partial
from pathlib import Path

import peewee
import trio
from trio_websocket import ConnectionClosed, DisconnectionTimeout, HandshakeError, WebSocketConnection, WebSocketRequest

from app.call import CLOSING_LINE_TIMEOUT_S, MODEL_RECONNECT_TIMEOUT_S, CallSession, ModelEndpoint, Recorder, open_model_socket
from app.carriers import twilio
from app.http import CLOSE_TIMEOUT_S, ConnectionLimits, HttpRequest, HttpResponse, Router
from app.logs import log_event
from app.realtime.local import LocalRealtimeModel
from app.settings import Settings
from app.whatsapp import webhook
from storage.db import database_answers, is_sqlite, open_database
from storage.migrate import apply_migrations
from storage.models import claim_media_stream, stored_end_reason
from storage.records import WhatsappStatusRecord
from storage.writer import StorageWriters

logger = logging.getLogger("callgate.server")

START_TIMEOUT_S = 10
# Twilio opens the stream within moments of reading our TwiML; a token older than this is replayed.
STREAM_TOKEN_TTL_S = 60
READINESS_TIMEOUT_S = 2
FLUSH_AT_HANG_UP_TIMEOUT_S = 5
MEDIA_PATH = "/media/twilio"
STREAM_ENDED_PATH = "/twilio/stream-ended"
# The caller hears an apology from Twilio's voice when the bot could not be reached, or was lost mid-call.
APOLOGISED_END_REASONS = ("model_unreachable", "model_link_lost", "model_unresponsive", "failed")
END_REASONS_REMEMBERED = 1024
CALL_OPTIONS = ("business_id", "barge_in")
WHATSAPP_WEBHOOK_PATH = "/whatsapp/webhook"


class CallgateServer:
    """Routes and per-call lifecycles; knows nothing of turn-taking, which lives in each CallSession."""

    def __init__(self, settings: Settings, endpoint: ModelEndpoint, writers: StorageWriters,
                 database: peewee.Database) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.recorder: Recorder = writers.calls
        self.writers = writers
        self.database = database
        self.active_calls: dict[str, CallSession] = {}
        self.draining = False
        self._spent_tokens: dict[str, float] = {}
        # Why this process's recent calls ended, for Twilio's question once each stream is over.
        self._recent_end_reasons: dict[str, str] = {}
        self._calls_changed = trio.Event()
        self.stream_token_secret = settings.stream_token_secret or settings.twilio_auth_token
        if not self.stream_token_secret:
            # Several processes behind one number need a shared secret; one process can make its own.
            self.stream_token_secret = secrets.token_hex(32)
            logger.warning("call=- [SERVER] CALLGATE_STREAM_TOKEN_SECRET unset: stream tokens are valid in this process only")
        self.router = Router()
        self.router.http("GET", "/livez", self.livez)
        self.router.http("GET", "/healthz", self.livez)
        self.router.http("GET", "/readyz", self.readyz)
        self.router.http("POST", "/twilio/voice", self.twilio_voice)
        self.router.http("POST", STREAM_ENDED_PATH, self.twilio_stream_ended)
        self.router.websocket(MEDIA_PATH, self.media_stream)
        self.router.http("GET", WHATSAPP_WEBHOOK_PATH, self.whatsapp_verification)
        self.router.http("POST", WHATSAPP_WEBHOOK_PATH, self.whatsapp_callback)

    async def livez(self, request: HttpRequest) -> HttpResponse:
        """The process answers; what it is doing is nobody's business on a public port."""
        return HttpResponse.json(200, {"status": "ok"})

    async def readyz(self, request: HttpRequest) -> HttpResponse:
        """Ready for new calls: the database answers and the writer's backlog is under its bound."""
        problems = ["draining"] if self.draining else []
        for name, writer in self.writers.named():
            if writer.queued_count >= writer.capacity:
                problems.append(f"storage writer backlog over its bound ({name})")
        with trio.move_on_after(READINESS_TIMEOUT_S) as waited:
            try:
                await trio.to_thread.run_sync(database_answers, self.database, abandon_on_cancel=True)
            except peewee.PeeweeException as error:
                problems.append(f"database unreachable ({type(error).__name__})")
        if waited.cancelled_caught:
            problems.append(f"database did not answer within {READINESS_TIMEOUT_S} s")
        if problems:
            log_event(logger, "-", "SERVER", "not ready", level=logging.WARNING, problems=problems)
            return HttpResponse.json(503, {"status": "not ready", "problems": problems})
        return HttpResponse.json(200, {"status": "ready"})

    def _unsigned_webhook(self, request: HttpRequest, form: dict[str, str], what: str) -> HttpResponse | None:
        """The 403 or 400 a Twilio webhook gets without a valid signature or a CallSid; None when it is good."""
        call_sid = form.get("CallSid", "")
        if self.settings.twilio_auth_token:
            url = f"https://{self.settings.public_host}{request.target}"
            if not twilio.signature_is_valid(self.settings.twilio_auth_token, url, form,
                                             request.headers.get("x-twilio-signature", "")):
                log_event(logger, call_sid or "-", "TWILIO", f"{what} with a bad signature refused",
                          level=logging.WARNING)
                return HttpResponse(403, b"bad X-Twilio-Signature")
        if not call_sid:
            return HttpResponse(400, b"CallSid is required")
        return None

    async def twilio_voice(self, request: HttpRequest) -> HttpResponse:
        form = request.form()
        refusal = self._unsigned_webhook(request, form, "voice webhook")
        if refusal is not None:
            return refusal
        call_sid = form["CallSid"]
        if self.draining or len(self.active_calls) >= self.settings.max_calls:
            why = "draining" if self.draining else f"{len(self.active_calls)} calls, the most this process takes"
            log_event(logger, call_sid, "TWILIO", "call turned away busy", level=logging.WARNING, why=why)
            return HttpResponse(200, twilio.twiml_reject_busy().encode(), "application/xml")
        parameters = {
            "from": form.get("From", ""),
            "to": form.get("To", ""),
            # A number's webhook URL may carry ?business_id=...&barge_in=false; the stream URL may not.
            **{name: value for name, value in request.query.items() if name in CALL_OPTIONS},
        }
        expires_at = int(time.time()) + STREAM_TOKEN_TTL_S
        parameters["token"] = twilio.stream_token(self.stream_token_secret, call_sid, parameters, expires_at)
        twiml = twilio.twiml_connect_stream(f"wss://{self.settings.public_host}{MEDIA_PATH}", parameters,
                                            f"https://{self.settings.public_host}{STREAM_ENDED_PATH}")
        log_event(logger, call_sid, "TWILIO", "call connected to media stream")
        return HttpResponse(200, twiml.encode(), "application/xml")

    async def twilio_stream_ended(self, request: HttpRequest) -> HttpResponse:
        """What follows the stream: an apology, then a person or the hang-up, when the bot could not be reached
        or was lost; else the hang-up.

        The call's end reason is known here if this process ran it, else from its stored record."""
        form = request.form()
        refusal = self._unsigned_webhook(request, form, "stream-ended webhook")
        if refusal is not None:
            return refusal
        call_sid = form["CallSid"]
        reason = self._recent_end_reasons.get(call_sid)
        if reason is None:
            try:
                reason = await trio.to_thread.run_sync(stored_end_reason, self.database, call_sid)
            except peewee.PeeweeException as error:
                log_event(logger, call_sid, "TWILIO", "end reason not readable", level=logging.ERROR,
                          why=type(error).__name__)
        if reason in APOLOGISED_END_REASONS:
            twiml = twilio.twiml_after_stream(self.settings.apology_text, self.settings.fallback_dial)
            log_event(logger, call_sid, "TWILIO", "stream ended, the caller hears the apology", reason=reason,
                      then="dial" if self.settings.fallback_dial else "hang up")
        else:
            twiml = twilio.twiml_after_stream()
            log_event(logger, call_sid, "TWILIO", "stream ended, hanging up", reason=reason or "unknown")
        return HttpResponse(200, twiml.encode(), "application/xml")

    async def whatsapp_verification(self, request: HttpRequest) -> HttpResponse:
        status, body = webhook.verification_answer(request.query, self.settings.whatsapp_verify_token)
        log_event(logger, "-", "WA_WEBHOOK", "verification answered", status=status)
        return HttpResponse(status, body.encode())

    async def whatsapp_callback(self, request: HttpRequest) -> HttpResponse:
        """Checked, parsed and queued for the storage writer; answered at once, so Meta never retries a burst."""
        signature = request.headers.get("x-hub-signature-256", "")
        if not webhook.signature_is_valid(self.settings.whatsapp_app_secret, request.body, signature):
            log_event(logger, "-", "WA_WEBHOOK", "callback with a bad or missing signature refused",
                      level=logging.WARNING)
            return HttpResponse(403, b"bad X-Hub-Signature-256")
        try:
            updates, other_entries = webhook.status_updates(json.loads(request.body))
        except (json.JSONDecodeError, UnicodeDecodeError, webhook.WebhookPayloadError) as error:
            log_event(logger, "-", "WA_WEBHOOK", "callback body refused", level=logging.WARNING, why=str(error))
            return HttpResponse(400, b"not a WhatsApp Business Account notification")
        for update in updates:
            self.writers.statuses.submit(WhatsappStatusRecord(
                update.message_id, update.status, update.at, update.error_code, update.error_title))
        log_event(logger, "-", "WA_WEBHOOK", "callback queued", statuses=len(updates), other_entries=other_entries)
        return HttpResponse(200, b"ok")

    async def media_stream(self, ws_request: WebSocketRequest) -> None:
        if self.settings.twilio_auth_token and not self._upgrade_signature_is_valid(ws_request):
            logger.warning("call=- [TWILIO] media stream upgrade with a bad signature refused")
            await ws_request.reject(403, body=b"bad X-Twilio-Signature")
            return
        carrier = await ws_request.accept()
        start = None
        try:
            start = await _await_start(carrier)
            if start is not None and await self._admit_stream(start):
                await self._run_call(start, carrier)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await carrier.aclose()
        if start is not None:
            await self._flush_records(start.call_sid)

    def _upgrade_signature_is_valid(self, ws_request: WebSocketRequest) -> bool:
        headers = {name.decode().lower(): value.decode("latin-1") for name, value in ws_request.headers}
        url = f"wss://{self.settings.public_host}{MEDIA_PATH}"
        return twilio.signature_is_valid(self.settings.twilio_auth_token, url, {}, headers.get("x-twilio-signature", ""))

    async def _admit_stream(self, start: twilio.Start) -> bool:
        """A valid, unexpired token for this CallSid and its parameters, the audio format we forward as-is,
        and the first stream for this call: in this process, and in any other sharing PostgreSQL."""
        now = time.time()
        why = twilio.stream_token_problem(self.stream_token_secret, start.call_sid, start.custom_parameters, now)
        if why is None and start.call_sid in self.active_calls:
            why = "this call already has a media stream"
        if why is None and (start.encoding, start.sample_rate_hz) != ("audio/x-mulaw", 8000):
            why = f"audio must be audio/x-mulaw at 8000 Hz, got {start.encoding} at {start.sample_rate_hz} Hz"
        if why is None and not await self._spend_token(start.call_sid, now):
            why = "this call's stream token was already used"
        if why is None:
            return True
        log_event(logger, start.call_sid, "TWILIO", "media stream refused", level=logging.WARNING, why=why)
        return False

    async def _spend_token(self, call_sid: str, now: float) -> bool:
        """False when this call's token opened a stream before. Tokens past their expiry fail on their own, so
        only those younger are remembered. SQLite serves one process; PostgreSQL is shared, so it is asked too."""
        self._spent_tokens = {sid: spent_at for sid, spent_at in self._spent_tokens.items()
                              if spent_at > now - STREAM_TOKEN_TTL_S}
        if call_sid in self._spent_tokens:
            return False
        self._spent_tokens[call_sid] = now
        if is_sqlite(self.database):
            return True
        try:
            return await trio.to_thread.run_sync(partial(claim_media_stream, self.database, call_sid))
        except peewee.PeeweeException as error:
            # The token still expires; a database outage must not cost every caller the call.
            log_event(logger, call_sid, "TWILIO", "stream token not spent, the database failed; call admitted",
                      level=logging.ERROR, why=type(error).__name__)
            return True

    async def _run_call(self, start: twilio.Start, carrier: WebSocketConnection) -> None:
        """One call, start to hang-up; whatever goes wrong is logged here and never reaches another call."""
        session = CallSession(self.settings, start, self.recorder)
        self.active_calls[start.call_sid] = session
        session.log("CALL", "media stream started", stream=start.stream_sid)
        def retrying(attempt: int, error: Exception) -> None:
            session.log("CALL", "model connection failed, trying again", level=logging.WARNING,
                        attempt=attempt, why=repr(error))
        try:
            async with open_model_socket(self.endpoint, retrying) as model:
                reopen = partial(open_model_socket, self.endpoint, retrying, connect_timeout_s=MODEL_RECONNECT_TIMEOUT_S)
                reason = await session.run(carrier, model, reopen)
            session.log("CALL", "call ended", reason=reason)
        except* DisconnectionTimeout:
            session.log("CALL", "call ended; the model did not answer our close in time", level=logging.WARNING,
                        reason=session.end_reason)
        except* (OSError, HandshakeError, trio.TooSlowError) as failure:
            session.model_unreachable(repr(failure.exceptions[0]))
        except* Exception:
            logger.exception("call=%s [CALL] call failed", start.call_sid)
        finally:
            self._remember_end_reason(start.call_sid, session.end_reason or "failed")
            del self.active_calls[start.call_sid]
            self._calls_changed.set()
            self._calls_changed = trio.Event()

    def _remember_end_reason(self, call_sid: str, reason: str) -> None:
        self._recent_end_reasons[call_sid] = reason
        if len(self._recent_end_reasons) > END_REASONS_REMEMBERED:
            del self._recent_end_reasons[next(iter(self._recent_end_reasons))]

    async def drain(self, drain_s: float) -> None:
        """Refuse new calls, give those running `drain_s` to end, then have the rest say their closing line."""
        self.draining = True
        log_event(logger, "-", "SERVER", "draining: new calls turned away", calls=len(self.active_calls),
                  drain_s=drain_s)
        with trio.move_on_after(drain_s):
            await self._until_no_calls()
        for session in list(self.active_calls.values()):
            session.close("shutdown")
        with trio.move_on_after(CLOSING_LINE_TIMEOUT_S + 1):
            await self._until_no_calls()
        log_event(logger, "-", "SERVER", "drained", calls_left=len(self.active_calls))

    async def _until_no_calls(self) -> None:
        while self.active_calls:
            await self._calls_changed.wait()

    async def _flush_records(self, call_sid: str) -> None:
        """After hang-up, wait a bounded time for the call's records; a slow database never holds a socket."""
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_AT_HANG_UP_TIMEOUT_S) as waited:
            await self.recorder.flush()
        if waited.cancelled_caught:
            log_event(logger, call_sid, "STORAGE", "records still queued after hang-up; the writer keeps them",
                      level=logging.WARNING)


async def _await_start(carrier: WebSocketConnection) -> twilio.Start | None:
    """Read `connected` then `start`; anything else first is logged and ignored."""
    try:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                try:
                    event = twilio.parse(await carrier.get_message())
                except twilio.CarrierProtocolError as error:
                    logger.error("call=- [TWILIO] bad frame before start why=%r", str(error))
                    continue
                if isinstance(event, twilio.Start):
                    return event
                if not isinstance(event, twilio.Connected):
                    logger.warning("call=- [TWILIO] %s before start ignored", type(event).__name__)
    except trio.TooSlowError:
        logger.error("call=- [TWILIO] no start event within %s s, stream closed", START_TIMEOUT_S)
    except ConnectionClosed:
        logger.info("call=- [TWILIO] stream closed before start")
    return None


async def start_model_endpoint(settings: Settings, nursery: trio.Nursery) -> ModelEndpoint:
    """OpenAI with a key; without one, the built-in local model, reached over the same protocol."""
    if not settings.uses_local_model:
        return ModelEndpoint(settings.realtime_url, settings.realtime_model, settings.openai_api_key)
    local_url = await nursery.start(LocalRealtimeModel().serve)
    logger.info("call=- [SERVER] no OPENAI_API_KEY: using the built-in local model at %s", local_url)
    return ModelEndpoint(local_url, settings.realtime_model, "local")


async def _set_on_sigterm(terminated: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            logger.info("call=- [SERVER] SIGTERM: draining")
            terminated.set()
            return


async def serve(settings: Settings, *, terminated: trio.Event | None = None, drain_on_sigterm: bool = False,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Migrate, start the storage writer and the model endpoint, then serve until cancelled, or until
    `terminated` is set (by SIGTERM with `drain_on_sigterm`: systemd, Kubernetes, docker stop) and the
    calls have drained.

    On cancellation the calls hang up first; the storage writer stops only after them, so every
    record a call submitted on its way out is written.
    """
    if drain_on_sigterm and terminated is None:
        terminated = trio.Event()
    database = open_database(settings.database_url)
    await trio.to_thread.run_sync(apply_migrations, database)
    writers = StorageWriters.spilling_to(database, Path(settings.spill_dir), capacity=settings.writer_capacity)
    # Shielded from the server's cancellation: the writers stop only once the calls have hung up.
    writer_scope = trio.CancelScope(shield=True)

    async def run_writers(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with writer_scope:
            async with trio.open_nursery() as writer_nursery:
                for _, writer in writers.named():
                    await writer_nursery.start(writer.run)
                task_status.started()

    async with trio.open_nursery() as storage_nursery:
        await storage_nursery.start(run_writers)
        try:
            async with trio.open_nursery() as nursery:
                if drain_on_sigterm:
                    await nursery.start(_set_on_sigterm, terminated)
                endpoint = await start_model_endpoint(settings, nursery)
                server = CallgateServer(settings, endpoint, writers, database)
                limits = ConnectionLimits(server.router.handle_connection, total=settings.max_connections,
                                          per_address=settings.max_connections_per_ip)
                listeners = await nursery.start(
                    partial(trio.serve_tcp, limits.handle_connection, settings.port, host=settings.host)
                )
                port = listeners[0].socket.getsockname()[1]
                logger.info("call=- [SERVER] listening %s", json.dumps({"host": settings.host, "port": port}))
                task_status.started(port)
                if terminated is not None:
                    await terminated.wait()
                    await server.drain(settings.drain_s)
                    nursery.cancel_scope.cancel()
        finally:
            writer_scope.cancel()
