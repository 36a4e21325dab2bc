"""Microseconds per 20 ms frame of the whole inbound DSP path, for each echo gate mode; prints JSON.

The input is real speech with echo: the bot's long answer echoed back at 10 dB return loss and
110 ms, line noise, and the caller talking over it. The modes take turns within each repeat so
that a busy shared machine slows them alike; medians over the repeats are reported.
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


def call_frames() -> tuple[list[bytes], list[np.ndarray], list[bool]]:
    """Inbound mu-law payloads, the far-end frames played meanwhile, and whether the bot was audible."""
    bot = load_clip("bot_answer_en.wav").astype(np.float64)
    caller = load_clip("caller_interrupt_en.wav").astype(np.float64)
    far = np.concatenate([bot, np.zeros(8000)])
    far = far[: len(far) // FRAME_SAMPLES * FRAME_SAMPLES]
    near = simulate_echo(far, 110.0, 10.0) + line_noise(len(far), 30.0, np.random.default_rng(0))
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
    payloads, far_frames, audible = call_frames()
    for mode in GATE_MODES:
        time_one_pass(mode, payloads, far_frames, audible)
    timings: dict[str, list[float]] = {mode: [] for mode in GATE_MODES}
    for _ in range(arguments.repeats):
        for mode in GATE_MODES:
            timings[mode].append(time_one_pass(mode, payloads, far_frames, audible))
    medians = {mode: statistics.median(values) for mode, values in timings.items()}
    report = {
        "us_per_frame_median": {mode: round(value, 1) for mode, value in medians.items()},
        "us_per_frame_min": {mode: round(min(values), 1) for mode, values in timings.items()},
        "reference_over_rms": round(medians["reference"] / medians["rms"], 2),
        "frames_per_pass": len(payloads),
        "repeats": arguments.repeats,
        "path": "InboundFrameAnalyzer.analyze: mu-law decode, block energies, echo gate, webrtcvad, onset",
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
