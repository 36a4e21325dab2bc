"""`callgate simulate`: one full call against the in-process server and the local model.

The caller hears the greeting, talks over it (ignored), asks a question, and barges into the long
answer. The timeline and the measured talk-over come from the phone's side of the line.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import trio

from app.carriers.simulated_twilio import FRAME_S, PHONE_LINES, PhoneLine, PhoneTimeline, SimulatedPhone, run_phone_call
from app.clips import load_clip
from app.server import serve
from app.settings import Settings

GREETING_TALK_AFTER_S = 2.0
ANSWER_BARGE_IN_AFTER_S = 3.0
SILENCE_MEANS_DONE_S = 0.6
WAIT_LIMIT_S = 30.0


@dataclass
class SimulationReport:
    line: str
    timeline: PhoneTimeline
    greeting_cleared: bool
    caller_speech_onset_s: float | None
    barge_in_clear_s: float | None
    talk_over_ms: int | None
    stop_after_onset_ms: int | None

    def summary(self) -> dict:
        return {
            "line": self.line,
            "greeting_kept_playing_while_caller_talked": not self.greeting_cleared,
            "barge_in_caller_onset_s": self.caller_speech_onset_s,
            "barge_in_clear_s": self.barge_in_clear_s,
            "talk_over_ms": self.talk_over_ms,
            "bot_silent_after_onset_ms": self.stop_after_onset_ms,
            "marks_returned": self.timeline.marks_returned,
        }


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT_LIMIT_S):
        while not condition():
            await trio.sleep(FRAME_S)
        return
    raise RuntimeError(f"the simulated call never reached {what} within {WAIT_LIMIT_S} s")


async def wait_for_quiet(phone: SimulatedPhone) -> None:
    """Until the speaker has been silent long enough to call the bot's turn over."""
    quiet_since = trio.current_time()
    with trio.fail_after(WAIT_LIMIT_S):
        while trio.current_time() - quiet_since < SILENCE_MEANS_DONE_S:
            await trio.sleep(FRAME_S)
            if phone.bot_playing:
                quiet_since = trio.current_time()


class StandardCall:
    """The scripted caller of the main job; remembers when it started talking over the answer."""

    def __init__(self, barge_in_after_s: float = ANSWER_BARGE_IN_AFTER_S) -> None:
        self.barge_in_after_s = barge_in_after_s
        self.interrupt = load_clip("caller_interrupt_en.wav")
        self.question = load_clip("caller_question_en.wav")
        self.greeting_clears = 0
        self.utterances_before_barge_in = 0

    async def __call__(self, phone: SimulatedPhone, elapsed_s: Callable[[], float]) -> None:
        note = phone.timeline.note
        await wait_until(lambda: phone.bot_playing, "the greeting")
        note(elapsed_s(), "caller hears the greeting start")
        await trio.sleep(GREETING_TALK_AFTER_S)
        phone.say(self.interrupt)
        note(elapsed_s(), "caller talks during the greeting (must be ignored)")
        await wait_for_quiet(phone)
        self.greeting_clears = len(phone.timeline.clear_times_s)
        note(elapsed_s(), "greeting heard to the end")
        phone.switch_to_speakerphone(elapsed_s())
        await trio.sleep(0.5)
        phone.say(self.question)
        note(elapsed_s(), "caller asks a question")
        await wait_until(lambda: phone.bot_playing, "the answer")
        note(elapsed_s(), "caller hears the answer start")
        await trio.sleep(self.barge_in_after_s)
        self.utterances_before_barge_in = len(phone.timeline.speech_onset_frames)
        phone.say(self.interrupt)
        note(elapsed_s(), "caller talks over the answer")
        await wait_until(lambda: len(phone.timeline.clear_times_s) > self.greeting_clears, "the barge-in")
        await trio.sleep(2.0)
        note(elapsed_s(), "caller hangs up")


def measure(phone: SimulatedPhone, caller: StandardCall) -> SimulationReport:
    """Talk-over, counted in the phone's own frames: bot audio heard from the caller's first audible
    frame of the barge-in until the frame the carrier's buffer was cleared."""
    timeline = phone.timeline
    onsets = timeline.speech_onset_frames[caller.utterances_before_barge_in:]
    onset_frame = onsets[0] if caller.utterances_before_barge_in and onsets else None
    clears = [frame for frame in timeline.clear_frames if onset_frame is not None and frame >= onset_frame]
    if onset_frame is None or not clears:
        return SimulationReport(phone.line.name, timeline, caller.greeting_clears > 0, None, None, None, None)
    heard_frames = sum(1 for frame in timeline.played[onset_frame:clears[0]] if np.any(frame))
    return SimulationReport(
        phone.line.name, timeline, caller.greeting_clears > 0, round(onset_frame * FRAME_S, 3), round(clears[0] * FRAME_S, 3),
        heard_frames * 20, (clears[0] - onset_frame) * 20,
    )


class _DecisionLog(logging.Handler):
    """Puts the server's turn-taking decisions on the phone's timeline."""

    def __init__(self, timeline: PhoneTimeline, started_at: Callable[[], float]) -> None:
        super().__init__(logging.INFO)
        self._timeline = timeline
        self._started_at = started_at

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "[FIRST_UTTERANCE]" in message or "[BARGE_IN]" in message:
            self._timeline.note(trio.current_time() - self._started_at(), "server: " + message.split("] ", 1)[1])


async def simulate_call(
    settings: Settings, call_sid: str = "CA" + "5" * 32, line: PhoneLine = PHONE_LINES["echoing"],
    caller: StandardCall | None = None, call_options: Mapping[str, str] | None = None,
) -> SimulationReport:
    """Serve on a free loopback port, place the standard call (or `caller`'s) on `line`, then shut everything down.

    `call_options` go on the voice webhook's URL, as the number's configuration would put them (barge_in, business_id).
    """
    settings = dataclasses.replace(settings, host="127.0.0.1", port=0)
    phone = SimulatedPhone(line=line)
    caller = caller or StandardCall()
    started_at = trio.current_time()
    handler = _DecisionLog(phone.timeline, lambda: started_at)
    callgate_logger = logging.getLogger("callgate")
    level_before = callgate_logger.level
    callgate_logger.setLevel(min(callgate_logger.getEffectiveLevel(), logging.INFO))  # the timeline needs INFO
    callgate_logger.addHandler(handler)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, settings)
            started_at = trio.current_time()
            await run_phone_call("127.0.0.1", port, call_sid, caller, phone, call_options=call_options)
            await trio.sleep(0.5)  # let the server write the call's records before shutting down
            nursery.cancel_scope.cancel()
    finally:
        callgate_logger.removeHandler(handler)
        callgate_logger.setLevel(level_before)
    return measure(phone, caller)


def plot_call(report: SimulationReport, path: str) -> None:
    """Waveforms in and out, the caller's voice activity, the protection window and the barge-in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsp.vad import FrameVad

    mic = np.concatenate(report.timeline.mic)
    played = np.concatenate(report.timeline.played)
    seconds = np.arange(len(mic)) / 8000
    vad = FrameVad(2)
    voiced = [vad.is_voiced(frame) for frame in report.timeline.mic]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(14, 6))
    bottom.plot(seconds, played, linewidth=0.4, color="tab:blue")
    bottom.set_ylabel("bot audio played")
    top.plot(seconds, mic, linewidth=0.4, color="tab:green")
    top.fill_between(np.arange(len(voiced)) * FRAME_S, -32768, 32767, where=voiced, step="post", alpha=0.15,
                     color="tab:green", label="VAD: voice on the line")
    top.set_ylabel("caller line (voice + echo)")
    for at, what in report.timeline.events:
        if what.startswith("server: Barge-in now ENABLED"):
            for axis in (top, bottom):
                axis.axvspan(0, at, color="tab:orange", alpha=0.08)
                axis.axvline(at, color="tab:orange", linestyle="--")
    for at in report.timeline.clear_times_s:
        for axis in (top, bottom):
            axis.axvline(at, color="tab:red", linewidth=1.5)
    top.legend(loc="upper right")
    bottom.set_xlabel("seconds (orange: greeting protected; red: barge-in clear)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
