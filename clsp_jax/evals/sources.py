"""Eval inputs read straight from files: Lhotse manifests, audio files and ratings CSVs -> eval batches.

`WaveformBatches` yields the batch layout of `clsp_jax.data.pipeline.EvalBatches` (so every evaluator takes
either), decoding audio with clsp_jax.data.manifests (any soundfile/audioread format, resampled to 16 kHz) as it
goes. A clip whose audio is missing or cannot be decoded becomes an invalid row and is recorded in
`failures`; it is never silently dropped.

Ratings CSV (style similarity; one human score per pair, header row required), either

    audio,caption,score[,subset]      a clip and a caption (the model scores cos(speech, text))
    audio_a,audio_b,score[,subset]    two clips (the model scores cos(speech_a, speech_b))

Audio paths are relative to the audio root (default: the CSV's folder) unless absolute. `subset` (e.g.
"intrinsic" / "situational", the paper's two rating sets) groups the correlations; it may be empty.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import soundfile

from clsp_jax.data import manifests
from clsp_jax.data.captions import ClipText, eval_caption
from clsp_jax.inference import MIN_SAMPLES, audio_bucket
from clsp_jax.tokenizer import CaptionTokenizer

SAMPLE_RATE = manifests.TARGET_SAMPLE_RATE
# Decoded audio may run this many samples past the manifest's duration (rounding, resampling) and still
# fit the padded length (the manifest reader's overrun tolerance).
LENGTH_SLACK = int(manifests.OVERRUN_TOLERANCE_S * SAMPLE_RATE)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalClip:
    """One clip to embed.

    Attributes:
      id: for reports.
      num_samples: expected length at 16 kHz (orders the clips and sizes each batch's padding).
      load: () -> float32 [n] waveform at 16 kHz in [-1, 1]; raises clsp_jax.data.manifests.ClipRejected.
      captions: one per caption kind of the batches (None where the clip has none).
    """

    id: str
    num_samples: int
    load: Callable[[], np.ndarray]
    captions: tuple[str | None, ...] = ()


class WaveformBatches:
    """Re-iterable host-local eval batches of `clips`, padded so every host does equal work.

    Batch: audio float32 [b, N], audio_lens int32 [b], index int32 [b] (position in `clips`, -1 for
    padding), valid bool [b]; with caption kinds also input_ids / attention_mask int32 [K*b, L] (kind k
    of clip i at row k*b + i) and caption_valid bool [K*b]. b = batch_size / process_count. Clips are
    ordered by length; N is the `clsp_jax.inference.audio_bucket` of the global batch's longest expected
    clip, so all hosts pad alike. Invalid rows hold zeros with length MIN_SAMPLES (embeddable, dropped).

    Attributes:
      failures: clip id -> "reason: detail" for clips this host could not load (invalid rows).
      truncated: ids of clips that decoded longer than their batch's padded length (cut to it).
    """

    def __init__(self, clips: Sequence[EvalClip], batch_size: int, *, tokenizer: CaptionTokenizer | None = None,
                 kinds: Sequence[str] = (), process_index: int = 0, process_count: int = 1):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of process_count {process_count}")
        if kinds and tokenizer is None:
            raise ValueError("caption kinds need a tokenizer")
        bad = [c.id for c in clips if len(c.captions) != len(kinds)]
        if bad:
            raise ValueError(f"clips {bad[:5]} do not have one caption entry per kind {tuple(kinds)}")
        self.clips, self.kinds, self.tokenizer = list(clips), tuple(kinds), tokenizer
        self.batch_size, self.per_host = batch_size, batch_size // process_count
        order = np.argsort([c.num_samples for c in self.clips], kind="stable")
        padded = np.full(-(-len(order) // batch_size) * batch_size, -1, np.int64)
        padded[: len(order)] = order
        self._plan = padded.reshape(-1, batch_size)[:, process_index * self.per_host:(process_index + 1) * self.per_host]
        self._lengths = [audio_bucket(max(self.clips[i].num_samples for i in g if i >= 0) + LENGTH_SLACK)
                         for g in padded.reshape(-1, batch_size)]
        self.failures: dict[str, str] = {}
        self.truncated: set[str] = set()

    def __len__(self) -> int:
        return len(self._plan)

    def _load(self, clip: EvalClip) -> np.ndarray | None:
        try:
            wave = np.asarray(clip.load(), np.float32).reshape(-1)
            if wave.size < MIN_SAMPLES:
                raise manifests.ClipRejected("too_short", f"{wave.size} samples < {MIN_SAMPLES} (80 ms)")
            return wave
        except manifests.ClipRejected as e:
            if clip.id not in self.failures:
                log.warning("skipping clip %s: %s", clip.id, e)
            self.failures[clip.id] = str(e)
            return None

    def _batch(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        b = len(rows)
        batch = {"audio": np.zeros((b, length), np.float32), "audio_lens": np.full(b, MIN_SAMPLES, np.int32),
                 "index": rows.astype(np.int32), "valid": np.zeros(b, bool)}
        for r, i in enumerate(rows):
            wave = None if i < 0 else self._load(self.clips[i])
            if wave is None:
                continue
            if wave.size > length:
                self.truncated.add(self.clips[i].id)
                log.warning("clip %s decodes to %d samples, more than its padded length %d: truncated",
                            self.clips[i].id, wave.size, length)
                wave = wave[:length]
            batch["audio"][r, : wave.size] = wave
            batch["audio_lens"][r] = wave.size
            batch["valid"][r] = True
        if self.kinds:
            texts, caption_valid = [], []
            for k in range(len(self.kinds)):
                for r, i in enumerate(rows):
                    text = self.clips[i].captions[k] if i >= 0 else None
                    texts.append(text or "")
                    caption_valid.append(bool(batch["valid"][r]) and text is not None)
            batch.update(self.tokenizer(texts))
            batch["caption_valid"] = np.asarray(caption_valid, bool)
        return batch

    def __iter__(self):
        for rows, length in zip(self._plan, self._lengths):
            yield self._batch(rows, length)


def _expected_samples(clip: manifests.Clip) -> int:
    return math.ceil(clip.duration * SAMPLE_RATE)


@dataclasses.dataclass
class ManifestClips:
    """The usable cuts of a manifest: `clips[i]` was read from `records[i]`; `skipped` counts rejected lines."""

    clips: list[EvalClip]
    records: list[dict]
    skipped: collections.Counter


def read_manifest(path: str | Path, audio_root: str | Path, kinds: Sequence[str] = (),
                  rules: manifests.CaptionRules | None = None) -> ManifestClips:
    """Cuts of a Lhotse MonoCut manifest (.jsonl / .jsonl.gz) as EvalClips.

    With caption `kinds` ("global": first global caption, "finegrained": last fine-grained caption, after
    the authors' caption selection `rules`, as the TFDS builder applies it), each clip carries one caption
    per kind; clips the selection rejects are skipped and counted by reason.
    """
    rules = rules or manifests.CaptionRules()
    result = ManifestClips([], [], collections.Counter())
    for line_no, record in manifests.iter_manifest(path):
        try:
            if isinstance(record, manifests.ClipRejected):
                raise record
            clip = manifests.parse_cut(record)
            captions = ()
            if kinds:
                clip = manifests.select_captions(clip, rules)
                text = ClipText(clip.global_captions, clip.finegrained_captions)
                captions = tuple(eval_caption(text, kind) for kind in kinds)
        except manifests.ClipRejected as e:
            if not result.skipped[e.reason]:
                log.warning("skipping %s line %d (%s); further ones are only counted", path, line_no, e)
            result.skipped[e.reason] += 1
            continue
        result.clips.append(EvalClip(clip.id, _expected_samples(clip),
                                     functools.partial(manifests.load_clip, clip, audio_root), captions))
        result.records.append(record)
    return result


def cut_label(record: dict, key: str) -> str | None:
    """A label of a manifest cut: ``supervisions[0].custom[key]``, else ``supervisions[0][key]`` (None if absent)."""
    sup = record["supervisions"][0]
    value = (sup.get("custom") or {}).get(key, sup.get(key))
    return None if value is None else str(value)


def load_audio_file(path: str | Path) -> np.ndarray:
    """A whole audio file, channels averaged, at 16 kHz: float32 [n]; raises ClipRejected."""
    path = Path(path)
    if not path.is_file():
        raise manifests.ClipRejected("missing_audio", f"{path} does not exist")
    try:
        info = soundfile.info(path)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise manifests.ClipRejected("decode_error", f"{path}: {e}") from None
    source = manifests.AudioSource(str(path), None, tuple(range(info.channels)))
    wave, rate = manifests.read_segment(source, ".", 0.0, info.frames / info.samplerate)
    return manifests.resample(wave.mean(axis=1), rate, SAMPLE_RATE)


def audio_file_clip(path: str | Path) -> EvalClip:
    """An EvalClip of a whole file (length from its header; an unreadable file fails when loaded)."""
    try:
        info = soundfile.info(path)
        expected = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
    except (RuntimeError, soundfile.LibsndfileError):
        expected = MIN_SAMPLES
    return EvalClip(str(path), expected, functools.partial(load_audio_file, path))


@dataclasses.dataclass(frozen=True)
class RatedPair:
    """A human-rated pair: clip `audio` with either clip `other_audio` or `caption` (indices into the clips)."""

    audio: int
    score: float
    other_audio: int | None = None
    caption: str | None = None
    subset: str = ""

    def __post_init__(self):
        if (self.other_audio is None) == (self.caption is None):
            raise ValueError("a rated pair needs exactly one of other_audio and caption")


def read_ratings(path: str | Path, audio_root: str | Path | None = None) -> tuple[list[EvalClip], list[RatedPair]]:
    """A ratings CSV (see module doc) -> (clips, one per distinct audio file; pairs)."""
    path = Path(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if {"audio", "caption", "score"} <= columns:
            second = "caption"
        elif {"audio_a", "audio_b", "score"} <= columns:
            second = "audio_b"
        else:
            raise ValueError(f"{path}: columns must be audio,caption,score[,subset] or "
                             f"audio_a,audio_b,score[,subset]; found {sorted(columns)}")
        first = "audio" if second == "caption" else "audio_a"
        clips, index = [], {}

        def clip_index(name: str) -> int:
            p = Path(name) if Path(name).is_absolute() else root / name
            if p not in index:
                index[p] = len(clips)
                clips.append(audio_file_clip(p))
            return index[p]

        pairs = []
        for line_no, row in enumerate(reader, start=2):
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line_no}: score {row['score']!r} is not a number") from None
            if not math.isfinite(score) or not row[first] or not row[second]:
                raise ValueError(f"{path}:{line_no}: needs {first}, {second} and a finite score")
            other = {"caption": row[second]} if second == "caption" else {"other_audio": clip_index(row[second])}
            pairs.append(RatedPair(clip_index(row[first]), score, subset=(row.get("subset") or "").strip(), **other))
    if not pairs:
        raise ValueError(f"{path} has no rated pairs")
    return clips, pairs
