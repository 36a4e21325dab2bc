"""Microseconds per 20 ms frame of the whole inbound DSP path, for each echo gate mode; prints JSON.

The input is real speech on two lines: one echoing the bot's long answer back at 10 dB return
loss and 110 ms (the spectral canceller at work), one without echo (the learned bound at work);
both carry line noise and the caller talking over the bot. The modes and lines take turns within
each repeat so that a busy shared machine slows them alike; medians over the repeats are
reported, per line and the worst of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from app.clips import load_clip
from dsp.echo import GATE_MODES
from dsp.echo_path import line_noise, simulate_echo, to_int16
from dsp.g711 import ulaw_encode
from dsp.inbound import InboundFrameAnalyzer

FRAME_SAMPLES = 160
CALLER_START_S = 3.0


LINES = {"echo_10db": 10.0, "no_echo": None}
"""Each line's echo return loss (None: no echo at all)."""


def call_frames(echo_return_loss_db: float | None = 10.0) -> tuple[list[bytes], list[np.ndarray], list[bool]]:
    """Inbound mu-law payloads, the far-end frames played meanwhile, and whether the bot was audible."""
    bot = load_clip("bot_answer_en.wav").astype(np.float64)
    caller = load_clip("caller_interrupt_en.wav").astype(np.float64)
    far = np.concatenate([bot, np.zeros(8000)])
    far = far[: len(far) // FRAME_SAMPLES * FRAME_SAMPLES]
    near = line_noise(len(far), 30.0, np.random.default_rng(0))
    if echo_return_loss_db is not None:
        near += simulate_echo(far, 110.0, echo_return_loss_db)
    start = int(CALLER_START_S * 8000)
    near[start:start + len(caller)] += caller
    frame_count = len(far) // FRAME_SAMPLES
    payloads = [payload.tobytes() for payload in ulaw_encode(to_int16(near)).reshape(frame_count, FRAME_SAMPLES)]
    far_frames = list(to_int16(far).reshape(frame_count, FRAME_SAMPLES))
    audible = [index * FRAME_SAMPLES < len(bot) + 2400 for index in range(frame_count)]
    return payloads, far_frames, audible


def time_one_pass(gate_mode: str, payloads: list[bytes], far_frames: list[np.ndarray], audible: list[bool]) -> float:
    """Microseconds per frame for one fresh analyzer over the whole call."""
    analyzer = InboundFrameAnalyzer(gate_mode, min_rms=200.0, vad_aggressiveness=2, voice_frames=6, debounce_ms=350)
    analyze = analyzer.analyze
    started = time.perf_counter()
    for index, (payload, far, bot_audible) in enumerate(zip(payloads, far_frames, audible)):
        analyze(payload, far, bot_audible, index * 20.0)
    return (time.perf_counter() - started) / len(payloads) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    arguments = parser.parse_args()
    calls = {line: call_frames(loss) for line, loss in LINES.items()}
    cases = [(line, mode) for line in LINES for mode in GATE_MODES]
    for line, mode in cases:
        time_one_pass(mode, *calls[line])
    timings: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for _ in range(arguments.repeats):
        for line, mode in cases:
            timings[line, mode].append(time_one_pass(mode, *calls[line]))
    medians = {case: statistics.median(values) for case, values in timings.items()}
    worst = {mode: max(medians[line, mode] for line in LINES) for mode in GATE_MODES}
    report = {
        "us_per_frame_median": {line: {mode: round(medians[line, mode], 1) for mode in GATE_MODES} for line in LINES},
        "us_per_frame_min": {line: {mode: round(min(timings[line, mode]), 1) for mode in GATE_MODES} for line in LINES},
        "us_per_frame_worst_line_median": {mode: round(value, 1) for mode, value in worst.items()},
        "reference_over_rms_worst_line": round(worst["reference"] / worst["rms"], 2),
        "frames_per_pass": len(calls["echo_10db"][0]),
        "repeats": arguments.repeats,
        "path": "InboundFrameAnalyzer.analyze: mu-law decode, block energies, echo gate, webrtcvad, onset",
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
