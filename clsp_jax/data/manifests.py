"""Lhotse MonoCut manifests and their audio: reading lines, parsing cuts, selecting captions, decoding clips.

A manifest is JSON Lines (optionally gzip-compressed), one Lhotse ``MonoCut`` per line::

    {"id": ..., "start": 0.0, "duration": 7.3, "channel": 0,
     "recording": {"id": ..., "sampling_rate": 44100, "num_samples": ...,
                   "sources": [{"type": "file", "channels": [0, 1], "source": "a/b.flac"}]},
     "supervisions": [{"speaker": ..., "gender": "female",
                       "custom": {"global_captions": [...], "finegrained_captions": [...],
                                  "accent": ..., "pitch": ..., "speaking_rate": ...,
                                  "intrinsic_tags": [...], "situational_tags": [...]}}]}

``short_captions`` / ``long_captions`` (the authors' training-code names) are accepted as aliases of
``global_captions`` / ``finegrained_captions``.

Audio sources: ``type`` must be ``"file"``. ``source`` is a path (relative to the audio root unless
absolute) or, to read a member of a tar archive without unpacking it, ``"<archive>.tar//<member>"``
(also ``.tar.gz`` / ``.tgz``). Lhotse has no tar-member source type, so this is our convention.

Anything wrong with a clip raises :class:`ClipRejected` with a short machine-readable ``reason``.

Decoding (:func:`load_clip`, :func:`read_segment`): cut [start, start+duration), pick channels, resample to
16 kHz. soundfile (libsndfile, which reads mp3 from version 1.1) decodes; when it cannot open a file,
audioread is tried (it can use ffmpeg/gstreamer backends where the system has them). Resampling uses soxr
(HQ), which is deterministic, so re-running a data build gives identical bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import soxr

TAR_MEMBER_RE = re.compile(r"^(?P<archive>.+\.(?:tar|tar\.gz|tgz))//(?P<member>.+)$")

# The authors' FCaps caption selection (local/filter_and_select_captions.py): a clip whose
# fine-grained captions mention several speakers is dropped; fine-grained captions containing a
# negation are dropped (their wording is unreliable for contrastive training); the kept ones are
# sorted by length, so "the last fine-grained caption" (used for evaluation) is the longest.
MULTI_SPEAKER_RE = re.compile(r"\b(speakers|first speaker|second speaker)\b", re.IGNORECASE)
NEGATION_RE = re.compile(
    r"\bno\b|\bnot\b|\bneither\b|\bnor\b|\bfree from\b|\bwith no\b|\bwithout\b|\blacking\b"
    r"|\brather than\b",
    re.IGNORECASE,
)


class ClipRejected(ValueError):
    """A clip that cannot go into the dataset; ``reason`` is a short code, ``detail`` free text."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class AudioSource:
    """One audio file (or tar member) holding some channels of a recording."""

    path: str  # file path, or the archive path for a tar member
    member: str | None  # tar member name, None for a plain file
    channels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Clip:
    """A parsed cut: where its audio is and what it is labelled with. Times in seconds."""

    id: str
    start: float
    duration: float
    channels: tuple[int, ...]  # the cut's channel(s); several are averaged
    sources: tuple[AudioSource, ...]
    global_captions: tuple[str, ...]
    finegrained_captions: tuple[str, ...]
    speaker: str
    gender: str
    accent: str
    pitch: str
    speaking_rate: str
    intrinsic_tags: tuple[str, ...]
    situational_tags: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CaptionRules:
    """Caption filters; lengths in characters. Defaults are the authors' FCaps selection."""

    min_finegrained_chars: int = 128
    max_finegrained_chars: int = 768
    min_global_chars: int = 32


def iter_manifest(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | ClipRejected]]:
    """Yields ``(line_number, record)`` for each non-blank line; a bad line yields a ClipRejected.

    A file that stops being readable (e.g. a truncated gzip stream) yields one final rejection
    with reason ``manifest_unreadable`` instead of raising.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                yield line_no, _parse_line(raw)
    except (OSError, EOFError) as e:
        yield line_no + 1, ClipRejected("manifest_unreadable", f"{path}: {e}")


def _parse_line(raw: bytes) -> dict[str, Any] | ClipRejected:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return ClipRejected("not_utf8", str(e))
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return ClipRejected("not_json", str(e))
    if not isinstance(record, dict):
        return ClipRejected("not_a_json_object", type(record).__name__)
    if not isinstance(record.get("id"), str) or not record["id"]:
        return ClipRejected("missing_id", "the cut has no string 'id'")
    return record


def parse_cut(record: dict[str, Any]) -> Clip:
    """Parses one MonoCut record; raises ClipRejected naming what is missing or malformed."""
    if record.get("type", "MonoCut") != "MonoCut":
        raise ClipRejected("unsupported_cut_type", str(record.get("type")))
    try:
        start = float(record.get("start", 0.0))
        duration = float(record["duration"])
    except (KeyError, TypeError, ValueError) as e:
        raise ClipRejected("bad_timing", f"start/duration: {e!r}") from None
    if not (start >= 0.0 and duration > 0.0):
        raise ClipRejected("bad_timing", f"start={start} duration={duration}")

    recording = record.get("recording")
    if not isinstance(recording, dict) or not recording.get("sources"):
        raise ClipRejected("no_recording", "the cut has no recording sources")
    if any(t.get("name", t.get("type")) != "Resample" for t in recording.get("transforms") or []):
        # Resampling is what we do anyway; anything else (speed, volume, ...) we do not apply.
        raise ClipRejected("unsupported_transform", json.dumps(recording["transforms"]))
    sources = tuple(_parse_source(s) for s in recording["sources"])

    channel = record.get("channel", 0)
    channels = tuple(channel) if isinstance(channel, list) else (channel,)
    if not channels or not all(isinstance(c, int) for c in channels):
        raise ClipRejected("bad_channel", repr(channel))

    supervisions = record.get("supervisions") or []
    if not supervisions or not isinstance(supervisions[0], dict):
        raise ClipRejected("no_supervision", "the cut has no supervision")
    sup = supervisions[0]
    custom = sup.get("custom") or {}
    return Clip(
        id=record["id"],
        start=start,
        duration=duration,
        channels=channels,
        sources=sources,
        global_captions=_caption_list(custom, "global_captions", "short_captions"),
        finegrained_captions=_caption_list(custom, "finegrained_captions", "long_captions"),
        speaker=_text(sup.get("speaker")),
        gender=_text(sup.get("gender", custom.get("gender"))),
        accent=_text(custom.get("accent")),
        pitch=_text(custom.get("pitch")),
        speaking_rate=_text(custom.get("speaking_rate")),
        intrinsic_tags=_text_list(custom.get("intrinsic_tags")),
        situational_tags=_text_list(custom.get("situational_tags")),
    )


def _parse_source(source: Any) -> AudioSource:
    if not isinstance(source, dict) or source.get("type") != "file":
        kind = source.get("type") if isinstance(source, dict) else type(source).__name__
        raise ClipRejected("unsupported_source_type", f"{kind!r} (only 'file' is supported)")
    where = source.get("source")
    channels = source.get("channels", [0])
    if not isinstance(where, str) or not where:
        raise ClipRejected("bad_source", "source path missing")
    if not isinstance(channels, list) or not all(isinstance(c, int) for c in channels):
        raise ClipRejected("bad_source", f"channels {channels!r}")
    m = TAR_MEMBER_RE.match(where)
    if m:
        return AudioSource(m["archive"], m["member"], tuple(channels))
    return AudioSource(where, None, tuple(channels))


def _caption_list(custom: dict, name: str, alias: str) -> tuple[str, ...]:
    value = custom.get(name, custom.get(alias))
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ClipRejected("bad_captions", f"{name} must be a list of strings")
    return tuple(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _text_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def select_captions(clip: Clip, rules: CaptionRules) -> Clip:
    """Applies the caption rules; returns the clip with its kept captions or raises ClipRejected.

    Global captions shorter than ``min_global_chars`` reject the clip (as the authors do); a clip
    may have no global captions (FCaps-Emilia is fine-grained only). Fine-grained captions are
    filtered one by one; a clip that had fine-grained captions and keeps none is rejected, and so
    is a clip left with no caption at all.
    """
    if not clip.global_captions and not clip.finegrained_captions:
        raise ClipRejected("no_captions", "neither global nor fine-grained captions")
    for caption in clip.global_captions:
        if len(caption) < rules.min_global_chars:
            raise ClipRejected(
                "global_caption_too_short", f"{len(caption)} < {rules.min_global_chars} chars"
            )
    for caption in clip.finegrained_captions:
        if MULTI_SPEAKER_RE.search(caption):
            raise ClipRejected("multi_speaker_caption", caption[:80])
    kept = sorted(
        (
            c
            for c in clip.finegrained_captions
            if "\n" not in c
            and rules.min_finegrained_chars <= len(c) <= rules.max_finegrained_chars
            and not NEGATION_RE.search(c)
        ),
        key=len,
    )
    if clip.finegrained_captions and not kept:
        raise ClipRejected(
            "no_valid_finegrained_captions",
            f"all {len(clip.finegrained_captions)} failed the length/newline/negation rules",
        )
    return dataclasses.replace(clip, finegrained_captions=tuple(kept))


# ------------------------------------------------------------------------------------------ audio

TARGET_SAMPLE_RATE = 16000
# A segment may overrun its file by this much (rounding of start/duration in manifests) and is then
# shortened; more than this rejects the clip. Same order as Lhotse's default tolerance (25 ms).
OVERRUN_TOLERANCE_S = 0.025


def load_clip(clip: Clip, audio_root: str | Path, target_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Returns the clip's mono waveform, float32 [num_samples] at ``target_rate``, in [-1, 1] scale.

    Raises ClipRejected (missing_audio, decode_error, segment_exceeds_audio, channel_not_found,
    empty_audio, non_finite_samples).
    """
    columns = []
    rate = None
    for source in clip.sources:
        wanted = [source.channels.index(c) for c in clip.channels if c in source.channels]
        if not wanted:
            continue
        audio, source_rate = read_segment(source, audio_root, clip.start, clip.duration)
        if audio.shape[1] < max(wanted) + 1:
            raise ClipRejected(
                "channel_not_found",
                f"file has {audio.shape[1]} channels, manifest lists {list(source.channels)}",
            )
        if rate is not None and source_rate != rate:
            raise ClipRejected("mixed_sample_rates", f"{rate} vs {source_rate}")
        rate = source_rate
        columns.append(audio[:, wanted])
    if not columns:
        raise ClipRejected("channel_not_found", f"no source has channel(s) {list(clip.channels)}")
    length = min(c.shape[0] for c in columns)
    mono = np.concatenate([c[:length] for c in columns], axis=1).mean(axis=1)
    if mono.size == 0:
        raise ClipRejected("empty_audio", "the segment has no samples")
    if not np.isfinite(mono).all():
        raise ClipRejected("non_finite_samples", f"{int((~np.isfinite(mono)).sum())} NaN/inf samples")
    return resample(mono, rate, target_rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """float32 [n] at rate_in -> float32 [~n * rate_out / rate_in] at rate_out."""
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x.astype(np.float32, copy=False), rate_in, rate_out, quality="HQ")


def read_segment(
    source: AudioSource, audio_root: str | Path, start: float, duration: float
) -> tuple[np.ndarray, int]:
    """Decodes [start, start + duration) s of one source: (float32 [frames, channels], rate)."""
    path = Path(source.path)
    if not path.is_absolute():
        path = Path(audio_root) / path
    try:
        if source.member is None:
            if not path.is_file():
                raise ClipRejected("missing_audio", f"{path} does not exist")
            return _read_soundfile(path, start, duration)
        data = _tar_member_bytes(str(path), source.member)
        return _read_soundfile(io.BytesIO(data), start, duration, name=f"{path}//{source.member}")
    except ClipRejected:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        first_error = e
    # soundfile could not open it: try audioread (needs a real file).
    try:
        if source.member is None:
            return _read_audioread(path, start, duration)
        suffix = Path(source.member).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(_tar_member_bytes(str(path), source.member))
            tmp.flush()
            return _read_audioread(Path(tmp.name), start, duration)
    except ClipRejected:
        raise
    except Exception as e:  # audioread raises many unrelated types (NoBackendError, EOFError, ...)
        raise ClipRejected(
            "decode_error", f"soundfile: {first_error}; audioread: {type(e).__name__}: {e}"
        ) from None


def _segment_frames(start: float, duration: float, rate: int, total: int, name: str) -> tuple[int, int]:
    """First frame and frame count of the segment, checked against the file's ``total`` frames."""
    first = int(round(start * rate))
    count = int(round(duration * rate))
    overrun = first + count - total
    if overrun > OVERRUN_TOLERANCE_S * rate:
        raise ClipRejected(
            "segment_exceeds_audio",
            f"{name}: segment ends at {(first + count) / rate:.3f} s, audio has {total / rate:.3f} s",
        )
    return first, count - max(overrun, 0)


def _read_soundfile(file, start: float, duration: float, name: str | None = None):
    name = name or str(file)
    with sf.SoundFile(file) as f:
        rate = f.samplerate
        first, count = _segment_frames(start, duration, rate, f.frames, name)
        f.seek(first)
        audio = f.read(count, dtype="float32", always_2d=True)
    if audio.shape[0] < count - OVERRUN_TOLERANCE_S * rate:
        # The header promised more frames than the data holds: a truncated file.
        raise ClipRejected("truncated_audio", f"{name}: read {audio.shape[0]} of {count} frames")
    return audio, rate


def _read_audioread(path: Path, start: float, duration: float):
    import audioread  # optional fallback: imported only when soundfile failed

    with audioread.audio_open(os.fspath(path)) as f:
        rate, channels = f.samplerate, f.channels
        pcm = b"".join(f)
    audio = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels).astype(np.float32) / 32768.0
    first, count = _segment_frames(start, duration, rate, audio.shape[0], str(path))
    return audio[first : first + count], rate


@functools.lru_cache(maxsize=8)
def _open_tar(archive: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """Opens an archive once per process and indexes its members (tarfile's lookup is linear)."""
    if not os.path.isfile(archive):
        raise ClipRejected("missing_audio", f"{archive} does not exist")
    try:
        tar = tarfile.open(archive)
        index = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ClipRejected("bad_archive", f"{archive}: {e}") from None
    return tar, index


def _tar_member_bytes(archive: str, member: str) -> bytes:
    tar, index = _open_tar(archive)
    info = index.get(member.removeprefix("./"))
    if info is None:
        raise ClipRejected("missing_audio", f"{archive} has no member {member}")
    try:
        return tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ClipRejected("bad_archive", f"{archive}//{member}: {e}") from None
