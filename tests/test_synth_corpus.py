"""The synthetic FCaps corpus: layout, determinism, splits, and that the audio carries its labels."""

import gzip
import json
import random
import re
from collections import defaultdict
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile

from clsp_jax.data.manifests import MULTI_SPEAKER_RE, NEGATION_RE
from data_prep import captions as cap
from data_prep import synth_corpus as sc
from data_prep.espeak import Utterance, engine

GENDER_WORDS = {"male": {"man", "male", "he", "his"}, "female": {"woman", "female", "she", "her"}}
RATE_WORDS = {"slow speed": {"slow", "slowly", "unhurried", "slow-paced"},
              "measured speed": {"measured", "moderately", "evenly"},
              "fast speed": {"fast", "quickly", "rapidly", "quick", "rapid", "fast-paced"}}
NUM_CLIPS = 60


def read_split(out: Path, split: str) -> list[dict]:
    with gzip.open(out / f"synth_cuts_{split}.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = sc.build(out, NUM_CLIPS, seed=7, workers=2, log=lambda m: None)
    return out, stats, {s: read_split(out, s) for s in sc.SPLITS}


def segment_audio(out: Path, cut: dict) -> list[tuple[dict, np.ndarray]]:
    audio, rate = soundfile.read(out / cut["recording"]["sources"][0]["source"], dtype="float32")
    assert rate == 16000
    return [(seg, audio[round(seg["start"] * rate):round(seg["end"] * rate)])
            for seg in cut["supervisions"][0]["custom"]["style_segments"]]


def rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x ** 2)) + 1e-9))


def median_f0(x: np.ndarray) -> float:
    """Median YIN F0 (Hz) over frames louder than -20 dB relative to the loudest frame."""
    f0 = librosa.yin(x, fmin=50, fmax=500, sr=16000, frame_length=1024)
    energy = librosa.feature.rms(y=x, frame_length=1024, hop_length=256)[0][:len(f0)]
    voiced = energy > energy.max() * 0.1
    return float(np.median(f0[:len(energy)][voiced]))


def words_per_second(seg: dict) -> float:
    return len(seg["text"].split()) / (seg["end"] - seg["start"])


def test_split_sizes_and_counts(corpus):
    out, stats, cuts = corpus
    assert sc.split_sizes(2000) == {"train": 1800, "dev": 100, "test": 100}
    assert {s: len(c) for s, c in cuts.items()} == {"train": 54, "dev": 3, "test": 3}
    assert all(s["rejected"] == 0 for s in stats.values())
    total = sum(c["duration"] for split in cuts.values() for c in split) / 3600
    assert sum(s["hours"] for s in stats.values()) == pytest.approx(total)
    with pytest.raises(ValueError, match="num-clips"):
        sc.split_sizes(2)


def test_manifest_layout_matches_lhotse(corpus):
    out, _, cuts = corpus
    for split, records in cuts.items():
        for cut in records:
            assert list(cut) == ["id", "start", "duration", "channel", "supervisions", "recording", "type"]
            assert cut["type"] == "MonoCut" and cut["start"] == 0 and cut["channel"] == 0
            rec = cut["recording"]
            assert list(rec) == ["id", "sources", "sampling_rate", "num_samples", "duration", "channel_ids"]
            assert rec["sources"] == [{"type": "file", "channels": [0], "source": f"audio/{split}/{cut['id']}.flac"}]
            info = soundfile.info(out / rec["sources"][0]["source"])
            assert (info.samplerate, info.channels, info.frames) == (16000, 1, rec["num_samples"])
            assert rec["duration"] == cut["duration"] == rec["num_samples"] / 16000
            assert 2.0 <= cut["duration"] <= 12.0
            (sup,) = cut["supervisions"]
            assert list(sup) == ["id", "recording_id", "start", "duration", "channel", "text", "speaker", "gender",
                                 "custom"]
            assert (sup["id"], sup["recording_id"], sup["start"], sup["duration"]) == (cut["id"], cut["id"], 0,
                                                                                       cut["duration"])
            custom = sup["custom"]
            assert list(custom)[:9] == ["global_captions", "finegrained_captions", "short_captions", "long_captions",
                                        "accent", "pitch", "speaking_rate", "intrinsic_tags", "situational_tags"]
            assert custom["short_captions"] == custom["global_captions"]
            assert custom["long_captions"] == custom["finegrained_captions"]
            segs = custom["style_segments"]
            assert " ".join(s["text"] for s in segs) == sup["text"]
            assert segs[0]["start"] < 0.01 and abs(segs[-1]["end"] - cut["duration"]) < 0.01


def test_captions_describe_the_labels(corpus):
    _, _, cuts = corpus
    for cut in (c for split in cuts.values() for c in split):
        sup = cut["supervisions"][0]
        custom = sup["custom"]
        globals_, fines = custom["global_captions"], custom["finegrained_captions"]
        assert len(globals_) == 2 and len(fines) == 3 and len(set(fines)) == 3
        accent = custom["accent"].title()
        for text in globals_ + fines:
            words = set(re.findall(r"[a-z\-]+", text.lower()))
            assert not NEGATION_RE.search(text) and not MULTI_SPEAKER_RE.search(text) and "\n" not in text
            assert accent in text
            assert words & GENDER_WORDS[sup["gender"]]
            assert not words & GENDER_WORDS["female" if sup["gender"] == "male" else "male"]
        for text in fines:
            assert 128 <= len(text) <= 768
        for text in globals_:
            assert len(text) >= 32
            if custom["speaking_rate"]:
                assert set(re.findall(r"[a-z\-]+", text.lower())) & RATE_WORDS[custom["speaking_rate"]]
            if custom["pitch"]:
                assert custom["pitch"].split("-")[0] in text or (custom["pitch"] == "medium-pitched"
                                                                  and ("mid-range" in text or "moderately" in text))
        if len(custom["style_segments"]) == 2:
            assert all(re.search(r"Midway|halfway|After a brief pause", t) for t in fines)
            assert all("varying" in t or "shifting" in t or "changing" in t for t in globals_)


def test_audio_carries_loudness_rate_and_pitch(corpus):
    out, _, cuts = corpus
    loud, rate, f0 = defaultdict(list), defaultdict(list), defaultdict(list)
    changes = {"loudness": 0, "speaking_rate": 0, "pitch": 0}
    for cut in cuts["train"]:
        gender = cut["supervisions"][0]["gender"]
        parts = [(seg, x) for seg, x in segment_audio(out, cut) if not seg["whisper"]]
        for seg, x in parts:
            loud[seg["loudness"]].append(rms_db(x))
            rate[seg["speaking_rate"]].append(words_per_second(seg))
            f0[(gender, seg["pitch"])].append(median_f0(x))
        if len(parts) == 2:  # within a clip the voice is fixed, so every change must show
            (a, xa), (b, xb) = parts
            order = {f: getattr(cap, n) for f, n in (("loudness", "LOUDNESS"), ("speaking_rate", "RATES"),
                                                     ("pitch", "PITCHES"))}
            measure = {"loudness": lambda s, x: rms_db(x), "speaking_rate": lambda s, x: words_per_second(s),
                       "pitch": lambda s, x: median_f0(x)}
            for field in changes:
                if a[field] != b[field]:
                    went_up = order[field].index(b[field]) > order[field].index(a[field])
                    assert (measure[field](b, xb) > measure[field](a, xa)) == went_up, (cut["id"], field)
                    changes[field] += 1
    assert min(changes.values()) >= 2, changes
    med = {k: float(np.median(v)) for k, v in loud.items()}
    assert med["normal"] - med["quiet"] > 6 and med["loud"] - med["normal"] > 5, med
    med = {k: float(np.median(v)) for k, v in rate.items()}
    assert med["measured speed"] / med["slow speed"] > 1.2 and med["fast speed"] / med["measured speed"] > 1.3, med
    for gender in ("male", "female"):
        low, mid, high = (np.median(f0[(gender, p)]) for p in cap.PITCHES)
        assert mid / low > 1.15 and high / mid > 1.15, (gender, low, mid, high)
    assert np.median(f0[("female", "medium-pitched")]) / np.median(f0[("male", "medium-pitched")]) > 1.6


def test_same_seed_gives_identical_bytes_whatever_the_workers(corpus, tmp_path):
    out, _, _ = corpus
    again = tmp_path / "again"
    sc.build(again, NUM_CLIPS, seed=7, workers=1, log=lambda m: None)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == NUM_CLIPS + 3
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    sc.build(other, 3, seed=8, workers=1, log=lambda m: None)
    assert read_split(other, "test")[0] != read_split(out, "test")[0]


def test_heldout_splits_have_their_own_sentences_and_voices():
    plans = sc.plan_corpus(2000, seed=0)
    by_split = defaultdict(list)
    for p in plans:
        by_split[p.split].append(p)
    assert {s: len(v) for s, v in by_split.items()} == {"train": 1800, "dev": 100, "test": 100}
    texts = {s: {u.text for p in v for u in p.utterances} for s, v in by_split.items()}
    sentences = {s: {t for text in v for t in re.split(r"(?<=[.?!]) ", text)} for s, v in texts.items()}
    assert not sentences["test"] & sentences["train"] and not sentences["dev"] & sentences["train"]
    assert not sentences["test"] & sentences["dev"]
    voices = {s: {p.speaker for p in v if "whisper" not in p.speaker} for s, v in by_split.items()}
    assert not voices["test"] & voices["train"] and not voices["dev"] & voices["train"]
    assert len(voices["test"]) >= 12
    kinds = [len(p.utterances) for p in plans]
    assert 0.25 < kinds.count(2) / len(kinds) < 0.45
    assert {p.profile.accent for p in plans} == set(sc.ACCENTS.values())
    assert 0.4 < sum(p.profile.gender == "male" for p in plans) / len(plans) < 0.6


def test_espeak_voices_and_repeatability():
    shipped = sc.check_voices()
    assert set(sc.ACCENTS) <= set(shipped)
    espeak = engine()
    utts = [Utterance("The old clock was fixed this morning.", "en-gb-scotland+m3", rate=150),
            Utterance("Could you open the window?", "en-gb-scotland+m3", rate=260, volume=60)]
    first = espeak.synthesize(utts, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, espeak.synthesize(utts, seed=3)))
    assert len(first[0]) / espeak.sample_rate > len(first[1]) / espeak.sample_rate
    whisper = [Utterance("Could you open the window?", "en+whisper")]
    assert not np.array_equal(espeak.synthesize(whisper, seed=1)[0], espeak.synthesize(whisper, seed=2)[0])
    with pytest.raises(ValueError, match="no voice"):
        espeak.synthesize([Utterance("Hello.", "en-zz+q")])
    with pytest.raises(ValueError, match="rate=20"):
        espeak.synthesize([Utterance("Hello.", "en-us", rate=20)])


def test_caption_profiles_and_tags():
    slow_quiet = cap.Style("slow speed", "low-pitched", "quiet", "monotone")
    fast_loud = cap.Style("fast speed", "low-pitched", "loud", "monotone")
    profile = cap.Profile("male", "scottish", (slow_quiet, fast_loud))
    assert cap.tags(profile) == (["monotone", "deep"], ["loud"])
    assert profile.constant("pitch") == "low-pitched" and profile.constant("loudness") is None
    globals_, fines = cap.captions(profile, random.Random(0))
    assert all("Scottish" in t for t in globals_ + fines)
    assert all(re.search(r"speeds up|picks up the pace|talking faster", t) for t in fines)
    assert all(re.search(r"louder|turns up the volume", t) for t in fines)
    with pytest.raises(ValueError, match="pitch"):
        cap.Style("slow speed", "", "quiet", "monotone")
    with pytest.raises(ValueError, match="gender"):
        cap.Profile("other", "scottish", (slow_quiet,))
