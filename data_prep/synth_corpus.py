"""A synthetic FCaps-style corpus: espeak-ng speech whose captions describe settings the audio really has.

    python -m data_prep.synth_corpus --out DIR [--num-clips 2000] [--seed 0] [--workers 4]

Writes ``DIR/audio/<split>/<cut id>.flac`` (16 kHz mono, 16-bit) and ``DIR/synth_cuts_<split>.jsonl.gz``
for train/dev/test (90/5/5): Lhotse MonoCut records (see data_prep.manifest_writer) whose
``supervisions[0].custom`` holds FCaps fields: ``global_captions`` (= ``short_captions``),
``finegrained_captions`` (= ``long_captions``), ``accent``, ``pitch``, ``speaking_rate``, ``intrinsic_tags``,
``situational_tags``, plus ``loudness`` and ``style_segments`` (start/end seconds, text, labels and espeak
settings of each part). Labels of an attribute that changes within a clip are "" (as ParaSpeechCaps leaves unknown
ones); the per-part values are in ``style_segments``. Audio paths are relative to DIR.

What varies, and how the audio carries it: gender (espeak male/female voice variants), accent (the 8
English espeak languages), pitch (espeak base pitch, relative to the voice), speaking rate (words per
minute), loudness (espeak volume), intonation (espeak pitch range), whisper (espeak whisper variants), and
for about a third of the clips a change of pace, loudness or pitch half way through. Dev and test use
their own sentences and their own (non-whisper) voices. The same seed gives byte-identical manifests and
audio, whatever the number of workers.
"""

import argparse
import dataclasses
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr

from data_prep import captions as cap
from data_prep import manifest_writer
from data_prep.espeak import Utterance, engine
from data_prep.sentences import make_sentences

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
MIN_DURATION, MAX_DURATION = 2.0, 12.0

# espeak-ng language -> accent label. espeak calls "en" English (Great Britain), "en-gb-x-gbclan" English
# (Lancaster); the labels follow ParaSpeechCaps' accent names where one fits.
ACCENTS = {
    "en-us": "american",
    "en-us-nyc": "brooklyn/new york",
    "en": "british",
    "en-gb-x-rp": "english",  # Received Pronunciation
    "en-gb-scotland": "scottish",
    "en-029": "caribbean",
    "en-gb-x-gbclan": "lancashire",
    "en-gb-x-gbcwmd": "west midlands",
}
VARIANTS = {
    "male": ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"),
    "female": ("f1", "f2", "f3", "f4", "f5", "belinda", "linda", "steph"),
}
WHISPER_VARIANTS = {"male": "whisper", "female": "whisperf"}

# Label -> range of the espeak setting it is drawn from.
RATE_WPM = {"slow speed": (115, 135), "measured speed": (160, 190), "fast speed": (245, 285)}
PITCH = {"low-pitched": (15, 28), "medium-pitched": (42, 58), "high-pitched": (75, 90), "": (45, 55)}
VOLUME = {"quiet": (10, 13), "normal": (28, 34), "loud": (72, 80)}  # low enough that loud never clips
PITCH_RANGE = {"monotone": (0, 8), "natural": (40, 60), "animated": (85, 100)}

# Clip kinds and their shares.
KINDS = (("single", 0.55), ("change", 0.35), ("whisper", 0.10))
NUM_SENTENCES = 600
# espeak speaks about 0.7-1.0 x words * 60 / wpm seconds, plus ~0.3 s of pauses per utterance.
_SECONDS_PER_WORD_LOW, _SECONDS_PER_WORD_HIGH, _PAUSE = 0.7, 1.0, 0.3


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """Everything about one clip that is fixed before synthesis."""

    cut_id: str
    split: str
    speaker: str  # espeak voice, "<language>+<variant>"
    profile: cap.Profile
    utterances: tuple[Utterance, ...]  # one per style part
    gap_s: float  # silence between parts
    espeak_seed: int
    global_captions: list[str]
    finegrained_captions: list[str]

    @property
    def audio_path(self) -> str:
        return f"audio/{self.split}/{self.cut_id}.flac"


def split_sizes(num_clips: int) -> dict[str, int]:
    """90/5/5 train/dev/test, dev and test rounded, at least one each when num_clips >= 3."""
    if num_clips < 3:
        raise ValueError(f"--num-clips must be >= 3 (one per split), got {num_clips}")
    held = max(1, round(num_clips * 0.05))
    return {"train": num_clips - 2 * held, "dev": held, "test": held}


def split_voices(rng: random.Random) -> dict[str, list[str]]:
    """Voices per split: dev and test each get one male and one female variant of every accent, unused
    elsewhere; train gets the rest. Whisper voices are shared by all splits."""
    pools = {s: [] for s in SPLITS}
    for language in ACCENTS:
        for gender in VARIANTS:
            variants = list(VARIANTS[gender])
            rng.shuffle(variants)
            pools["test"].append(f"{language}+{variants[0]}")
            pools["dev"].append(f"{language}+{variants[1]}")
            pools["train"] += [f"{language}+{v}" for v in variants[2:]]
    return pools


def split_sentences(rng: random.Random) -> dict[str, list[str]]:
    """Disjoint sentence pools, 90/5/5 of NUM_SENTENCES."""
    sentences = make_sentences(NUM_SENTENCES, rng)
    held = NUM_SENTENCES // 20
    return {"test": sentences[:held], "dev": sentences[held:2 * held], "train": sentences[2 * held:]}


def _voice_gender(voice: str) -> str:
    variant = voice.split("+")[1]
    return next(g for g in VARIANTS if variant in VARIANTS[g] or variant == WHISPER_VARIANTS[g])


def _draw_style(rng: random.Random) -> cap.Style:
    return cap.Style(rng.choice(cap.RATES), rng.choice(cap.PITCHES), rng.choice(cap.LOUDNESS),
                     rng.choice(cap.INTONATIONS))


def _draw_change(first: cap.Style, rng: random.Random) -> cap.Style:
    """The second part: one or two of pace, loudness and pitch move to another value."""
    fields = rng.sample(["speaking_rate", "loudness", "pitch"], rng.choice([1, 2]))
    options = {"speaking_rate": cap.RATES, "loudness": cap.LOUDNESS, "pitch": cap.PITCHES}
    return dataclasses.replace(first, **{
        f: rng.choice([v for v in options[f] if v != getattr(first, f)]) for f in fields})


def _seconds(words: int, wpm: int, per_word: float) -> float:
    return words * 60 / wpm * per_word + _PAUSE


def _utterance(text: str, voice: str, style: cap.Style, rate: int, rng: random.Random) -> Utterance:
    return Utterance(text=text, voice=voice, rate=rate,
                     pitch=rng.randint(*PITCH[style.pitch]), pitch_range=rng.randint(*PITCH_RANGE[style.intonation]),
                     volume=rng.randint(*VOLUME[style.loudness]))


def _texts(styles: list[cap.Style], rates: list[int], pool: list[str], rng: random.Random) -> list[str]:
    """One text per part, drawn from ``pool`` so that the estimated clip length lies within
    [MIN_DURATION, MAX_DURATION] with a margin; a short single part gets a second sentence."""
    for _ in range(100):
        texts = [rng.choice(pool) for _ in styles]
        if len(styles) == 1 and _seconds(len(texts[0].split()), rates[0], _SECONDS_PER_WORD_LOW) < 2.6:
            texts = [texts[0] + " " + rng.choice(pool)]
        words = [len(t.split()) for t in texts]
        low = sum(_seconds(w, r, _SECONDS_PER_WORD_LOW) for w, r in zip(words, rates))
        high = sum(_seconds(w, r, _SECONDS_PER_WORD_HIGH) for w, r in zip(words, rates))
        if low >= MIN_DURATION + 0.3 and high <= MAX_DURATION - 0.8:
            return texts
    raise ValueError(f"no sentences of a fitting length for rates {rates}")


def plan_clip(cut_id: str, split: str, voices: list[str], sentences: list[str], rng: random.Random) -> ClipPlan:
    """Draw one clip's speaker, delivery, text and captions."""
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    if kind == "whisper":
        gender = rng.choice(list(VARIANTS))
        voice = f"{rng.choice(list(ACCENTS))}+{WHISPER_VARIANTS[gender]}"
        styles = [cap.Style(rng.choice(cap.RATES), "", "normal", "natural", whisper=True)]
    else:
        voice = rng.choice(voices)
        styles = [_draw_style(rng)]
        if kind == "change":
            styles.append(_draw_change(styles[0], rng))
    language = voice.split("+")[0]
    profile = cap.Profile(_voice_gender(voice), ACCENTS[language], tuple(styles))
    rates = [rng.randint(*RATE_WPM[s.speaking_rate]) for s in styles]
    texts = _texts(styles, rates, sentences, rng)
    utterances = tuple(_utterance(t, voice, s, r, rng) for t, s, r in zip(texts, styles, rates))
    global_caps, fine_caps = cap.captions(profile, rng)
    return ClipPlan(cut_id=cut_id, split=split, speaker=voice, profile=profile, utterances=utterances,
                    gap_s=round(rng.uniform(0.15, 0.35), 3), espeak_seed=rng.randrange(2**31),
                    global_captions=global_caps, finegrained_captions=fine_caps)


def plan_corpus(num_clips: int, seed: int) -> list[ClipPlan]:
    """All clips, train first; each clip drawn from its own seeded generator."""
    voices = split_voices(random.Random(f"{seed}:voices"))
    sentences = split_sentences(random.Random(f"{seed}:sentences"))
    plans = []
    for split, size in split_sizes(num_clips).items():
        for i in range(size):
            cut_id = f"synth-{split}-{i:06d}"
            plans.append(plan_clip(cut_id, split, voices[split], sentences[split], random.Random(f"{seed}:{cut_id}")))
    return plans


def render_clip(plan: ClipPlan, out_dir: str) -> tuple[int, list[tuple[int, int]]]:
    """Synthesise, resample to 16 kHz, join the parts with ``gap_s`` of silence and write the FLAC file.

    Returns (num_samples, [(start, end) sample span of each part])."""
    espeak = engine()
    parts = espeak.synthesize(plan.utterances, seed=plan.espeak_seed)
    gap = np.zeros(round(plan.gap_s * SAMPLE_RATE), dtype=np.float32)
    pieces, spans, position = [], [], 0
    for i, wave in enumerate(parts):
        wave = soxr.resample(wave, espeak.sample_rate, SAMPLE_RATE, quality="HQ")
        if i:
            pieces.append(gap)
            position += len(gap)
        pieces.append(wave)
        spans.append((position, position + len(wave)))
        position += len(wave)
    audio = np.concatenate(pieces)
    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
    path = Path(out_dir) / plan.audio_path
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(pcm), spans


def _render_job(job: tuple[ClipPlan, str]) -> tuple[int, list[tuple[int, int]]]:
    return render_clip(*job)


def cut_record(plan: ClipPlan, num_samples: int, spans: list[tuple[int, int]]) -> dict:
    """The manifest record of a rendered clip."""
    profile = plan.profile
    intrinsic, situational = cap.tags(profile)
    segments = [{
        "start": round(a / SAMPLE_RATE, 3), "end": round(b / SAMPLE_RATE, 3), "text": u.text,
        "speaking_rate": s.speaking_rate, "pitch": s.pitch, "loudness": s.loudness,
        "intonation": s.intonation, "whisper": s.whisper,
        "espeak": {"voice": u.voice, "rate": u.rate, "pitch": u.pitch, "pitch_range": u.pitch_range,
                   "volume": u.volume},
    } for (a, b), s, u in zip(spans, profile.styles, plan.utterances)]
    custom = {
        "global_captions": plan.global_captions,
        "finegrained_captions": plan.finegrained_captions,
        "short_captions": plan.global_captions,
        "long_captions": plan.finegrained_captions,
        "accent": profile.accent,
        "pitch": profile.constant("pitch") or "",
        "speaking_rate": profile.constant("speaking_rate") or "",
        "intrinsic_tags": intrinsic,
        "situational_tags": situational,
        "loudness": profile.constant("loudness") or "",
        "style_segments": segments,
    }
    rec = manifest_writer.recording(plan.cut_id, plan.audio_path, num_samples, SAMPLE_RATE)
    text = " ".join(u.text for u in plan.utterances)
    return manifest_writer.mono_cut(plan.cut_id, rec, text=text, speaker=plan.speaker, gender=profile.gender,
                              custom=custom)


def check_voices() -> list[str]:
    """The English espeak languages shipped with the package; raises ValueError if one we use is missing."""
    shipped = sorted({lang for v in engine().list_voices() for lang in v["languages"] if lang.startswith("en")})
    missing = [lang for lang in ACCENTS if lang not in shipped]
    if missing:
        raise ValueError(f"espeak-ng data lacks English voices {missing}; it has {shipped}")
    return shipped


def build(out_dir: str | Path, num_clips: int, seed: int, workers: int = 1, log=print) -> dict[str, dict]:
    """Plan, synthesise and write the corpus. Returns per-split stats {"clips", "hours", "rejected"}."""
    out_dir = Path(out_dir)
    log(f"espeak-ng English languages: {', '.join(check_voices())}")
    plans = plan_corpus(num_clips, seed)
    jobs = [(p, str(out_dir)) for p in plans]
    started = time.monotonic()
    records = {s: [] for s in SPLITS}
    stats = {s: {"clips": 0, "hours": 0.0, "rejected": 0} for s in SPLITS}
    every = max(1, len(plans) // 20)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render_job, jobs, chunksize=4) if pool else map(_render_job, jobs)
        for done, (plan, (num_samples, spans)) in enumerate(zip(plans, results), 1):
            duration = num_samples / SAMPLE_RATE
            if MIN_DURATION <= duration <= MAX_DURATION:
                records[plan.split].append(cut_record(plan, num_samples, spans))
                stats[plan.split]["clips"] += 1
                stats[plan.split]["hours"] += duration / 3600
            else:
                (out_dir / plan.audio_path).unlink()
                stats[plan.split]["rejected"] += 1
                log(f"rejected {plan.cut_id}: {duration:.2f} s outside [{MIN_DURATION}, {MAX_DURATION}]")
            if done % every == 0 or done == len(plans):
                elapsed = time.monotonic() - started
                log(f"synthesised {done}/{len(plans)} clips in {elapsed:.1f} s ({done / elapsed:.1f} clips/s)")
    finally:
        if pool:
            pool.close()
            pool.join()
    for split in SPLITS:
        manifest_writer.write_jsonl_gz(out_dir / f"synth_cuts_{split}.jsonl.gz", records[split])
    elapsed = time.monotonic() - started
    total_hours = sum(s["hours"] for s in stats.values())
    for split, s in stats.items():
        log(f"{split}: {s['clips']} clips, {s['hours']:.3f} h, {s['rejected']} rejected")
    log(f"total {total_hours:.3f} h of audio in {elapsed:.1f} s "
        f"({total_hours * 3600 / max(elapsed, 1e-9):.0f}x real time, {workers} workers)")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (audio/ and manifests)")
    parser.add_argument("--num-clips", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        build(args.out, args.num_clips, args.seed, args.workers, log=lambda m: print(m, flush=True))
    except ValueError as e:
        sys.exit(f"synth_corpus: {e}")


if __name__ == "__main__":
    main()
