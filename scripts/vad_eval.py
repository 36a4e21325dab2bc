"""Barge-in evaluation of the echo gates on real speech over simulated phone lines; prints JSON.

Every run goes through InboundFrameAnalyzer exactly as the call path does: the caller's line
(caller + the bot's echo + line noise) is mu-law encoded with the project's codec and fed frame by
frame with the far-end frame that was playing. A run is a stretch of call: optionally the greeting
and the caller's question, then the bot's answer, and the caller barging into it. The sweep covers
what a deployment varies: the line's echo (none to 6 dB return loss, two hybrids, delays 0-300 ms,
a speakerphone switched on between greeting and answer), the caller's level against the bot, where
in the answer the caller barges in, whether the gate heard a greeting first, the shift of the echo
delay between responses that network jitter causes, and the voices and languages of bot and caller.
Both gate modes run on the same audio; the figures are per line kind, with the worst cell.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.clips import load_clip, load_wav
from dsp.echo import GATE_MODES
from dsp.echo_path import active_speech_rms, line_noise, simulate_echo, to_int16
from dsp.g711 import ulaw_encode
from dsp.inbound import InboundFrameAnalyzer
from dsp.level import rms

SAMPLE_RATE_HZ = 8000
FRAME_SAMPLES = 160
FRAME_MS = 20.0
SPEECH_ONSET_RMS = 300.0
LINE_NOISE_RMS = 30.0
LEAD_IN_MS = 600.0
TRAIL_MS = 600.0
GREETING_TO_QUESTION_MS = 500.0
QUESTION_TO_ANSWER_MS = 700.0
CLICK_PEAK = 30000.0
CLICK_AT_MS = 2000.0
"""Where in the answer the click lands; onsets from it to CLICK_REACH_MS after count as the click's."""
CLICK_REACH_MS = 400.0
SWITCH_SETTLE_MS = 2000.0
"""After a speakerphone switch, onsets later than this into the answer count against the gate."""
CALLER_VOICE_ACTIVE_DB = 25.0
"""A caller frame is speech, for the forwarding figure, when within this many dB of the clip's active level."""

VOICES = Path(__file__).resolve().parent / "voices"
BOT_VOICES = {
    "en_m": ("bot_greeting_en.wav", "bot_answer_en.wav"),
    "en_f": ("voices/bot_greeting_en_f.wav", "voices/bot_answer_en_f.wav"),
    "he_f": ("voices/bot_greeting_he_f.wav", "voices/bot_answer_he_f.wav"),
}
CALLER_VOICES = (
    "caller_interrupt_en.wav", "caller_interrupt_he.wav", "voices/caller_sorry_en_f.wav",
    "voices/caller_hold_en_m.wav", "voices/caller_wait_he_m.wav",
)
CALLER_LEVELS_DB = (-10.0, -6.0, 0.0, 6.0)
"""The caller's active speech level relative to the bot's."""
BARGE_IN_AT_S = (0.5, 1.5, 3.0, 6.0, 10.0)
MAX_DELAY_MS = 300.0
ECHO_DELAYS_MS = (0.0, 35.0, 80.0, 125.0, 170.0, 215.0, 260.0, 300.0)
DELAY_SHIFTS_MS = (0.0, 20.0, -20.0, 40.0)
"""How far the answer's echo delay sits from the greeting's: network jitter when each response starts."""
OTHER_PATH = {"hybrid_band_hz": (400.0, 2800.0), "hybrid_order": 4}
"""A second, narrower and steeper echo path: a guard against fitting the main hybrid."""
RUNS_PER_CELL = 3
SLOW_BARGE_IN_MS = 160.0
"""The issue's bound on a barge-in's latency on echoing lines: runs over it are counted, not only the p95."""


@dataclass(frozen=True)
class LineKind:
    """The echo on the caller's line: `greeting_erl_db` differs from `answer_erl_db` for a speakerphone switch."""

    name: str
    answer_erl_db: float | None
    greeting_erl_db: float | None

    @property
    def switched(self) -> bool:
        return self.answer_erl_db != self.greeting_erl_db


LINE_KINDS = (
    LineKind("no_echo", None, None),
    LineKind("erl_40db", 40.0, 40.0),
    LineKind("erl_30db", 30.0, 30.0),
    LineKind("erl_20db", 20.0, 20.0),
    LineKind("erl_10db", 10.0, 10.0),
    LineKind("erl_6db", 6.0, 6.0),
    LineKind("speakerphone_30_to_6db", 6.0, 30.0),
    LineKind("speakerphone_clean_to_6db", 6.0, None),
)
GREETING_CASES = ("no_greeting", "greeting")
SETTINGS = {"min_rms": 200.0, "vad_aggressiveness": 2, "voice_frames": 6, "debounce_ms": 350.0}


def clip(name: str) -> np.ndarray:
    if name.startswith("voices/"):
        return load_wav(VOICES / name.removeprefix("voices/")).astype(np.float64)
    return load_clip(name).astype(np.float64)


def samples(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE_HZ / 1000.0))


def speech_onset_ms(speech: np.ndarray) -> float:
    """Start of the first 20 ms frame above ~300 RMS at the clip's own level (the clips' documented onset)."""
    frame_count = len(speech) // FRAME_SAMPLES
    frames = speech[: frame_count * FRAME_SAMPLES].reshape(frame_count, FRAME_SAMPLES)
    return next(index for index, frame in enumerate(frames) if rms(frame) > SPEECH_ONSET_RMS) * FRAME_MS


def audible_onset_ms(line: np.ndarray, start_ms: float) -> float:
    """Where the caller's voice starts counting towards an onset on `line`: the caller alone, no bot.

    The inbound path fires on this line (caller and line noise, from the call's start) with
    nothing playing; that onset less its `voice_frames` frames is the earliest any gate allows,
    so latencies measured from here have the 120 ms floor and show only what the echo costs.
    """
    analyzer = InboundFrameAnalyzer(gate_mode="reference", **SETTINGS)
    for index, payload in enumerate(ulaw_encode(to_int16(line)).reshape(-1, FRAME_SAMPLES)):
        now_ms = index * FRAME_MS
        if analyzer.analyze(payload.tobytes(), None, False, now_ms).onset and now_ms >= start_ms:
            return now_ms + FRAME_MS - SETTINGS["voice_frames"] * FRAME_MS
    raise ValueError(f"the caller alone never fires an onset after {start_ms} ms: not a barge-in to measure")


@dataclass(frozen=True)
class Run:
    """One run's conditions; `build` turns them into audio."""

    kind: str
    line: LineKind
    bot: str
    caller: str | None = None
    caller_level_db: float = 0.0
    barge_in_at_s: float | None = None
    greeting: bool = False
    delay_ms: float = 100.0
    delay_shift_ms: float = 0.0
    other_path: bool = False
    click: bool = False
    cell: tuple = ()


@dataclass
class Built:
    near: np.ndarray
    far: np.ndarray
    caller_spans_ms: list[tuple[float, float]] = field(default_factory=list)
    barge_in_onset_ms: float | None = None
    barge_in_loud_ms: float | None = None
    barge_in_end_ms: float | None = None
    caller_speech_frames: np.ndarray | None = None
    answer_start_ms: float = 0.0
    click_ms: float | None = None


class Mixer:
    """Lays clips on the far end and the caller's line; echoes each far-end segment through its own path."""

    def __init__(self, length_ms: float, rng: np.random.Generator) -> None:
        length = samples(length_ms) // FRAME_SAMPLES * FRAME_SAMPLES
        self.far = np.zeros(length)
        self.noise = line_noise(length, LINE_NOISE_RMS, rng)
        self.near = self.noise.copy()
        self.caller = np.zeros(length)

    def play(self, speech: np.ndarray, start_ms: float, erl_db: float | None, delay_ms: float, other_path: bool) -> float:
        """The bot says `speech` from `start_ms`; its echo joins the caller's line. Returns where it ends."""
        segment = np.zeros_like(self.far)
        start = samples(start_ms)
        end = min(len(segment), start + len(speech))
        segment[start:end] = speech[: end - start]
        self.far += segment
        if erl_db is not None:
            self.near += simulate_echo(segment, delay_ms, erl_db, **(OTHER_PATH if other_path else {}))
        return start_ms + len(speech) / 8.0

    def speak(self, speech: np.ndarray, start_ms: float) -> float:
        start = samples(start_ms)
        end = min(len(self.caller), start + len(speech))
        self.caller[start:end] += speech[: end - start]
        return start_ms + len(speech) / 8.0


def build(run: Run, rng: np.random.Generator) -> Built:
    greeting_clip, answer_clip = (clip(name) for name in BOT_VOICES[run.bot])
    caller = None if run.caller is None else clip(run.caller)
    if caller is not None:
        level = active_speech_rms(answer_clip) * 10.0 ** (run.caller_level_db / 20.0)
        caller *= level / active_speech_rms(caller)
    spans: list[tuple[float, float]] = []
    at_ms = LEAD_IN_MS
    if run.greeting:
        at_ms += len(greeting_clip) / 8.0 + GREETING_TO_QUESTION_MS
        if caller is not None:
            spans.append((at_ms, at_ms + len(caller) / 8.0))
            at_ms = spans[-1][1]
        at_ms += QUESTION_TO_ANSWER_MS
    answer_start_ms = at_ms
    if run.barge_in_at_s is not None and caller is not None:
        barge_in_ms = answer_start_ms + 1000.0 * run.barge_in_at_s
        end_ms = barge_in_ms + len(caller) / 8.0 + TRAIL_MS
    else:
        end_ms = answer_start_ms + len(answer_clip) / 8.0 + run.delay_ms + TRAIL_MS
    mixer = Mixer(end_ms, rng)
    if run.greeting:
        # A speakerphone switched on changes the acoustic path too; otherwise the line keeps its hybrid.
        mixer.play(greeting_clip, LEAD_IN_MS, run.line.greeting_erl_db, run.delay_ms, run.other_path and not run.line.switched)
        if caller is not None:
            mixer.speak(caller, spans[0][0])
    # The gate is built for delays of 0-300 ms: a shift does not carry the echo outside them.
    answer_delay_ms = min(max(run.delay_ms + (run.delay_shift_ms if run.greeting else 0.0), 0.0), MAX_DELAY_MS)
    mixer.play(answer_clip, answer_start_ms, run.line.answer_erl_db, answer_delay_ms, run.other_path or run.line.switched)
    built = Built(mixer.near, mixer.far, spans, answer_start_ms=answer_start_ms)
    if run.barge_in_at_s is not None and caller is not None:
        barge_in_ms = answer_start_ms + 1000.0 * run.barge_in_at_s
        built.barge_in_end_ms = mixer.speak(caller, barge_in_ms)
        built.barge_in_loud_ms = barge_in_ms + speech_onset_ms(clip(run.caller))
        built.barge_in_onset_ms = audible_onset_ms(mixer.noise + mixer.caller, barge_in_ms)
        spans.append((barge_in_ms, built.barge_in_end_ms))
    if run.click:
        click = clip("click_noise_60ms.wav")
        built.click_ms = answer_start_ms + CLICK_AT_MS
        mixer.near[samples(built.click_ms):][: len(click)] += click * (CLICK_PEAK / np.abs(click).max())
    frames = mixer.caller.reshape(-1, FRAME_SAMPLES)
    frame_levels = np.sqrt(np.mean(frames**2, axis=1))
    loudest = frame_levels.max() if len(frame_levels) else 0.0
    built.caller_speech_frames = frame_levels > loudest * 10.0 ** (-CALLER_VOICE_ACTIVE_DB / 20.0) if loudest else None
    built.near = to_int16(mixer.near + mixer.caller)
    built.far = to_int16(mixer.far)
    return built


def analyse(built: Built, gate_mode: str) -> tuple[list[float], np.ndarray]:
    """End times of the frames that fired an onset, and which frames the model would hear as the caller."""
    analyzer = InboundFrameAnalyzer(gate_mode=gate_mode, **SETTINGS)
    payloads = ulaw_encode(built.near).reshape(-1, FRAME_SAMPLES)
    far_frames = built.far.reshape(-1, FRAME_SAMPLES)
    fired = []
    forwarded = np.zeros(len(payloads), dtype=bool)
    for index, (payload, far) in enumerate(zip(payloads, far_frames)):
        now_ms = index * FRAME_MS
        analysis = analyzer.analyze(payload.tobytes(), far, True, now_ms)
        forwarded[index] = analysis.caller_audio
        if analysis.onset:
            fired.append(now_ms + FRAME_MS)
    return fired, forwarded


def outcome(run: Run, seed: int) -> list[dict]:
    """What each gate mode did on one run: false onsets, the barge-in's latency or a miss, frames forwarded."""
    built = build(run, np.random.default_rng(seed))
    far_active = np.abs(built.far.reshape(-1, FRAME_SAMPLES)).max(axis=1) > 0
    results = []
    for mode in GATE_MODES:
        fired, forwarded = analyse(built, mode)
        in_caller = [any(start < t <= end + FRAME_MS for start, end in built.caller_spans_ms) for t in fired]
        false = [t for t, caller in zip(fired, in_caller) if not caller]
        result = {"mode": mode, "kind": run.kind, "line": run.line.name, "cell": run.cell, "false_onsets": len(false),
                  "minutes": len(built.near) / SAMPLE_RATE_HZ / 60.0}
        if built.click_ms is not None:
            # A speakerphone switch's own onset is not the click's.
            result["false_onsets"] = sum(1 for t in false if built.click_ms < t <= built.click_ms + CLICK_REACH_MS)
        if run.line.switched and not run.caller:
            result["false_onsets_after_settling"] = sum(1 for t in false if t > built.answer_start_ms + SWITCH_SETTLE_MS)
        if built.barge_in_onset_ms is not None:
            start = built.caller_spans_ms[-1][0]
            hits = [t for t in fired if start < t <= built.barge_in_end_ms + FRAME_MS]
            result["latency_ms"] = hits[0] - built.barge_in_onset_ms if hits else None
            result["latency_from_first_loud_frame_ms"] = hits[0] - built.barge_in_loud_ms if hits else None
            first = int(start // FRAME_MS)
            speech = built.caller_speech_frames[first:] & far_active[first:]
            result["caller_frames"] = int(speech.sum())
            result["caller_frames_forwarded"] = int((speech & forwarded[first:]).sum())
        if run.kind == "echo_only":
            result["echo_frames"] = int(far_active.sum())
            result["echo_frames_forwarded"] = int((far_active & forwarded).sum())
        results.append(result)
    return results


def runs() -> list[Run]:
    """Every run of the evaluation: conditions rotate inside each cell so each cell sees several voices and paths."""
    plan: list[Run] = []
    rotation = itertools.count()
    bots = list(BOT_VOICES)
    for line in LINE_KINDS:
        greetings = ("greeting",) if line.switched else GREETING_CASES
        for greeting, level, at_s in itertools.product(greetings, CALLER_LEVELS_DB, BARGE_IN_AT_S):
            for _ in range(RUNS_PER_CELL):
                turn = next(rotation)
                plan.append(Run(
                    "barge_in", line, bots[turn % len(bots)], CALLER_VOICES[turn % len(CALLER_VOICES)], level, at_s,
                    greeting == "greeting", ECHO_DELAYS_MS[turn % len(ECHO_DELAYS_MS)],
                    DELAY_SHIFTS_MS[turn % len(DELAY_SHIFTS_MS)], other_path=turn % 7 in (2, 5),
                    cell=(line.name, greeting, level, at_s)))
        for bot, delay_ms in itertools.product(bots, ECHO_DELAYS_MS):
            turn = next(rotation)
            for greeting in greetings:
                plan.append(Run(
                    "echo_only", line, bot, greeting=greeting == "greeting", delay_ms=delay_ms,
                    delay_shift_ms=DELAY_SHIFTS_MS[turn % len(DELAY_SHIFTS_MS)], other_path=turn % 3 == 1,
                    cell=(line.name, greeting)))
        for greeting in greetings:
            plan.append(Run("click", line, bots[0], greeting=greeting == "greeting", click=True, cell=(line.name, greeting)))
    return plan


def _outcome_of(indexed: tuple[int, Run], seed: int) -> list[dict]:
    index, run = indexed
    return outcome(run, seed * 100_003 + index)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarise(results: list[dict]) -> dict:
    report: dict = {}
    for mode in GATE_MODES:
        mine = [result for result in results if result["mode"] == mode]
        by_line: dict = {}
        for line in LINE_KINDS:
            on_line = [result for result in mine if result["line"] == line.name]
            if not on_line:
                continue
            barge_ins = [result for result in on_line if result["kind"] == "barge_in"]
            echo_only = [result for result in on_line if result["kind"] == "echo_only"]
            latencies = [result["latency_ms"] for result in barge_ins if result["latency_ms"] is not None]
            from_loud = [result["latency_from_first_loud_frame_ms"] for result in barge_ins
                         if result["latency_ms"] is not None]
            cells: dict = {}
            for result in barge_ins:
                cells.setdefault(result["cell"], []).append(result)
            worst_cell, worst = max(cells.items(), key=lambda item: (
                sum(result["latency_ms"] is None for result in item[1]),
                max((result["latency_ms"] or 0.0) for result in item[1])))
            echo_minutes = sum(result["minutes"] for result in echo_only)
            summary = {
                "barge_ins": len(barge_ins),
                "missed": sum(result["latency_ms"] is None for result in barge_ins),
                "latency_p50_ms": percentile(latencies, 50),
                "latency_p95_ms": percentile(latencies, 95),
                "latency_max_ms": max(latencies) if latencies else None,
                f"slower_than_{SLOW_BARGE_IN_MS:g}_ms": sum(latency > SLOW_BARGE_IN_MS for latency in latencies),
                # A call's barge-in is on only once its greeting was heard: the runs with one are the calls' case.
                "latency_p95_ms_after_a_greeting": percentile(
                    [result["latency_ms"] for result in barge_ins
                     if result["cell"][1] == "greeting" and result["latency_ms"] is not None], 95),
                "latency_from_first_loud_frame_p50_ms": percentile(from_loud, 50),
                "latency_from_first_loud_frame_p95_ms": percentile(from_loud, 95),
                "false_onsets_in_barge_in_runs": sum(result["false_onsets"] for result in barge_ins),
                "echo_only_minutes": round(echo_minutes, 1),
                "false_onsets_echo_only": sum(result["false_onsets"] for result in echo_only),
                "false_onsets_on_clicks": sum(result["false_onsets"] for result in on_line if result["kind"] == "click"),
                "echo_frames_forwarded": round(
                    sum(result["echo_frames_forwarded"] for result in echo_only)
                    / max(1, sum(result["echo_frames"] for result in echo_only)), 4),
                "caller_frames_forwarded": round(
                    sum(result["caller_frames_forwarded"] for result in barge_ins)
                    / max(1, sum(result["caller_frames"] for result in barge_ins)), 3),
                "worst_cell": {
                    "greeting": worst_cell[1], "caller_level_db": worst_cell[2], "barge_in_at_s": worst_cell[3],
                    "latencies_ms": [result["latency_ms"] for result in worst]},
            }
            if line.switched:
                summary["false_onsets_echo_only_after_2s"] = sum(
                    result["false_onsets_after_settling"] for result in echo_only)
                summary["most_false_onsets_in_one_run"] = max(result["false_onsets"] for result in echo_only)
            by_line[line.name] = summary
        by_level = {}
        for level in CALLER_LEVELS_DB:
            at_level = [r for r in mine if r["kind"] == "barge_in" and r["cell"][2] == level]
            latencies = [r["latency_ms"] for r in at_level if r["latency_ms"] is not None]
            by_level[f"{level:+g}db"] = {"missed": sum(r["latency_ms"] is None for r in at_level),
                                         "latency_p95_ms": percentile(latencies, 95)}
        report[mode] = {"by_line": by_line, "by_caller_level": by_level}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="seed of the line noise")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lines", help="comma-separated line kinds to run (default: all): "
                        + ",".join(line.name for line in LINE_KINDS))
    arguments = parser.parse_args()
    line_names = None if arguments.lines is None else set(arguments.lines.split(","))
    unknown = (line_names or set()) - {line.name for line in LINE_KINDS}
    if unknown:
        parser.error(f"unknown line kinds: {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    # Filtered after planning, so a run keeps its voices, delay and seed whichever lines are asked for.
    plan = [(index, run) for index, run in enumerate(runs()) if line_names is None or run.line.name in line_names]
    with multiprocessing.Pool(arguments.processes) as pool:
        results = [result for outcome_ in pool.map(partial(_outcome_of, seed=arguments.seed), plan, chunksize=4)
                   for result in outcome_]
    report = summarise(results)
    report["conditions"] = {
        **SETTINGS,
        "runs": len(plan),
        "line_noise_rms": LINE_NOISE_RMS,
        "line_kinds": {line.name: {"greeting_erl_db": line.greeting_erl_db, "answer_erl_db": line.answer_erl_db}
                       for line in LINE_KINDS},
        "caller_levels_db": list(CALLER_LEVELS_DB),
        "barge_in_at_s": list(BARGE_IN_AT_S),
        "echo_delays_ms": list(ECHO_DELAYS_MS),
        "delay_shifts_ms": list(DELAY_SHIFTS_MS),
        "bot_voices": list(BOT_VOICES),
        "caller_voices": [name.removeprefix("voices/") for name in CALLER_VOICES],
        "echo_paths": ["2nd-order 250-3300 Hz band-pass", "4th-order 400-2800 Hz band-pass"],
        "seed": arguments.seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
