"""Leakage check (clsp_jax.evals.overlap): shared speakers, recordings, audio files and normalised transcripts
between training manifests and an evaluation manifest, on constructed overlaps and on disjoint sets."""

import gzip
import json

import pytest

from clsp_jax.evals import overlap
from data_prep import manifest_writer


def cut(cut_id: str, *, speaker: str, rec_id: str, source: str, text: str) -> dict:
    rec = manifest_writer.recording(rec_id, source, 16000, 16000)
    return manifest_writer.mono_cut(cut_id, rec, text=text, speaker=speaker)


EVAL = [
    cut("e-speaker", speaker="Spk7", rec_id="eval-r1", source="eval/1.wav", text="An evaluation sentence one."),
    cut("e-recording", speaker="spk8", rec_id="shared-rec", source="eval/2.wav", text="Evaluation sentence two."),
    cut("e-path", speaker="spk9", rec_id="eval-r3", source="./corpus/shared.wav", text="Sentence number three."),
    cut("e-text", speaker="spk10", rec_id="eval-r4", source="eval/4.wav",
        text="Kids are talking by the door."),
    cut("e-clean", speaker="spk11", rec_id="eval-r5", source="eval/5.wav", text="Nothing in common here."),
]
TRAIN = [
    cut("t-speaker", speaker=" spk7 ", rec_id="train-r1", source="train/1.wav", text="Training words."),
    cut("t-recording", speaker="t2", rec_id="shared-rec", source="train/2.wav", text="More training words."),
    cut("t-path", speaker="t3", rec_id="train-r3", source="corpus/shared.wav", text="Other training words."),
    cut("t-text", speaker="t4", rec_id="train-r4", source="train/4.wav", text="KIDS are talking, by the door!!"),
    cut("t-text-again", speaker="t5", rec_id="train-r5", source="train/5.wav", text="kids are talking by the door"),
    cut("t-other", speaker="t6", rec_id="train-r6", source="train/6.wav", text="Kids are talking by the doors."),
]


def test_constructed_overlap_is_found_kind_by_kind():
    found = overlap.find_overlap(TRAIN, EVAL)
    assert (found.num_train_cuts, found.num_eval_cuts) == (6, 5)
    assert found.shared["speakers"] == {"spk7": (["e-speaker"], ["t-speaker"])}
    assert found.shared["recordings"] == {"shared-rec": (["e-recording"], ["t-recording"])}
    assert found.shared["audio_paths"] == {"corpus/shared.wav": (["e-path"], ["t-path"])}
    assert found.shared["transcripts"] == {"kidsaretalkingbythedoor": (["e-text"], ["t-text", "t-text-again"])}
    assert found.shared["audio_hashes"] == {} and not found.hashed
    assert found.eval_cuts_affected() == {"e-speaker", "e-recording", "e-path", "e-text"}
    assert found.eval_cuts_affected("transcripts") == {"e-text"} and not found.clean

    summary = overlap.overlap_summary(found, train_manifests=["train.jsonl.gz"], eval_manifest="eval.jsonl.gz")
    assert summary["checked"] is True and summary["clean"] is False and summary["eval_cuts_affected"] == 4
    assert "audio_hashes" not in summary["kinds"]  # not compared without audio roots
    assert summary["kinds"]["transcripts"] == {
        "shared": 1, "eval_cuts": 1,
        "examples": [{"key": "kidsaretalkingbythedoor", "eval_cuts": ["e-text"],
                      "train_cuts": ["t-text", "t-text-again"]}]}
    assert json.loads(json.dumps(summary)) == summary
    line = overlap.summary_line(summary)
    assert line.startswith("overlap with training data: 4 of 5 eval cuts share ") and "speakers 1 (1 eval cuts)" in line


def test_disjoint_sets_share_nothing():
    train = [t for t in TRAIN if t["id"] == "t-other"] + [
        cut("t-x", speaker="someone", rec_id="x", source="train/x.wav", text="Entirely different text.")]
    found = overlap.find_overlap(train, EVAL)
    assert found.clean and found.eval_cuts_affected() == set()
    assert all(not v for v in found.shared.values())
    summary = overlap.overlap_summary(found)
    assert summary["clean"] is True and all(v["shared"] == 0 for v in summary["kinds"].values())
    assert overlap.summary_line(summary) == "overlap with training data: none (5 eval cuts against 2 training cuts)"


def test_normalised_transcripts_and_empty_keys():
    assert overlap.normalise_transcript("Don't — STOP,  now!\n") == overlap.normalise_transcript("dont stop now")
    # NFKC folds full-width letters and the numero sign; spaces go
    assert overlap.normalise_transcript("Ｃａｆé №5") == "caféno5"
    assert overlap.normalise_transcript("door") != overlap.normalise_transcript("doors")
    blank = cut("b", speaker="", rec_id="r", source="a.wav", text=" ... ")
    assert overlap.cut_keys(blank) == {"speakers": set(), "recordings": {"r"}, "audio_paths": {"a.wav"},
                                       "audio_hashes": set(), "transcripts": set()}
    assert overlap.find_overlap([blank], [dict(blank, id="b2")]).shared["transcripts"] == {}


def write_manifest(path, records, extra_lines=()):
    manifest_writer.write_jsonl_gz(path, records)
    with gzip.open(path, "at") as f:
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_manifest_files_and_audio_content(tmp_path, monkeypatch):
    eval_root, train_root = tmp_path / "eval_audio", tmp_path / "train_audio"
    for root, name, data in ((eval_root, "a.wav", b"same bytes"), (eval_root, "b.wav", b"eval only!"),
                             (train_root, "copy/of_a.wav", b"same bytes"),  # same content, other path
                             (train_root, "same_size.wav", b"diff bytes"),  # same size as a.wav, other bytes
                             (train_root, "bigger.wav", b"a different length")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    eval_m = write_manifest(tmp_path / "eval.jsonl.gz", [
        cut("ea", speaker="e1", rec_id="ea", source="a.wav", text="first"),
        cut("eb", speaker="e2", rec_id="eb", source="b.wav", text="second")])
    train_m = write_manifest(tmp_path / "train.jsonl.gz", [
        cut("tc", speaker="t1", rec_id="tc", source="copy/of_a.wav", text="third"),
        cut("ts", speaker="t2", rec_id="ts", source="same_size.wav", text="fourth"),
        cut("tb", speaker="t3", rec_id="tb", source="bigger.wav", text="fifth"),
        cut("tm", speaker="t4", rec_id="tm", source="missing.wav", text="sixth")], extra_lines=["{not json"])

    hashed = []
    real_hash = overlap._FileHasher._hash
    monkeypatch.setattr(overlap._FileHasher, "_hash", lambda self, p: hashed.append(p.name) or real_hash(self, p))
    found, skipped = overlap.check_manifests([train_m], eval_m, train_audio_root=train_root,
                                             eval_audio_root=eval_root)
    assert found.hashed and skipped == {"not_json": 1}
    assert list(found.shared["audio_hashes"].values()) == [(["ea"], ["tc"])]
    assert found.eval_cuts_affected() == {"ea"}
    assert sorted(hashed) == ["a.wav", "b.wav", "of_a.wav", "same_size.wav"]  # bigger.wav is never read
    assert overlap.overlap_summary(found)["kinds"]["audio_hashes"]["shared"] == 1

    found, _ = overlap.check_manifests([train_m], eval_m)  # without audio roots: paths only
    assert found.clean and not found.hashed
    with pytest.raises(ValueError, match="nope.jsonl.gz does not exist"):
        overlap.check_manifests([tmp_path / "nope.jsonl.gz"], eval_m)
