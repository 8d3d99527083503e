"""data_prep.prepare: FCaps manifests + audio -> TFDS ArrayRecord; bad input; resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

import fcaps_fixtures as ff
from clsp_jax.data import fcaps_format, manifests
from clsp_jax.data.manifests import AudioSource, ClipRejected
from data_prep.prepare import KILL_AFTER_CLIPS_ENV, BuildSettings, prepare

REPO = Path(__file__).resolve().parents[1]


def read_split(data_dir: Path, split: str) -> dict[str, dict]:
    source = fcaps_format.open_split(data_dir, split)
    return {ex["id"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def read_rejects(data_dir: Path, split: str) -> dict[str, str]:
    path = fcaps_format.reports_dir(fcaps_format.builder_dir(data_dir), split) / "rejects.jsonl"
    return {r["id"]: r["reason"] for r in map(json.loads, path.read_text().splitlines())}


def test_clean_build_round_trips_audio_captions_and_tags(tmp_path):
    manifest, audio_root, records = ff.make_corpus(tmp_path / "src", 5)
    settings = BuildSettings(str(audio_root))
    summary = prepare([manifest], split="train", data_dir=tmp_path / "tfds", settings=settings, clips_per_shard=2)
    assert summary["accepted"] == 5 and summary["rejected"] == 0 and summary["num_shards"] == 3
    expected_hours = sum(round(r["duration"] * 16000) for r in records) / 16000 / 3600
    assert summary["accepted_hours"] == pytest.approx(expected_hours, rel=1e-9)

    examples = read_split(tmp_path / "tfds", "train")
    assert sorted(examples) == [r["id"] for r in records]
    sidecar = fcaps_format.load_num_samples(tmp_path / "tfds", "train")
    source = fcaps_format.open_split(tmp_path / "tfds", "train")
    assert sidecar.tolist() == [int(source[i]["num_samples"]) for i in range(5)]
    for i, record in enumerate(records):
        ex = examples[record["id"]]
        wav, _ = sf.read(audio_root / f"c{i:04d}.wav", dtype="float32")
        assert ex["waveform"].dtype == np.int16
        np.testing.assert_array_equal(ex["waveform"], fcaps_format.to_int16(wav))
        assert ex["num_samples"] == wav.shape[0] and ex["duration"] == pytest.approx(wav.shape[0] / 16000)
        custom = record["supervisions"][0]["custom"]
        assert [c.decode() for c in ex["global_captions"]] == custom["global_captions"]
        # kept fine-grained captions are sorted by length (the authors' order: last = longest)
        assert [c.decode() for c in ex["finegrained_captions"]] == sorted(custom["finegrained_captions"], key=len)
        assert ex["tags"]["accent"].decode() == custom["accent"]
        assert ex["tags"]["gender"].decode() == record["supervisions"][0]["gender"]
        assert [t.decode() for t in ex["tags"]["situational_tags"]] == custom["situational_tags"]
        assert ex["speaker"].decode() == record["supervisions"][0]["speaker"]


def test_bad_input_is_rejected_with_a_reason_and_good_input_survives(tmp_path):
    a = tmp_path / "audio"
    ok = ff.write_audio(a / "ok.wav", ff.tone(3.0, seed=1))
    trunc = ff.write_audio(a / "trunc.wav", ff.tone(4.0, seed=2))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    (a / "empty.wav").write_bytes(b"")
    (a / "text.wav").write_text("this is not audio at all\n" * 50)
    nan = ff.tone(3.0, seed=3)
    nan[100] = np.nan
    ff.write_audio(a / "nan.wav", nan, subtype="FLOAT")
    low = ff.write_audio(a / "low.wav", ff.tone(3.0, rate=8000, seed=4), rate=8000)
    stereo = ff.write_audio(a / "stereo.flac", ff.tone(3.0, rate=44100, channels=2, seed=5), rate=44100)
    ff.write_audio(a / "speech.mp3", ff.tone(3.0, seed=6))
    long_file = ff.write_audio(a / "long.wav", ff.tone(6.0, seed=7))
    with tarfile.open(a / "pack.tar", "w") as tar:
        tar.add(ok, arcname="inner/ok.wav")
    g = ff.global_caption(0, "male", "british", "low-pitched", "slow speed")
    fine = ff.finegrained_caption(0, 0, "male")

    cuts = [
        ff.cut("good", "ok.wav", 3.0),
        ff.cut("truncated", "trunc.wav", 4.0),
        ff.cut("empty", "empty.wav", 3.0),
        ff.cut("not_audio", "text.wav", 3.0),
        ff.cut("missing", "nowhere.wav", 3.0),
        ff.cut("nan", "nan.wav", 3.0),
        ff.cut("rate8k", "low.wav", 3.0, sampling_rate=8000),
        ff.cut("stereo44k", "stereo.flac", 3.0, channel=1, channels=[0, 1], sampling_rate=44100),
        ff.cut("mp3", "speech.mp3", 3.0),
        ff.cut("offset", "long.wav", 3.0, start=1.5),
        ff.cut("overrun", "long.wav", 3.0, start=4.0),
        ff.cut("tar", f"{a / 'pack.tar'}//inner/ok.wav", 3.0),
        ff.cut("tar_missing_member", f"{a / 'pack.tar'}//inner/nope.wav", 3.0),
        ff.cut("no_captions", "ok.wav", 3.0, global_captions=[], finegrained_captions=[]),
        ff.cut("short", "ok.wav", 1.0),
        ff.cut("bad_fine", "ok.wav", 3.0, global_captions=[g], finegrained_captions=["two\nlines " + fine, "short"]),
        ff.cut("mixed_fine", "ok.wav", 3.0, global_captions=[g], finegrained_captions=["too short", fine]),
        b"{this is not json",
        b'{"id": "latin1", "caption": "caf\xe9"}',
        ff.cut("good", "ok.wav", 3.0),  # duplicate id
    ]
    manifest = ff.write_manifest(tmp_path / "cuts.jsonl", cuts)
    summary = prepare([manifest], split="train", data_dir=tmp_path / "tfds", settings=BuildSettings(str(a)),
                      clips_per_shard=4)

    rejects = read_rejects(tmp_path / "tfds", "train")
    assert rejects == {
        "truncated": "segment_exceeds_audio",  # libsndfile reports the frames actually present
        "empty": "decode_error",
        "not_audio": "decode_error",
        "missing": "missing_audio",
        "nan": "non_finite_samples",
        "overrun": "segment_exceeds_audio",
        "tar_missing_member": "missing_audio",
        "no_captions": "no_captions",
        "short": "too_short",
        "bad_fine": "no_valid_finegrained_captions",
        f"{manifest}:18": "not_json",
        f"{manifest}:19": "not_utf8",
        "good": "duplicate_id",
    }
    examples = read_split(tmp_path / "tfds", "train")
    assert sorted(examples) == sorted(["good", "rate8k", "stereo44k", "mp3", "offset", "tar", "mixed_fine"])
    assert summary["accepted"] == 7 and summary["rejected"] == 13
    assert summary["rejected_by_reason"]["decode_error"] == 2

    ok_audio, _ = sf.read(ok, dtype="float32")
    np.testing.assert_array_equal(examples["tar"]["waveform"], fcaps_format.to_int16(ok_audio))
    low_audio, _ = sf.read(low, dtype="float32")
    expected = soxr.resample(low_audio, 8000, 16000, "HQ")
    np.testing.assert_array_equal(examples["rate8k"]["waveform"], fcaps_format.to_int16(expected))
    assert examples["rate8k"]["num_samples"] == 48000
    stereo_audio, _ = sf.read(stereo, dtype="float32")
    expected = soxr.resample(np.ascontiguousarray(stereo_audio[:, 1]), 44100, 16000, "HQ")
    np.testing.assert_array_equal(examples["stereo44k"]["waveform"], fcaps_format.to_int16(expected))
    assert examples["stereo44k"]["num_samples"] == 48000
    long_audio, _ = sf.read(long_file, dtype="float32")
    np.testing.assert_array_equal(examples["offset"]["waveform"], fcaps_format.to_int16(long_audio[24000:72000]))
    assert examples["mp3"]["num_samples"] == 48000
    assert [c.decode() for c in examples["mixed_fine"]["finegrained_captions"]] == [fine]


def test_audioread_fallback_when_soundfile_cannot_open(tmp_path, monkeypatch):
    path = ff.write_audio(tmp_path / "x.wav", ff.tone(2.0, seed=9))
    expected, _ = sf.read(path, dtype="int16")

    def refuse(*args, **kwargs):
        raise sf.LibsndfileError(0, "refused for the test")

    monkeypatch.setattr(manifests.sf, "SoundFile", refuse)
    got, rate = manifests.read_segment(AudioSource("x.wav", None, (0,)), tmp_path, 0.5, 1.0)
    assert rate == 16000 and got.shape == (16000, 1)
    np.testing.assert_array_equal(np.round(got[:, 0] * 32768).astype(np.int16), expected[8000:24000])
    (tmp_path / "junk.wav").write_bytes(b"\x00" * 100)
    with pytest.raises(ClipRejected, match="decode_error"):
        manifests.read_segment(AudioSource("junk.wav", None, (0,)), tmp_path, 0.0, 1.0)


def _cli(manifest, audio_root, data_dir, *extra, env=None):
    cmd = [sys.executable, "-m", "data_prep.prepare", "--manifest", str(manifest), "--split", "train",
           "--audio-root", str(audio_root), "--data-dir", str(data_dir), "--clips-per-shard", "3", *extra]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)


def _dataset_files(data_dir: Path) -> dict[str, bytes]:
    bdir = fcaps_format.builder_dir(data_dir)
    paths = [p for p in bdir.rglob("*") if p.is_file() and p.name != ".metadata.lock"]
    files = {p.relative_to(bdir).as_posix(): p.read_bytes() for p in paths}
    info = json.loads(files.pop("dataset_info.json"))
    files["splits"] = json.dumps(info["splits"], sort_keys=True).encode()
    return files


def test_killed_build_resumes_to_the_uninterrupted_result(tmp_path):
    manifest, audio_root, records = ff.make_corpus(tmp_path / "src", 10, max_s=4.0)
    (audio_root / "c0004.wav").write_text("broken")  # a reject, so reports are compared too
    reference = _cli(manifest, audio_root, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    assert "accepted 9 clips" in reference.stdout and "decode_error: 1" in reference.stdout

    # Killed in-process after 7 clips: units 0 and 1 (clips 0-5) are done, unit 2 is half written.
    killed = _cli(manifest, audio_root, tmp_path / "run", env={KILL_AFTER_CLIPS_ENV: "7"})
    assert killed.returncode == -9
    work = tmp_path / "run" / "fcaps" / "_work" / "train"
    assert sorted(p.name for p in (work / "done").iterdir()) == ["unit-00000.json", "unit-00001.json"]
    assert not (fcaps_format.builder_dir(tmp_path / "run") / "dataset_info.json").exists()

    refused = _cli(manifest, audio_root, tmp_path / "run", "--min-duration", "3")
    assert refused.returncode != 0 and "different arguments" in refused.stderr

    # A worker process killed (pool mode): the run stops with an error, finished units are kept.
    broken = _cli(manifest, audio_root, tmp_path / "run", "--workers", "2", env={KILL_AFTER_CLIPS_ENV: "2"})
    assert broken.returncode == 1 and "re-run the same command" in broken.stderr

    resumed = _cli(manifest, audio_root, tmp_path / "run", "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert not work.exists()
    assert _dataset_files(tmp_path / "run") == _dataset_files(tmp_path / "ref")
    assert sorted(read_split(tmp_path / "run", "train")) == sorted(r["id"] for r in records if r["id"] != "clip0004")

    again = _cli(manifest, audio_root, tmp_path / "run")
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_second_split_joins_the_same_dataset(tmp_path):
    manifest, audio_root, _ = ff.make_corpus(tmp_path / "src", 4)
    dev_manifest = ff.write_manifest(tmp_path / "dev.jsonl", [ff.cut("dev0", "c0000.wav", 2.5, index=3)])
    settings = BuildSettings(str(audio_root))
    prepare([manifest], split="train", data_dir=tmp_path / "tfds", settings=settings)
    prepare([dev_manifest], split="dev", data_dir=tmp_path / "tfds", settings=settings)
    assert sorted(read_split(tmp_path / "tfds", "dev")) == ["dev0"]
    assert len(read_split(tmp_path / "tfds", "train")) == 4
    with pytest.raises(ValueError, match="TFDS names"):
        prepare([dev_manifest], split="dev/1", data_dir=tmp_path / "tfds", settings=settings)
    with pytest.raises(ValueError, match="does not exist"):
        prepare([tmp_path / "nope.jsonl"], split="x", data_dir=tmp_path / "tfds", settings=settings)
