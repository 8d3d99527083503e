"""Reading a clip's audio: decode (wav/flac/mp3/...), cut [start, start+duration), pick channels,
resample to 16 kHz.

Decoding uses soundfile (libsndfile, which reads mp3 from version 1.1); when soundfile cannot open a
file, audioread is tried (it can use ffmpeg/gstreamer backends where the system has them).
Resampling uses soxr (HQ), which is deterministic, so re-running a build gives identical bytes.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from data_prep.manifest import AudioSource, Clip, ClipRejected

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


def to_int16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 PCM (rounded, saturating: resampling can overshoot full scale)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


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
