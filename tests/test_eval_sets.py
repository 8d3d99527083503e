"""Evaluation-set manifests and cards from tiny fake trees in each dataset's real layout (RAVDESS, CREMA-D,
IEMOCAP, PSC), for the authors' protocols and the alternatives; the CLI's one-line user errors."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from clsp_jax.data import manifests
from clsp_jax.evals.prompts import ZERO_SHOT_TASKS
from data_prep import eval_sets, manifest_writer

REPO = Path(__file__).resolve().parents[1]


def write_wav(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    wave = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    soundfile.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate, subtype="PCM_16")
    return path


def write_json(path: Path, item) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(item))


def read_manifest(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_card(out: Path, name: str, protocol: str) -> dict:
    return json.loads((out / f"{name}_{protocol}_card.json").read_text())


def by_id(cuts: list[dict]) -> dict[str, dict]:
    return {c["id"]: c for c in cuts}


def custom(cut: dict) -> dict:
    return cut["supervisions"][0]["custom"]


# ------------------------------------------------------------------------------------------------- RAVDESS


def test_ravdess_original_codes_gender_and_resampling(tmp_path, capsys):
    root = tmp_path / "ravdess"
    write_wav(root / "Actor_12" / "03-01-06-01-02-01-12.wav", 0.5, rate=48000)  # fear, female
    write_wav(root / "Actor_01" / "03-01-05-02-01-02-01.wav", 0.25, rate=48000)  # angry strong, male
    write_wav(root / "Actor_01" / "03-02-03-01-01-01-01.wav", 0.25)  # song
    write_wav(root / "Actor_01" / "01-01-03-01-01-01-01.wav", 0.25)  # audio-video
    write_wav(root / "Actor_01" / "03-01-09-01-01-01-01.wav", 0.25)  # no emotion 09
    write_wav(root / "Actor_01" / "notes.wav", 0.25)
    (root / "Actor_01" / "03-01-02-01-01-01-03.wav").write_bytes(b"not audio")

    argv = ["ravdess", "--protocol", "original", "--root", str(root), "--out", str(tmp_path / "out")]
    assert eval_sets.main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept 2 cuts (ravdess, protocol original, not the paper protocol)" in printed
    assert "skipped 1: unreadable_audio" in printed

    cuts = by_id(read_manifest(tmp_path / "out" / "ravdess_original_cuts.jsonl.gz"))
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

    card = read_card(tmp_path / "out", "ravdess", "original")
    assert card["skipped"] == {"not_audio_only_speech": 2, "unknown_code": 1, "unparseable_name": 1,
                               "unreadable_audio": 1}
    assert card["counts"] == {"emotion": {"angry": 1, "fear": 1}, "gender": {"female": 1, "male": 1}}
    assert card["total_duration_s"] == 0.75 and card["paper_protocol"] is False


def test_ravdess_folds_as_the_authors_package_them(tmp_path):
    """X-ARES layout: fold_K/<clip>.wav + <clip>.json {"emotion": word}; all four folds make the set."""
    root = tmp_path / "ravdess_xares"
    clips = {  # fold, clip name, json emotion
        "a": (0, "03-01-06-01-02-01-12", "fearful"),  # fear, actor 12 -> female
        "b": (1, "03-01-01-01-01-01-01", "neutral"),  # actor 1 -> male
        "c": (2, "03-01-08-02-02-02-23", "surprised"),  # actor 23 -> male
        "d": (3, "03-01-02-01-01-02-24", "calm"),  # actor 24 -> female
        "e": (3, "03-01-03-01-01-01-04", "angry"),  # json says angry, the name says happy: the json wins
    }
    for fold, stem, word in clips.values():
        write_wav(root / f"fold_{fold}" / f"{stem}.wav", 0.25)
        write_json(root / f"fold_{fold}" / f"{stem}.json", {"emotion": word})
    write_json(root / "fold_1" / "03-01-04-01-01-01-02.json", {"emotion": "sad"})  # its audio is missing
    write_wav(root / "fold_2" / "03-01-04-01-01-01-06.wav", 0.25)  # no label file: the authors never see it
    write_wav(root / "fold_2" / "03-01-07-01-01-01-08.wav", 0.25)
    write_json(root / "fold_2" / "03-01-07-01-01-01-08.json", {"emotion": "bored"})  # not a RAVDESS emotion
    write_wav(root / "fold_3" / "03-01-01-01-01-01-01.wav", 0.25)  # the fold_1 clip again
    write_json(root / "fold_3" / "03-01-01-01-01-01-01.json", {"emotion": "neutral"})
    (root / "fold_0" / "broken.json").write_text("{")

    path, result = eval_sets.build("ravdess", root, tmp_path / "out")  # the authors' protocol by default
    assert path.name == "ravdess_folds_cuts.jsonl.gz"
    cuts = read_manifest(path)
    assert [c["id"] for c in cuts] == ["ravdess-03-01-06-01-02-01-12", "ravdess-03-01-01-01-01-01-01",
                                       "ravdess-03-01-08-02-02-02-23", "ravdess-03-01-02-01-01-02-24",
                                       "ravdess-03-01-03-01-01-01-04"]
    labels = [(custom(c)["emotion"], c["supervisions"][0]["gender"], custom(c)["fold"]) for c in cuts]
    assert labels == [("fear", "female", 0), ("neutral", "male", 1), ("surprised", "male", 2),
                      ("calm", "female", 3), ("angry", "female", 3)]
    assert custom(cuts[0])["emotion_label"] == "fearful" and cuts[0]["supervisions"][0]["text"] == (
        "Dogs are sitting by the door.")
    assert cuts[0]["recording"]["sources"][0]["source"] == "fold_0/03-01-06-01-02-01-12.wav"
    assert dict(result.skipped) == {"audio_without_label_file": 1, "bad_label_file": 1, "duplicate_clip": 1,
                                    "missing_audio": 1, "unknown_label": 1}
    assert dict(result.incomplete) == {"label_differs_from_file_name": 1}
    card = read_card(tmp_path / "out", "ravdess", "folds")
    assert card["paper_protocol"] is True and card["num_cuts"] == 5 and card["total_duration_s"] == 1.25
    assert card["counts"]["gender"] == {"female": 3, "male": 2}


# ------------------------------------------------------------------------------------------------- CREMA-D

DEMOGRAPHICS = ("ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
                "1002,21,Female,Asian,Not Hispanic\n1003,60,Female,African American,Not Hispanic\n"
                "1004,unknown,Male,Caucasian,Hispanic\n1005,19,Male,Caucasian,Not Hispanic\n")


def test_cremad_test_split_labels_from_the_split_files(tmp_path):
    """X-ARES layout: test/<clip>.wav + <clip>.json {"label": letter}; only the test folder is read."""
    root = tmp_path / "cremad"
    (root / "VideoDemographics.csv").parent.mkdir(parents=True)
    (root / "VideoDemographics.csv").write_text(DEMOGRAPHICS)
    for stem, letter in (("1001_DFA_ANG_XX", "A"), ("1002_IEO_FEA_HI", "F"), ("1005_TIE_SAD_LO", "S"),
                         ("1003_ITS_HAP_XX", "N"),  # the label file disagrees with the name: the label file wins
                         ("1091_WSI_NEU_XX", "N"),  # actor missing from the demographics table
                         ("1002_MTI_DIS_XX", "Q")):  # not one of the six letters
        write_wav(root / "test" / f"{stem}.wav", 0.25)
        write_json(root / "test" / f"{stem}.json", {"label": letter})
    write_json(root / "test" / "1001_IWW_HAP_XX.json", {"label": "H"})  # audio missing
    write_wav(root / "train" / "1004_DFA_ANG_XX.wav", 0.25)  # another split: not part of the set
    write_json(root / "train" / "1004_DFA_ANG_XX.json", {"label": "A"})

    path, result = eval_sets.build("cremad", root, tmp_path / "out")
    assert path.name == "cremad_test_cuts.jsonl.gz"
    cuts = by_id(read_manifest(path))
    labels = {k: (custom(c)["emotion"], custom(c).get("age"), custom(c).get("age_bin"),
                  c["supervisions"][0].get("gender"), c["supervisions"][0]["speaker"]) for k, c in cuts.items()}
    assert labels == {"cremad-1001_DFA_ANG_XX": ("angry", 51, "40-59", "male", "cremad-1001"),
                      "cremad-1002_IEO_FEA_HI": ("fear", 21, "20-39", "female", "cremad-1002"),
                      "cremad-1003_ITS_HAP_XX": ("neutral", 60, ">=60", "female", "cremad-1003"),
                      "cremad-1005_TIE_SAD_LO": ("sad", 19, "<20", "male", "cremad-1005"),
                      "cremad-1091_WSI_NEU_XX": ("neutral", None, None, None, "cremad-1091")}
    assert cuts["cremad-1002_IEO_FEA_HI"]["supervisions"][0]["text"] == "It's eleven o'clock."
    assert cuts["cremad-1002_IEO_FEA_HI"]["recording"]["sources"][0]["source"] == "test/1002_IEO_FEA_HI.wav"
    assert dict(result.skipped) == {"bad_demographics_row": 1, "missing_audio": 1, "unknown_label": 1}
    assert dict(result.incomplete) == {"label_differs_from_file_name": 1, "no_demographics": 1}
    card = read_card(tmp_path / "out", "cremad", "test")
    assert card["counts"] == {"emotion": {"angry": 1, "fear": 1, "neutral": 2, "sad": 1},
                              "gender": {"female": 2, "male": 2, "(none)": 1},
                              "age_bin": {"20-39": 1, "40-59": 1, "<20": 1, ">=60": 1, "(none)": 1}}


def test_cremad_all_files_emotions_from_names(tmp_path):
    root = tmp_path / "cremad"
    audio = root / "AudioWAV"
    write_wav(audio / "1001_DFA_ANG_XX.wav", 0.3)
    write_wav(audio / "1002_IEO_FEA_HI.wav", 0.4)
    write_wav(audio / "1003_TIE_HAP_LO.wav", 0.2)
    write_wav(audio / "1091_WSI_NEU_XX.wav", 0.2)  # actor missing from the table
    write_wav(audio / "1001_DFA_XYZ_XX.wav", 0.2)  # unknown emotion
    write_wav(audio / "1001_DFA.wav", 0.2)
    soundfile.write(audio / "1076_MTI_SAD_XX.wav", np.zeros(0, np.float32), 16000)  # the known empty file
    (root / "VideoDemographics.csv").write_text(DEMOGRAPHICS)

    path, result = eval_sets.build("cremad", root, tmp_path / "out", protocol="all")
    cuts = by_id(read_manifest(path))
    labels = {k: (custom(c).get("emotion"), custom(c).get("age"), custom(c).get("age_bin"),
                  c["supervisions"][0].get("gender")) for k, c in cuts.items()}
    assert labels == {"cremad-1001_DFA_ANG_XX": ("angry", 51, "40-59", "male"),
                      "cremad-1002_IEO_FEA_HI": ("fear", 21, "20-39", "female"),
                      "cremad-1003_TIE_HAP_LO": ("happy", 60, ">=60", "female"),
                      "cremad-1091_WSI_NEU_XX": ("neutral", None, None, None)}
    fear = cuts["cremad-1002_IEO_FEA_HI"]
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


# ------------------------------------------------------------------------------------------------- IEMOCAP

IEMOCAP_S1 = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[0.5000 - 1.2500]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()
C-E3:\tNeutral;\t()
A-E3:\tval 3; act 2; dom  2;\t()

[1.5000 - 2.0000]\tSes01F_impro01_M000\texc\t[3.5000, 3.5000, 2.5000]
[2.1000 - 2.4000]\tSes01F_impro01_F001\tfru\t[2.5000, 3.5000, 3.0000]
[2.5000 - 2.9000]\tSes01F_impro01_M001\tang\t[1.5000, 4.0000, 4.0000]
[2.6000 - 3.5000]\tSes01F_impro01_F002\tsad\t[1.5000, 2.0000, 2.0000]
[2.5000 - 2.9000]\tSes01F_impro01_M001\tang\t[1.5000, 4.0000, 4.0000]
[21.0 - garbled
"""
IEMOCAP_S2 = """[1.0000 - 1.5000]\tSes02M_script01_1_F003\tsad\t[2.0000, 2.0000, 2.0000]
[1.5000 - 1.7500]\tSes02M_script01_1_M004\txxx\t[2.0000, 2.0000, 2.0000]
[0.2500 - 0.7500]\tSes02M_script01_1_M005\thap\t[4.0000, 3.0000, 3.0000]
"""
IEMOCAP_S2_OTHER = "[0.1000 - 0.9000]\tSes02F_impro02_F000\tneu\t[2.0000, 2.0000, 2.0000]\n"


def iemocap_tree(root: Path) -> None:
    """Session1: one stereo dialog (3 s; channel 0 a ramp, channel 1 constant), Session2: one dialog with
    audio and one without; label files, transcripts, per-turn sentence files, and a macOS "._" copy of a
    label file that must be ignored."""
    s1, s2 = root / "Session1", root / "Session2"
    for session, name, text in ((s1, "Ses01F_impro01", IEMOCAP_S1), (s2, "Ses02M_script01_1", IEMOCAP_S2),
                                (s2, "Ses02F_impro02", IEMOCAP_S2_OTHER)):
        (session / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
        (session / "dialog" / "EmoEvaluation" / f"{name}.txt").write_text(text)
    (s1 / "dialog" / "EmoEvaluation" / "._Ses01F_impro01.txt").write_text(IEMOCAP_S2)
    (s1 / "dialog" / "transcriptions").mkdir(parents=True)
    (s1 / "dialog" / "transcriptions" / "Ses01F_impro01.txt").write_text(
        "Ses01F_impro01_F000 [000.5000-001.2500]: Excuse me.\n"
        "Ses01F_impro01_M000 [001.5000-002.0000]: Do you have your forms?\n")
    ramp = np.arange(3 * 16000, dtype=np.float32) / 65536.0  # sample k of channel 0 holds k / 2**16
    (s1 / "dialog" / "wav").mkdir(parents=True)
    soundfile.write(s1 / "dialog" / "wav" / "Ses01F_impro01.wav", np.stack([ramp, np.full_like(ramp, -0.5)], 1),
                    16000, subtype="FLOAT")
    write_wav(s2 / "dialog" / "wav" / "Ses02M_script01_1.wav", 2.0, channels=2)
    for session, turn, seconds in ((s1, "Ses01F_impro01_F000", 0.75), (s1, "Ses01F_impro01_M000", 0.5),
                                   (s2, "Ses02M_script01_1_F003", 0.5), (s2, "Ses02M_script01_1_M005", 0.5)):
        write_wav(session / "sentences" / "wav" / turn.rsplit("_", 1)[0] / f"{turn}.wav", seconds)


def test_iemocap_dialog_channel0_cut_at_the_evaluation_times(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    iemocap_tree(root)
    s1_dialog, s2_dialog = "Session1/dialog/wav/Ses01F_impro01.wav", "Session2/dialog/wav/Ses02M_script01_1.wav"
    path, result = eval_sets.build("iemocap", root, tmp_path / "out")
    assert path.name == "iemocap_dialog_cuts.jsonl.gz"
    cuts = by_id(read_manifest(path))
    expected = {  # cut id: (emotion, code, gender, start, duration, dialog file)
        "iemocap-Ses01F_impro01_F000": ("neutral", "neu", "female", 0.5, 0.75, s1_dialog),
        "iemocap-Ses01F_impro01_M000": ("happy", "exc", "male", 1.5, 0.5, s1_dialog),
        "iemocap-Ses01F_impro01_M001": ("angry", "ang", "male", 2.5, 0.4, s1_dialog),
        "iemocap-Ses02M_script01_1_F003": ("sad", "sad", "female", 1.0, 0.5, s2_dialog),
        "iemocap-Ses02M_script01_1_M005": ("happy", "hap", "male", 0.25, 0.5, s2_dialog),
    }
    got = {k: (custom(c)["emotion"], custom(c)["emotion_code"], c["supervisions"][0]["gender"], c["start"],
               round(c["duration"], 6), c["recording"]["sources"][0]["source"]) for k, c in cuts.items()}
    assert got == expected
    first = cuts["iemocap-Ses01F_impro01_F000"]
    assert first["channel"] == 0 and first["recording"]["id"] == "Ses01F_impro01"
    assert first["recording"]["sources"][0]["channels"] == [0, 1]
    assert first["supervisions"][0]["text"] == "Excuse me." and first["supervisions"][0]["speaker"] == "iemocap-Ses01F"
    # The audio of a cut is channel 0 (the ramp) from 0.5 s to 1.25 s: samples 8000 .. 19999.
    wave = manifests.load_clip(manifests.parse_cut(first), root)
    np.testing.assert_allclose(wave, np.arange(8000, 20000) / 65536.0, atol=1e-7)
    assert dict(result.skipped) == {
        "dropped_label_fru": 1, "dropped_label_xxx": 1, "duplicate_turn": 1, "missing_audio": 1,
        "segment_outside_audio": 1, "unparseable_label_line": 1}
    card = read_card(tmp_path / "out", "iemocap", "dialog")
    assert card["counts"]["emotion"] == {"angry": 1, "happy": 2, "neutral": 1, "sad": 1}
    assert card["total_duration_s"] == pytest.approx(2.65)


def test_iemocap_sentences_variant_same_turns_whole_files(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    iemocap_tree(root)
    path, result = eval_sets.build("iemocap", root, tmp_path / "out", protocol="sentences")
    cuts = by_id(read_manifest(path))
    # Same label selection as the dialog protocol; the turns whose sentence file is missing are counted.
    assert sorted(cuts) == ["iemocap-Ses01F_impro01_F000", "iemocap-Ses01F_impro01_M000",
                            "iemocap-Ses02M_script01_1_F003", "iemocap-Ses02M_script01_1_M005"]
    first = cuts["iemocap-Ses01F_impro01_F000"]
    assert first["start"] == 0 and first["duration"] == pytest.approx(0.75)
    assert first["recording"]["sources"][0]["source"] == (
        "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav")
    assert custom(first)["valence"] == 2.5 and custom(first)["dialog_start"] == 0.5
    assert result.skipped["missing_audio"] == 3 and result.skipped["duplicate_turn"] == 1


# ------------------------------------------------------------------------------------------------- PSC

LONG = "A woman with a Scottish accent speaks quickly and loudly, her high-pitched voice carrying " + "x" * 60
LONGER = LONG + " She keeps the same fast delivery to the end of the utterance, clearly and evenly."
GLOBAL = "A fast, loud Scottish woman with a high voice."


def psc_cut(cut_id: str, source: str, globals_=(GLOBAL,), fines=(LONGER, LONG), split="holdout") -> dict:
    rec = manifest_writer.recording(f"{split}-{cut_id}", source, 32000, 16000)
    return manifest_writer.mono_cut(f"{split}-{cut_id}", rec, text="hello there", speaker="spk", gender="female",
                                    custom={"short_captions": list(globals_), "long_captions": list(fines),
                                            "accent": "scottish", "situational_tags": ["loud"]})


def psc_tree(root: Path) -> None:
    """Holdout and test manifests per source with the authors' names; see the test for what each cut tests."""
    holdout = {
        "voxceleb": [psc_cut("v1", "download/voxceleb/id1/a.wav"),
                     psc_cut("v2", "download/voxceleb/id1/b.wav"),  # not in the test split
                     psc_cut("v3", "download/voxceleb/id2/c.wav", globals_=("too short",)),
                     psc_cut("v4", "download/voxceleb/id2/d.wav", globals_=(GLOBAL, GLOBAL, GLOBAL)),
                     psc_cut("v1bis", "download/voxceleb/id1/a.wav", globals_=(GLOBAL, GLOBAL + " Twice."))],
        "expresso": [psc_cut("e1", "download/expresso/e/1.wav", fines=(LONG + " The two speakers alternate.",)),
                     psc_cut("e2", "download/expresso/e/2.wav", fines=("short", LONG + " She is not loud.")),
                     psc_cut("e3", "download/expresso/e/3.wav", fines=()),
                     psc_cut("e4", "download/expresso/e/4.wav", fines=(LONG + "\nsecond line", LONG))],
        "ears": [psc_cut("s1", "download/ears/p001/x.wav")],
    }
    test = {"voxceleb": ["download/voxceleb/id1/a.wav", "download/voxceleb/id2/c.wav", "download/voxceleb/id2/d.wav",
                         "download/voxceleb/id9/zzz.wav"],
            "expresso": [f"download/expresso/e/{i}.wav" for i in (1, 2, 3, 4)],
            "ears": ["download/ears/p001/x.wav"]}
    for source in eval_sets.PSC_SOURCES:
        manifest_writer.write_jsonl_gz(root / f"paraspeechcaps_cuts_holdout-{source}.jsonl.gz", holdout[source])
        manifest_writer.write_jsonl_gz(root / f"paraspeechcaps_cuts_test-{source}.jsonl.gz",
                                       [psc_cut(f"t{i}", s, split="test") for i, s in enumerate(test[source])])


def test_psc_holdout_cuts_of_the_test_split_then_the_caption_filter(tmp_path):
    root = tmp_path / "manifests"
    psc_tree(root)
    path, result = eval_sets.build("psc", root, tmp_path / "out")
    assert path.name == "psc_holdout-test_cuts.jsonl.gz"
    cuts = read_manifest(path)
    # voxceleb then expresso then ears, in holdout order; a test-split audio file held by two holdout cuts
    # gives two cuts (v1, v1bis).
    assert [c["id"] for c in cuts] == ["holdout-v1", "holdout-v1bis", "holdout-e4", "holdout-s1"]
    assert [custom(c)["psc_source"] for c in cuts] == ["voxceleb", "voxceleb", "expresso", "ears"]
    assert custom(cuts[0])["long_captions"] == [LONG, LONGER]  # kept captions sorted by length: last = longest
    assert custom(cuts[1])["short_captions"] == [GLOBAL, GLOBAL + " Twice."]
    assert custom(cuts[2])["long_captions"] == [LONG]  # the caption with a newline is dropped
    assert custom(cuts[0])["accent"] == "scottish" and cuts[0]["recording"]["id"] == "holdout-v1"
    assert dict(result.skipped) == {
        "holdout_audio_not_in_test_split": 1,  # v2
        "global_caption_too_short": 1,  # v3
        "global_caption_count": 1,  # v4: three global captions (the authors' assert)
        "multi_speaker_caption": 1,  # e1
        "no_valid_finegrained_captions": 1,  # e2: one too short, one negated
        "no_finegrained_captions": 1,  # e3
    }
    card = read_card(tmp_path / "out", "psc", "holdout-test")
    assert card["counts"]["psc_source"] == {"ears": 1, "expresso": 1, "voxceleb": 2}
    assert card["num_cuts"] == 4 and card["total_duration_s"] == 8.0


def test_psc_single_manifest_variant(tmp_path):
    src = tmp_path / "fcaps_test.jsonl.gz"
    manifest_writer.write_jsonl_gz(src, [psc_cut("c1", "a.flac", fines=(LONGER, "too short", LONG)),
                                         psc_cut("c2", "b.flac", fines=())])
    with gzip.open(src, "at") as f:
        f.write("{not json\n")
    path, result = eval_sets.build("psc", src, tmp_path / "out", protocol="manifest")
    (cut,) = read_manifest(path)
    assert custom(cut)["long_captions"] == [LONG, LONGER] and custom(cut)["short_captions"] == [GLOBAL]
    assert "psc_source" not in custom(cut)
    assert dict(result.skipped) == {"no_finegrained_captions": 1, "not_json": 1}


# ------------------------------------------------------------------------------------------------- cards


def test_cut_list_checksum_ignores_paths_and_order_but_not_labels(tmp_path):
    def ravdess_root(root: Path, emotion: str) -> Path:
        for fold, stem in enumerate(("03-01-06-01-02-01-12", "03-01-01-01-01-01-01", "03-01-02-01-01-01-03",
                                     "03-01-05-01-01-01-04")):
            write_wav(root / f"fold_{fold}" / f"{stem}.wav", 0.25)
            write_json(root / f"fold_{fold}" / f"{stem}.json", {"emotion": emotion if fold == 0 else "calm"})
        return root

    a = eval_sets.build("ravdess", ravdess_root(tmp_path / "a", "fearful"), tmp_path / "out_a")[1]
    b = eval_sets.build("ravdess", ravdess_root(tmp_path / "elsewhere" / "b", "fearful"), tmp_path / "out_b")[1]
    c = eval_sets.build("ravdess", ravdess_root(tmp_path / "c", "sad"), tmp_path / "out_c")[1]
    digest = eval_sets.cut_list_sha256("ravdess", a.cuts)
    assert digest == eval_sets.cut_list_sha256("ravdess", b.cuts[::-1])
    assert digest != eval_sets.cut_list_sha256("ravdess", c.cuts)
    assert read_card(tmp_path / "out_a", "ravdess", "folds")["cut_list_sha256"] == digest


# ------------------------------------------------------------------------------------------------- CLI errors


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a phrase of the expected one-line error)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "cremad_no_test").mkdir()
    (tmp_path / "cremad_no_test" / "VideoDemographics.csv").write_text(DEMOGRAPHICS)
    write_wav(tmp_path / "cremad_no_json" / "test" / "1001_DFA_ANG_XX.wav", 0.1)
    write_wav(tmp_path / "cremad_no_demo" / "test" / "1001_DFA_ANG_XX.wav", 0.1)
    write_json(tmp_path / "cremad_no_demo" / "test" / "1001_DFA_ANG_XX.json", {"label": "A"})
    (tmp_path / "iemocap_no_labels" / "Session1" / "dialog" / "wav").mkdir(parents=True)
    write_wav(tmp_path / "ravdess_3folds" / "fold_0" / "x.wav", 0.1)
    (tmp_path / "ravdess_3folds" / "fold_1").mkdir()
    (tmp_path / "ravdess_3folds" / "fold_2").mkdir()
    psc_tree(tmp_path / "psc_no_ears")
    (tmp_path / "psc_no_ears" / "paraspeechcaps_cuts_holdout-ears.jsonl.gz").unlink()
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "out")
    return {
        "unknown dataset": (["tess", "--root", str(empty), "--out", out], "invalid choice: 'tess'"),
        "missing --root": (["ravdess", "--out", out], "--root"),
        "unknown option": (["ravdess", "--root", str(empty), "--out", out, "--fold", "1"], "unrecognized arguments"),
        "bad protocol": (["ravdess", "--root", str(empty), "--out", out, "--protocol", "dialog"],
                         "ravdess has no protocol 'dialog'; choose from folds, original"),
        "missing dataset dir": (["iemocap", "--root", str(tmp_path / "nope"), "--out", out], "does not exist"),
        "ravdess folds missing": (["ravdess", "--root", str(tmp_path / "ravdess_3folds"), "--out", out],
                                  "fold_3 not found"),
        "ravdess original empty": (["ravdess", "--protocol", "original", "--root", str(empty), "--out", out],
                                   "no usable clips"),
        "cremad no test folder": (["cremad", "--root", str(tmp_path / "cremad_no_test"), "--out", out],
                                  "test not found"),
        "cremad no label files": (["cremad", "--root", str(tmp_path / "cremad_no_json"), "--out", out],
                                  "no label files"),
        "cremad no demographics": (["cremad", "--root", str(tmp_path / "cremad_no_demo"), "--out", out],
                                   "VideoDemographics.csv not found"),
        "iemocap no sessions": (["iemocap", "--root", str(empty), "--out", out], "no Session1..Session5"),
        "iemocap no label files": (["iemocap", "--root", str(tmp_path / "iemocap_no_labels"), "--out", out],
                                   "no label files"),
        "psc missing manifest": (["psc", "--root", str(tmp_path / "psc_no_ears"), "--out", out],
                                 "no holdout manifest for ears"),
        "psc root not a dir": (["psc", "--root", str(tmp_path / "a_file"), "--out", out], "not a directory"),
        "psc manifest not a file": (["psc", "--protocol", "manifest", "--root", str(empty), "--out", out],
                                    "is not a file"),
        "out is a file": (["psc", "--protocol", "manifest", "--root",
                           str(tmp_path / "psc_no_ears" / "paraspeechcaps_cuts_holdout-voxceleb.jsonl.gz"),
                           "--out", str(tmp_path / "a_file")], "a_file"),
    }


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    for name, (argv, phrase) in _bad_inputs(tmp_path).items():
        code = eval_sets.main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("data_prep.eval_sets: error: "), (name, captured.err)
        assert phrase in lines[0], (name, lines[0])
        assert "Traceback" not in captured.err and captured.out == "", name


def test_cli_module_entry_point_error_and_success(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "data_prep.eval_sets", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    bad = run("ravdess", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"data_prep.eval_sets: error: --root {tmp_path / 'nope'} does not exist"]
    write_wav(tmp_path / "r" / "Actor_01" / "03-01-01-01-01-01-01.wav", 0.1)
    good = run("ravdess", "--protocol", "original", "--root", str(tmp_path / "r"), "--out", str(tmp_path / "out"))
    assert good.returncode == 0 and "kept 1 cuts" in good.stdout, good.stderr


# ------------------------------------------------------------------------------------------------- labels


def test_zero_shot_prompts_match_the_labels():
    label_key, prompts = ZERO_SHOT_TASKS["iemocap_emotion"]
    assert label_key == "emotion"
    assert prompts[1] == ("A speaker in a excited tone.", "happy")
    assert {label for _, label in prompts} == set(eval_sets.IEMOCAP_EMOTIONS.values())
    _, prompts = ZERO_SHOT_TASKS["ravdess_emotion"]
    assert [label for _, label in prompts] == ["angry", "calm", "disgust", "fear", "happy", "sad", "surprised",
                                               "neutral"]
    assert set(eval_sets.RAVDESS_EMOTIONS.values()) == {label for _, label in prompts}
    assert set(eval_sets.RAVDESS_EMOTION_WORDS.values()) == {label for _, label in prompts}
    cremad_labels = {label for _, label in ZERO_SHOT_TASKS["cremad_emotion"][1]}
    assert cremad_labels == set(eval_sets.CREMAD_EMOTIONS.values())
    assert {eval_sets.CREMAD_EMOTIONS[c] for c in eval_sets.CREMAD_LETTERS.values()} == cremad_labels
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
