"""The demo's sounds: short runs of low, middle and high notes, and rising or falling sweeps, with
captions that name their pitches, count and direction ("two low notes then a high one"); and the
analysis that reads those properties back from any audio (a note tracker on the waveform), which
checks the codec's round trip and what the demo model plays."""

from __future__ import annotations

import json
import random
from itertools import groupby
from pathlib import Path

import numpy as np

from fusion_train.tokenizers.audio import write_wav
from fusion_train.tokenizers.audio_quality import pitch, semitones

NOTES = {"low": 220.0, "middle": 440.0, "high": 880.0}  # octaves apart: unmistakable by pitch
NOTE_SECONDS, GAP_SECONDS, SWEEP_SECONDS = 0.25, 0.08, 0.8
COUNTS = {1: "one", 2: "two", 3: "three"}
SWEEP_SEMITONES = 5  # a sweep spans two octaves; one that glides by more than this has a direction


def _envelope(length: int, rate: int) -> np.ndarray:
    """10 ms fade in and 30 ms fade out: notes without clicks, and gaps a tracker can see."""
    ramp_in, ramp_out = int(0.01 * rate), int(0.03 * rate)
    envelope = np.ones(length)
    envelope[:ramp_in] = np.linspace(0, 1, ramp_in)
    envelope[-ramp_out:] = np.linspace(1, 0, ramp_out)
    return envelope


def _tone(frequency: np.ndarray | float, length: int, rate: int) -> np.ndarray:
    """A sine note (no harmonics: a small codec then has no octave to confuse); `frequency` may glide."""
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(frequency, (length,))) / rate
    return 0.5 * np.sin(phase) * _envelope(length, rate)


def notes_audio(notes: list[str], rate: int) -> np.ndarray:
    gap = np.zeros(int(GAP_SECONDS * rate))
    parts = [piece for name in notes for piece in (_tone(NOTES[name], int(NOTE_SECONDS * rate), rate), gap)]
    return np.concatenate(parts).astype(np.float32)


def sweep_audio(direction: str, rate: int) -> np.ndarray:
    low, high = NOTES["low"], NOTES["high"]
    length = int(SWEEP_SECONDS * rate)
    glide = np.geomspace(low, high, length) if direction == "rising" else np.geomspace(high, low, length)
    return np.concatenate([_tone(glide, length, rate), np.zeros(int(GAP_SECONDS * rate))]).astype(np.float32)


def describe(sound: dict) -> str:
    """'two low notes then a high one', 'a rising sweep'."""
    if sound["kind"] == "sweep":
        return f"a {sound['direction']} sweep"
    runs = [(name, len(list(group))) for name, group in groupby(sound["notes"])]
    words = []
    for i, (name, count) in enumerate(runs):
        if count > 1:
            words.append(f"{COUNTS[count]} {name} notes")
        else:
            words.append(f"a {name} note" if i == 0 else f"a {name} one")
    return " then ".join(words)


def random_sound(rng: random.Random) -> dict:
    if rng.random() < 0.25:
        return {"kind": "sweep", "direction": rng.choice(["rising", "falling"])}
    return {"kind": "notes", "notes": [rng.choice(sorted(NOTES)) for _ in range(rng.randint(1, 3))]}


def render(sound: dict, rate: int) -> np.ndarray:
    return sweep_audio(sound["direction"], rate) if sound["kind"] == "sweep" else notes_audio(sound["notes"], rate)


def _nearest_note(frequency: float | None) -> str | None:
    """The note within a semitone of `frequency`, if any."""
    if frequency is None:
        return None
    name, reference = min(NOTES.items(), key=lambda item: abs(semitones(frequency, item[1])))
    return name if abs(semitones(frequency, reference)) <= 1 else None


def _sounding_spans(samples: np.ndarray, rate: int) -> list[tuple[int, int]]:
    """[start, end) of each stretch louder than a tenth of the loudest 10 ms frame, ignoring dips
    shorter than 30 ms."""
    frame = int(0.01 * rate)
    energy = np.sqrt(np.mean(samples[: len(samples) // frame * frame].reshape(-1, frame) ** 2, axis=1))
    if energy.size == 0 or energy.max() < 1e-3:
        return []
    loud = energy > 0.1 * energy.max()
    spans, start = [], None
    for i, on in enumerate([*loud, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            if spans and start - spans[-1][1] < 3:
                spans[-1] = (spans[-1][0], i)
            else:
                spans.append((start, i))
            start = None
    return [(s * frame, e * frame) for s, e in spans if e - s >= 5]  # at least 50 ms


def analyse(samples: np.ndarray, rate: int) -> dict:
    """What a sound is, read from its waveform: the notes of its sounding stretches, or a sweep's
    direction when one long stretch glides; `{"kind": "unclear"}` otherwise."""
    spans = _sounding_spans(samples, rate)
    if len(spans) == 1 and spans[0][1] - spans[0][0] > 0.5 * SWEEP_SECONDS * rate:
        start, end = spans[0]
        tenth = (end - start) // 10
        first, last = pitch(samples[start : start + tenth], rate), pitch(samples[end - tenth : end], rate)
        if first and last and abs(semitones(last, first)) > SWEEP_SEMITONES:
            return {"kind": "sweep", "direction": "rising" if last > first else "falling"}
    notes = []
    for start, end in spans:
        middle = samples[start + (end - start) // 4 : end - (end - start) // 4]
        notes.append(_nearest_note(pitch(middle, rate)))
    if not notes or None in notes:
        return {"kind": "unclear"}
    return {"kind": "notes", "notes": notes}


def write_sound_captions(folder: Path, count: int, seed: int, rate: int) -> Path:
    """`count` WAV files under folder/sounds and `sounds.jsonl` of {"audio", "caption", "sound"}."""
    rng = random.Random(seed)
    (folder / "sounds").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        sound = random_sound(rng)
        name = f"sounds/{i:05d}.wav"
        write_wav(folder / name, render(sound, rate), rate)
        lines.append(json.dumps({"audio": name, "caption": describe(sound), "sound": sound}))
    (folder / "sounds.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "sounds.jsonl"
