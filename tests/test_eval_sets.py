"""Evaluation-set manifests from tiny fake RAVDESS / CREMA-D / IEMOCAP / FCaps trees."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from clsp_jax.evals.prompts import ZERO_SHOT_TASKS
from data_prep import eval_sets, manifest_writer


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    soundfile.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def read_manifest(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_id(cuts: list[dict]) -> dict[str, dict]:
    return {c["id"]: c for c in cuts}


def test_ravdess_codes_gender_and_resampling(tmp_path, capsys):
    root = tmp_path / "ravdess"
    write_wav(root / "Actor_12" / "03-01-06-01-02-01-12.wav", 0.5, rate=48000)  # fear, female
    write_wav(root / "Actor_01" / "03-01-05-02-01-02-01.wav", 0.25, rate=48000)  # angry strong, male
    write_wav(root / "Actor_01" / "03-02-03-01-01-01-01.wav", 0.25)  # song
    write_wav(root / "Actor_01" / "01-01-03-01-01-01-01.wav", 0.25)  # audio-video
    write_wav(root / "Actor_01" / "03-01-09-01-01-01-01.wav", 0.25)  # no emotion 09
    write_wav(root / "Actor_01" / "notes.wav", 0.25)
    (root / "Actor_01" / "03-01-02-01-01-01-03.wav").write_bytes(b"not audio")

    eval_sets.main(["ravdess", "--root", str(root), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "kept 2 cuts" in printed and "skipped 1: unreadable_audio" in printed

    cuts = by_id(read_manifest(tmp_path / "out" / "ravdess_cuts.jsonl.gz"))
    assert sorted(cuts) == ["ravdess-03-01-05-02-01-02-01", "ravdess-03-01-06-01-02-01-12"]
    fear = cuts["ravdess-03-01-06-01-02-01-12"]
    sup = fear["supervisions"][0]
    assert (sup["gender"], sup["custom"]["gender"], sup["custom"]["emotion"]) == ("female", "female", "fear")
    assert sup["custom"]["emotion_code"] == "06" and sup["custom"]["actor"] == 12
    assert sup["text"] == "Dogs are sitting by the door." and sup["speaker"] == "ravdess-actor12"
    rec = fear["recording"]
    assert rec["sources"][0]["source"] == "Actor_12/03-01-06-01-02-01-12.wav"
    assert (rec["sampling_rate"], rec["num_samples"], rec["duration"]) == (16000, 8000, 0.5)
    assert rec["transforms"] == [{"name": "Resample",
                                  "kwargs": {"source_sampling_rate": 48000, "target_sampling_rate": 16000}}]
    angry = cuts["ravdess-03-01-05-02-01-02-01"]["supervisions"][0]
    assert (angry["gender"], angry["custom"]["emotion"], angry["custom"]["intensity"]) == ("male", "angry", "strong")

    result = eval_sets.ravdess(root)
    assert dict(result.skipped) == {"not_audio_only_speech": 2, "unknown_code": 1, "unparseable_name": 1,
                                    "unreadable_audio": 1}


def test_cremad_emotions_age_bins_and_demographics(tmp_path):
    root = tmp_path / "cremad"
    audio = root / "AudioWAV"
    write_wav(audio / "1001_DFA_ANG_XX.wav", 0.3)
    write_wav(audio / "1002_IEO_FEA_HI.wav", 0.4)
    write_wav(audio / "1003_TIE_HAP_LO.wav", 0.2)
    write_wav(audio / "1091_WSI_NEU_XX.wav", 0.2)  # actor missing from the table
    write_wav(audio / "1001_DFA_XYZ_XX.wav", 0.2)  # unknown emotion
    write_wav(audio / "1001_DFA.wav", 0.2)
    soundfile.write(audio / "1076_MTI_SAD_XX.wav", np.zeros(0, np.float32), 16000)  # the known empty file
    (root / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n1002,21,Female,Asian,Not Hispanic\n"
        "1003,60,Female,African American,Not Hispanic\n1004,unknown,Male,Caucasian,Hispanic\n")

    path, result = eval_sets.build("cremad", root, tmp_path / "out")
    cuts = by_id(read_manifest(path))
    assert sorted(cuts) == ["cremad-1001_DFA_ANG_XX", "cremad-1002_IEO_FEA_HI", "cremad-1003_TIE_HAP_LO",
                            "cremad-1091_WSI_NEU_XX"]
    labels = {k: (c["supervisions"][0]["custom"].get("emotion"), c["supervisions"][0]["custom"].get("age"),
                  c["supervisions"][0]["custom"].get("age_bin"), c["supervisions"][0].get("gender"))
              for k, c in cuts.items()}
    assert labels == {"cremad-1001_DFA_ANG_XX": ("angry", 51, "40-59", "male"),
                      "cremad-1002_IEO_FEA_HI": ("fear", 21, "20-39", "female"),
                      "cremad-1003_TIE_HAP_LO": ("happy", 60, ">=60", "female"),
                      "cremad-1091_WSI_NEU_XX": ("neutral", None, None, None)}
    fear = cuts["cremad-1002_IEO_FEA_HI"]
    assert fear["supervisions"][0]["text"] == "It's eleven o'clock."
    assert fear["supervisions"][0]["custom"]["intensity"] == "high"
    assert fear["recording"]["num_samples"] == 6400 and "transforms" not in fear["recording"]
    assert dict(result.skipped) == {"bad_demographics_row": 1, "empty_audio": 1, "unknown_code": 1,
                                    "unparseable_name": 1}
    assert dict(result.incomplete) == {"no_demographics": 1}


def test_age_bins_edges():
    assert [eval_sets.age_bin(a) for a in (8, 19, 20, 39, 40, 59, 60, 74)] == [
        "<20", "<20", "20-39", "20-39", "40-59", "40-59", ">=60", ">=60"]
    with pytest.raises(ValueError, match="age"):
        eval_sets.age_bin(-1)


IEMOCAP_S1 = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()
C-E3:\tNeutral;\t()
A-E3:\tval 3; act 2; dom  2;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[3.5000, 3.5000, 2.5000]
[14.8872 - 18.0175]\tSes01F_impro01_F001\tfru\t[2.5000, 3.5000, 3.0000]
[19.2900 - 20.8300]\tSes01F_impro01_M001\tang\t[1.5000, 4.0000, 4.0000]
[21.0 - garbled
"""
IEMOCAP_S2 = """[1.0000 - 2.5000]\tSes02M_script01_1_F003\tsad\t[2.0000, 2.0000, 2.0000]
[3.0000 - 4.0000]\tSes02M_script01_1_M004\txxx\t[2.0000, 2.0000, 2.0000]
[5.0000 - 6.0000]\tSes02M_script01_1_M005\thap\t[4.0000, 3.0000, 3.0000]
"""


def test_iemocap_four_classes_with_excited_as_happy(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    s1, s2 = root / "Session1", root / "Session2"
    (s1 / "dialog" / "EmoEvaluation").mkdir(parents=True)
    (s1 / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt").write_text(IEMOCAP_S1)
    (s1 / "dialog" / "transcriptions").mkdir(parents=True)
    (s1 / "dialog" / "transcriptions" / "Ses01F_impro01.txt").write_text(
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\nSes01F_impro01_M000 [010.0100-011.3925]: Do you have your forms?\n")
    (s2 / "dialog" / "EmoEvaluation").mkdir(parents=True)
    (s2 / "dialog" / "EmoEvaluation" / "Ses02M_script01_1.txt").write_text(IEMOCAP_S2)
    for session, turn, seconds in ((s1, "Ses01F_impro01_F000", 1.9), (s1, "Ses01F_impro01_M000", 1.4),
                                   (s1, "Ses01F_impro01_F001", 3.1), (s2, "Ses02M_script01_1_F003", 1.5),
                                   (s2, "Ses02M_script01_1_M005", 1.0)):
        write_wav(session / "sentences" / "wav" / turn.rsplit("_", 1)[0] / f"{turn}.wav", seconds)

    path, result = eval_sets.build("iemocap", root, tmp_path / "out")
    cuts = by_id(read_manifest(path))
    labels = {k: (c["supervisions"][0]["custom"]["emotion"], c["supervisions"][0]["custom"]["emotion_code"],
                  c["supervisions"][0]["gender"], c["supervisions"][0]["custom"]["session"]) for k, c in cuts.items()}
    assert labels == {"iemocap-Ses01F_impro01_F000": ("neutral", "neu", "female", 1),
                      "iemocap-Ses01F_impro01_M000": ("happy", "exc", "male", 1),
                      "iemocap-Ses02M_script01_1_F003": ("sad", "sad", "female", 2),
                      "iemocap-Ses02M_script01_1_M005": ("happy", "hap", "male", 2)}
    first = cuts["iemocap-Ses01F_impro01_F000"]
    assert first["supervisions"][0]["text"] == "Excuse me."
    assert first["supervisions"][0]["speaker"] == "iemocap-Ses01F"
    assert first["supervisions"][0]["custom"]["valence"] == 2.5
    assert first["recording"]["sources"][0]["source"] == "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert first["duration"] == pytest.approx(1.9)
    assert dict(result.skipped) == {"dropped_label_fru": 1, "dropped_label_xxx": 1, "missing_audio": 1,
                                    "unparseable_label_line": 1}


def fcaps_record(cut_id: str, globals_: list[str], fines: list[str]) -> dict:
    rec = manifest_writer.recording(cut_id, f"audio/{cut_id}.flac", 32000, 16000)
    return manifest_writer.mono_cut(cut_id, rec, text="hello", speaker="spk", gender="female", custom={
        "short_captions": globals_, "long_captions": fines, "accent": "scottish", "pitch": "high-pitched",
        "speaking_rate": "fast speed", "intrinsic_tags": [], "situational_tags": ["loud"]})


def test_psc_keeps_first_global_and_last_finegrained(tmp_path):
    long_a = "A woman with a Scottish accent speaks quickly and loudly, her high-pitched voice " + "x" * 80
    long_b = long_a + " She keeps the same fast delivery to the end of the utterance, clearly and evenly."
    negated = long_b + " There is no pause at all between the phrases, which run together smoothly."
    records = [
        fcaps_record("c1", ["A fast, loud Scottish woman with a high voice.", "A quick, loud woman speaking with a Scottish accent."],
                     [long_b, negated, "too short", long_a]),
        fcaps_record("c2", ["A fast, loud Scottish woman with a high voice."], []),
        fcaps_record("c3", ["A fast, loud Scottish woman with a high voice."], ["too short"]),
    ]
    src = tmp_path / "fcaps_test.jsonl.gz"
    manifest_writer.write_jsonl_gz(src, records)
    with gzip.open(src, "at") as f:
        f.write("{not json\n")

    path, result = eval_sets.build("psc", src, tmp_path / "out")
    (cut,) = read_manifest(path)
    custom = cut["supervisions"][0]["custom"]
    assert custom["global_captions"] == custom["short_captions"] == ["A fast, loud Scottish woman with a high voice."]
    assert custom["finegrained_captions"] == custom["long_captions"] == [long_b]  # longest valid one
    assert custom["accent"] == "scottish" and custom["situational_tags"] == ["loud"]
    assert cut["recording"] == records[0]["recording"]
    assert dict(result.skipped) == {"needs_global_and_finegrained_caption": 1, "no_valid_finegrained_captions": 1,
                                    "not_json": 1}
    with pytest.raises(ValueError, match="manifest file"):
        eval_sets.build("psc", tmp_path, tmp_path / "out")


def test_zero_shot_prompts_match_the_paper():
    label_key, prompts = ZERO_SHOT_TASKS["iemocap_emotion"]
    assert label_key == "emotion"
    assert prompts[1] == ("A speaker in a excited tone.", "happy")
    assert {label for _, label in prompts} == set(eval_sets.IEMOCAP_EMOTIONS.values())
    _, prompts = ZERO_SHOT_TASKS["ravdess_emotion"]
    assert [label for _, label in prompts] == ["angry", "calm", "disgust", "fear", "happy", "sad", "surprised",
                                               "neutral"]
    assert set(eval_sets.RAVDESS_EMOTIONS.values()) == {label for _, label in prompts}
    assert {label for _, label in ZERO_SHOT_TASKS["cremad_emotion"][1]} == set(
        eval_sets.CREMAD_EMOTIONS.values())
    assert [label for _, label in ZERO_SHOT_TASKS["cremad_age"][1]] == list(eval_sets.AGE_BINS)


def test_manifest_writer_rounding_bounds_and_bytes(tmp_path):
    assert manifest_writer.resampled_num_samples(24001, 48000, 16000) == 8000
    assert manifest_writer.resampled_num_samples(24002, 48000, 16000) == 8001
    assert manifest_writer.resampled_num_samples(3, 2, 1) == 2  # 1.5 rounds half up
    rec = manifest_writer.recording("r", "a.wav", 16000, 16000)
    with pytest.raises(ValueError, match="outside recording"):
        manifest_writer.mono_cut("c", rec, start=0.5, duration=0.6)
    with pytest.raises(ValueError, match="num_samples"):
        manifest_writer.recording("r", "a.wav", 0, 16000)
    cut = manifest_writer.mono_cut("c", rec, custom={"emotion": "calm"})
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert manifest_writer.write_jsonl_gz(a, [cut, cut]) == 2
    manifest_writer.write_jsonl_gz(b, [cut, cut])
    assert a.read_bytes() == b.read_bytes() and read_manifest(a) == [cut, cut]
