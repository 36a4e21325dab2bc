"""The whole inbound DSP path for one carrier frame: decode, level, VAD, echo gate, onset."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsp.echo import BLOCKS_PER_FRAME, block_energies, make_echo_gate
from dsp.g711 import ulaw_decode
from dsp.vad import FrameVad, VoiceOnset

INBOUND_FRAME_BYTES = 160
"""One 20 ms frame of 8 kHz mu-law, as the carrier sends it."""
MASKED_FRAMES_BRIDGED = 2
"""A voiced frame the gate cannot tell from echo, inside the caller's run (a stop consonant under a loud
syllable of the bot), does not restart the onset's count; two per run (a quiet caller's first word may dip
twice), so echo cannot string one together: it must pass the gate on six frames of eight."""
CALLER_HANGOVER_FRAMES = 10
"""After a voiced frame the gate took for the caller, voiced frames within 200 ms are the caller's too."""


@dataclass(frozen=True, slots=True)
class FrameAnalysis:
    """What the inbound path learned from one frame."""

    pcm: np.ndarray
    rms: float
    voiced: bool
    passes_gate: bool
    onset: bool
    caller_audio: bool
    """What the model should hear as the caller: frames the gate passes, and voiced frames just after
    them (the quiet syllables of a caller talking over the bot, which the echo hides from the gate)."""


class InboundFrameAnalyzer:
    """Per-call inbound analysis; `onset` fires on `voice_frames` consecutive voiced frames that pass the gate."""

    def __init__(
        self, gate_mode: str, min_rms: float, vad_aggressiveness: int, voice_frames: int, debounce_ms: float
    ) -> None:
        self.gate = make_echo_gate(gate_mode, min_rms)
        self.vad = FrameVad(vad_aggressiveness, sample_rate_hz=8000)
        # The seed's rms rule keeps the seed's strictly consecutive onset.
        bridged = MASKED_FRAMES_BRIDGED if gate_mode == "reference" else 0
        self.voice_onset = VoiceOnset(voice_frames=voice_frames, debounce_ms=debounce_ms, masked_frames_bridged=bridged)
        # Reused every frame: the near and far frames as float rows, converted by assignment.
        self.near_and_far = np.zeros((2, INBOUND_FRAME_BYTES))
        self.frames_since_caller_voice = CALLER_HANGOVER_FRAMES + 1

    def analyze(self, payload: bytes, far: np.ndarray | None, bot_audible: bool, now_ms: float) -> FrameAnalysis:
        """Analyse one 160-byte mu-law frame; `far` is the 20 ms played to the caller meanwhile (None: nothing)."""
        if len(payload) != INBOUND_FRAME_BYTES:
            raise ValueError(
                f"an inbound frame must be {INBOUND_FRAME_BYTES} bytes of 8 kHz mu-law (20 ms), got {len(payload)} bytes"
            )
        pcm = ulaw_decode(np.frombuffer(payload, dtype=np.uint8))
        if far is not None and len(far) != INBOUND_FRAME_BYTES:
            raise ValueError(f"the far-end frame must be {INBOUND_FRAME_BYTES} int16 samples (20 ms), got {len(far)}")
        self.near_and_far[0] = pcm
        self.near_and_far[1] = 0 if far is None else far
        # One pass over near and far together: the gate and the RMS share these block energies.
        energies = block_energies(self.near_and_far)
        passes_gate = self.gate.accepts_frames(self.near_and_far, energies, bot_audible)
        voiced = self.vad.is_voiced(pcm)
        onset = self.voice_onset.update(voiced and passes_gate, now_ms, masked=voiced and not passes_gate)
        self.frames_since_caller_voice = 0 if voiced and passes_gate else self.frames_since_caller_voice + 1
        caller_audio = passes_gate or (voiced and self.frames_since_caller_voice <= CALLER_HANGOVER_FRAMES)
        return FrameAnalysis(
            pcm=pcm, rms=math.sqrt(float(energies[0].sum()) / BLOCKS_PER_FRAME), voiced=voiced, passes_gate=passes_gate,
            onset=onset, caller_audio=caller_audio,
        )
