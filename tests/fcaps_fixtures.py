"""Tiny FCaps-format corpora for tests: Lhotse MonoCut manifests + audio files written on the spot."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import soundfile as sf

GENDERS = ("female", "male")
ACCENTS = ("american", "british", "indian", "scottish", "german")
PITCHES = ("high-pitched", "low-pitched", "medium-pitched")
RATES = ("fast speed", "slow speed", "measured speed")
INTRINSIC = ("raspy", "smooth", "husky", "nasal")
SITUATIONAL = ("happy", "calm", "angry", "whispered")


def global_caption(i: int, gender: str, accent: str, pitch: str, rate: str) -> str:
    """A global caption (>= 32 chars) that mentions the clip's attributes."""
    pace = "fast" if rate.startswith("fast") else "slow" if rate.startswith("slow") else "steady"
    return f"A {pitch} {gender} speaker with a {accent} accent talks at a {pace} pace (clip {i})."


def finegrained_caption(i: int, k: int, gender: str) -> str:
    """A fine-grained caption of 128-768 chars, without negations or several speakers."""
    pronoun = "she" if gender == "female" else "he"
    body = (
        f"The speaker begins quietly and {pronoun} then raises the voice, pausing between phrases "
        f"while the tone grows warmer; towards the end {pronoun} laughs softly and slows down."
    )
    return f"Caption {k} of clip {i}: " + body + " " + "Calm and even delivery. " * (k % 3)


def cut(
    clip_id: str,
    source: str,
    duration: float,
    *,
    start: float = 0.0,
    channel: int = 0,
    channels: list[int] | None = None,
    sampling_rate: int = 16000,
    global_captions: list[str] | None = None,
    finegrained_captions: list[str] | None = None,
    index: int = 0,
) -> dict:
    """A MonoCut record with attributes derived from ``index``."""
    gender = GENDERS[index % 2]
    accent = ACCENTS[index % len(ACCENTS)]
    pitch = PITCHES[index % len(PITCHES)]
    rate = RATES[(index // 2) % len(RATES)]
    if global_captions is None:
        global_captions = [global_caption(index, gender, accent, pitch, rate)]
    if finegrained_captions is None:
        finegrained_captions = [finegrained_caption(index, k, gender) for k in range(1 + index % 3)]
    return {
        "id": clip_id,
        "start": start,
        "duration": duration,
        "channel": channel,
        "recording": {
            "id": f"rec-{clip_id}",
            "sources": [{"type": "file", "channels": channels or [0], "source": source}],
            "sampling_rate": sampling_rate,
            "num_samples": int(round((start + duration) * sampling_rate)),
            "duration": start + duration,
        },
        "supervisions": [
            {
                "id": f"sup-{clip_id}",
                "recording_id": f"rec-{clip_id}",
                "start": 0.0,
                "duration": duration,
                "channel": channel,
                "text": "",
                "speaker": f"spk{index % 4}",
                "gender": gender,
                "custom": {
                    "global_captions": global_captions,
                    "finegrained_captions": finegrained_captions,
                    "accent": accent,
                    "pitch": pitch,
                    "speaking_rate": rate,
                    "intrinsic_tags": [INTRINSIC[index % len(INTRINSIC)]],
                    "situational_tags": [SITUATIONAL[index % len(SITUATIONAL)]],
                },
            }
        ],
        "type": "MonoCut",
    }


def tone(seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """float32 [frames, channels]: a quiet tone plus noise, different per channel and seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    cols = [
        0.3 * np.sin(2 * np.pi * (220 + 40 * c + 10 * seed) * t) + 0.01 * rng.standard_normal(t.size)
        for c in range(channels)
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def write_audio(path: Path, data: np.ndarray, rate: int = 16000, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, subtype=subtype)
    return path


def write_manifest(path: Path, records: list) -> Path:
    """Writes records (dicts become JSON lines; bytes are written verbatim) as .jsonl or .jsonl.gz."""
    lines = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        # mtime=0: identical bytes on every call, so builds from two calls are comparable.
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(lines)
    else:
        path.write_bytes(lines)
    return path


def make_corpus(root: Path, num_clips: int, *, min_s: float = 2.5, max_s: float = 9.0, seed: int = 0):
    """``num_clips`` good clips (wav files under root/audio) + root/cuts.jsonl.gz.

    Returns (manifest_path, audio_root, records). Durations are spread over [min_s, max_s].
    """
    rng = np.random.default_rng(seed)
    audio_root = root / "audio"
    records = []
    for i in range(num_clips):
        duration = float(np.round(rng.uniform(min_s, max_s), 2))
        write_audio(audio_root / f"c{i:04d}.wav", tone(duration, seed=i))
        records.append(cut(f"clip{i:04d}", f"c{i:04d}.wav", duration, index=i))
    manifest = write_manifest(root / "cuts.jsonl.gz", records)
    return manifest, audio_root, records
