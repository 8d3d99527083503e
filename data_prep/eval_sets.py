"""Lhotse MonoCut manifests for the paper's evaluation sets, from their standard distribution layouts.

    python -m data_prep.eval_sets {ravdess,cremad,iemocap,psc} --root DIR --out DIR

- ``ravdess``: ``DIR/**/MM-VV-EE-II-SS-RR-AA.wav`` (modality, vocal channel, emotion, intensity, statement,
  repetition, actor); audio-only speech files are kept (song and video files are skipped and counted).
  Odd actors are male, even female. 48 kHz files get a Lhotse Resample-to-16-kHz transform.
- ``cremad``: ``DIR/**/AAAA_SSS_EEE_II.wav`` (actor, sentence, emotion, intensity) and
  ``DIR/**/VideoDemographics.csv`` (ActorID, Age, Sex, ...) for age, age bin and gender.
- ``iemocap``: ``DIR/Session{1..5}/dialog/EmoEvaluation/*.txt`` summary lines
  ``[start - end]<TAB>TURN<TAB>emo<TAB>[V, A, D]``, audio ``DIR/Session*/sentences/wav/<dialog>/<TURN>.wav``,
  transcripts from ``dialog/transcriptions/<dialog>.txt`` when present. neu/hap/ang/sad kept, exc merged
  into hap (the paper's 4 classes); other labels are dropped and counted.
- ``psc``: ``--root`` is an FCaps manifest; the output keeps, per clip, the first global caption and the
  last fine-grained one after the authors' caption selection (clsp_jax.data.manifests.select_captions, which
  sorts fine-grained captions by length), as their retrieval evaluation does.

Written to ``OUT/<name>_cuts.jsonl.gz``; audio sources are relative to ``--root``, the audio root for
readers (psc keeps the input's sources). Labels live in ``supervisions[0].custom`` and are what the paper's zero-shot
prompts predict (clsp_jax.evals.prompts): ``emotion`` is the word of the prompt "A speaker in a {emotion} tone."
(so "fear", not "fearful"), ``emotion_code`` the dataset's own code,
``gender`` "male"/"female" (also in the supervision's ``gender``), ``age`` and ``age_bin`` (CREMA-D).
Files that are missing, unreadable or have unparseable names are skipped, counted by reason and
reported; kept cuts that lack a label (a CREMA-D actor missing from the table) are counted as incomplete.
"""

import argparse
import collections
import csv
import dataclasses
import logging
import re
import sys
from pathlib import Path

import soundfile

from clsp_jax.data import manifests
from data_prep import manifest_writer

SAMPLE_RATE = 16000
AGE_BINS = ("<20", "20-39", "40-59", ">=60")

RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fear",
                    "07": "disgust", "08": "surprised"}
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
RAVDESS_INTENSITIES = {"01": "normal", "02": "strong"}
CREMAD_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
CREMAD_INTENSITIES = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
CREMAD_SENTENCES = {
    "IEO": "It's eleven o'clock.", "TIE": "That is exactly what happened.", "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.", "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.", "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.", "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.", "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
IEMOCAP_EMOTIONS = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}

_RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
_CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_IEMOCAP_LABEL = re.compile(
    r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\t(\S+)\t(\w+)\t\[\s*([\d.]+),\s*([\d.]+),\s*([\d.]+)\s*\]\s*$")
_IEMOCAP_TRANSCRIPT = re.compile(r"^(\S+) \[[\d.]+-[\d.]+\]:\s?(.*)$")

log = logging.getLogger("eval_sets")


@dataclasses.dataclass
class EvalSet:
    """Cuts in input order; per reason, how many inputs were skipped and how many kept cuts lack a label."""

    cuts: list[dict] = dataclasses.field(default_factory=list)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    incomplete: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, reason: str, what: object) -> None:
        if not self.skipped[reason]:
            log.warning("skipping %s (%s); further ones are only counted", what, reason)
        self.skipped[reason] += 1


def age_bin(age: int) -> str:
    """CREMA-D age bins of the paper: <20, 20-39, 40-59, >=60."""
    if age < 0:
        raise ValueError(f"age must be >= 0, got {age}")
    return AGE_BINS[0] if age < 20 else AGE_BINS[1] if age < 40 else AGE_BINS[2] if age < 60 else AGE_BINS[3]


def _audio_cut(result: EvalSet, cut_id: str, path: Path, root: Path, *, text: str, speaker: str | None,
               gender: str | None, custom: dict) -> bool:
    """Append the cut of a whole audio file and return True, or count why it cannot be used."""
    if not path.is_file():
        result.skip("missing_audio", path)
        return False
    try:
        info = soundfile.info(path)
    except RuntimeError as e:  # soundfile's error for files libsndfile cannot parse
        result.skip("unreadable_audio", f"{path}: {e}")
        return False
    if info.frames <= 0:
        result.skip("empty_audio", path)
        return False
    rec = manifest_writer.recording(cut_id, path.relative_to(root).as_posix(), info.frames, info.samplerate,
                                    target_rate=SAMPLE_RATE, num_channels=info.channels)
    if gender is not None:
        custom = {**custom, "gender": gender}
    result.cuts.append(manifest_writer.mono_cut(cut_id, rec, text=text, speaker=speaker, gender=gender,
                                                custom=custom))
    return True


def ravdess(root: Path) -> EvalSet:
    """RAVDESS audio-only speech: 8 emotions, gender from the actor number."""
    result = EvalSet()
    for path in sorted(root.rglob("*.wav")):
        m = _RAVDESS_NAME.match(path.stem)
        if not m:
            result.skip("unparseable_name", path)
            continue
        modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
        if modality != "03" or channel != "01":
            result.skip("not_audio_only_speech", path)
            continue
        if (emotion not in RAVDESS_EMOTIONS or intensity not in RAVDESS_INTENSITIES
                or statement not in RAVDESS_STATEMENTS or not 1 <= int(actor) <= 24):
            result.skip("unknown_code", path)
            continue
        custom = {"emotion": RAVDESS_EMOTIONS[emotion], "emotion_code": emotion,
                  "intensity": RAVDESS_INTENSITIES[intensity], "statement": statement,
                  "repetition": int(repetition), "actor": int(actor)}
        _audio_cut(result, f"ravdess-{path.stem}", path, root, text=RAVDESS_STATEMENTS[statement],
                   speaker=f"ravdess-actor{actor}", gender="male" if int(actor) % 2 else "female", custom=custom)
    return result


def _cremad_demographics(root: Path, result: EvalSet) -> dict[str, tuple[int, str]]:
    """ActorID -> (age, gender) from VideoDemographics.csv; bad rows are counted."""
    found = sorted(root.rglob("VideoDemographics.csv"))
    if not found:
        result.skip("missing_demographics_file", root / "VideoDemographics.csv")
        return {}
    actors = {}
    with open(found[0], newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            try:
                actors[row["ActorID"].strip()] = (int(row["Age"]), row["Sex"].strip().lower())
            except (KeyError, TypeError, ValueError):
                result.skip("bad_demographics_row", row)
    return actors


def cremad(root: Path) -> EvalSet:
    """CREMA-D: 6 emotions; age, age bin and gender from the demographics table."""
    result = EvalSet()
    actors = _cremad_demographics(root, result)
    for path in sorted(root.rglob("*.wav")):
        m = _CREMAD_NAME.match(path.stem)
        if not m:
            result.skip("unparseable_name", path)
            continue
        actor, sentence, emotion, intensity = m.groups()
        if emotion not in CREMAD_EMOTIONS or sentence not in CREMAD_SENTENCES or intensity not in CREMAD_INTENSITIES:
            result.skip("unknown_code", path)
            continue
        custom = {"emotion": CREMAD_EMOTIONS[emotion], "emotion_code": emotion,
                  "intensity": CREMAD_INTENSITIES[intensity], "sentence": sentence}
        gender = None
        if actor in actors:
            age, sex = actors[actor]
            custom.update(age=age, age_bin=age_bin(age))
            gender = sex if sex in ("male", "female") else None
        kept = _audio_cut(result, f"cremad-{path.stem}", path, root, text=CREMAD_SENTENCES[sentence],
                          speaker=f"cremad-{actor}", gender=gender, custom=custom)
        if kept and actor not in actors:
            result.incomplete["no_demographics"] += 1
    return result


def _iemocap_transcripts(session: Path) -> dict[str, str]:
    texts = {}
    for path in sorted((session / "dialog" / "transcriptions").glob("*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _IEMOCAP_TRANSCRIPT.match(line.strip())
            if m:
                texts[m.group(1)] = m.group(2).strip()
    return texts


def iemocap(root: Path) -> EvalSet:
    """IEMOCAP: 4 classes (neutral, happy incl. excited, angry, sad) from the turn-level evaluations."""
    result = EvalSet()
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir() and re.fullmatch(r"Session\d+", p.name))
    if not sessions:
        result.skip("no_session_dirs", root)
    seen = set()
    for session in sessions:
        session_number = int(session.name.removeprefix("Session"))
        texts = _iemocap_transcripts(session)
        for label_file in sorted((session / "dialog" / "EmoEvaluation").glob("*.txt")):
            for line in label_file.read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.startswith("["):
                    continue  # annotator lines and headers
                m = _IEMOCAP_LABEL.match(line)
                if not m:
                    result.skip("unparseable_label_line", f"{label_file}: {line!r}")
                    continue
                start, end, turn, code, valence, arousal, dominance = m.groups()
                if code not in IEMOCAP_EMOTIONS:
                    result.skip(f"dropped_label_{code}", turn)
                    continue
                if turn in seen:
                    result.skip("duplicate_turn", turn)
                    continue
                seen.add(turn)
                dialog = turn.rsplit("_", 1)[0]
                sex = turn.rsplit("_", 1)[-1][:1]
                gender = {"F": "female", "M": "male"}.get(sex)
                custom = {"emotion": IEMOCAP_EMOTIONS[code], "emotion_code": code,
                          "valence": float(valence), "arousal": float(arousal), "dominance": float(dominance),
                          "session": session_number, "dialog": dialog,
                          "dialog_start": float(start), "dialog_end": float(end)}
                path = session / "sentences" / "wav" / dialog / f"{turn}.wav"
                _audio_cut(result, f"iemocap-{turn}", path, root, text=texts.get(turn, ""),
                           speaker=f"iemocap-{turn[:5]}{sex}" if gender else None, gender=gender, custom=custom)
    return result


def psc(manifest_path: Path) -> EvalSet:
    """Retrieval test manifest: one global caption (the first) and one fine-grained (the last) per clip."""
    result = EvalSet()
    if not manifest_path.is_file():
        raise ValueError(f"psc: --root must be an FCaps manifest file, {manifest_path} is not a file")
    for line_no, record in manifests.iter_manifest(manifest_path):
        if isinstance(record, manifests.ClipRejected):
            result.skip(record.reason, f"{manifest_path}:{line_no}")
            continue
        try:
            clip = manifests.select_captions(manifests.parse_cut(record), manifests.CaptionRules())
        except manifests.ClipRejected as e:
            result.skip(e.reason, f"{manifest_path}:{line_no}")
            continue
        if not clip.global_captions or not clip.finegrained_captions:
            result.skip("needs_global_and_finegrained_caption", clip.id)
            continue
        sup = dict(record["supervisions"][0])
        globals_, fines = [clip.global_captions[0]], [clip.finegrained_captions[-1]]
        sup["custom"] = {**sup.get("custom", {}), "global_captions": globals_, "finegrained_captions": fines,
                         "short_captions": globals_, "long_captions": fines}
        result.cuts.append({**record, "supervisions": [sup, *record["supervisions"][1:]]})
    return result


BUILDERS = {"ravdess": ravdess, "cremad": cremad, "iemocap": iemocap, "psc": psc}


def build(name: str, root: str | Path, out: str | Path) -> tuple[Path, EvalSet]:
    """Make the ``name`` manifest from ``root`` and write it to ``out/<name>_cuts.jsonl.gz``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown eval set {name!r}; choose from {sorted(BUILDERS)}")
    root = Path(root)
    if not root.exists():
        raise ValueError(f"--root {root} does not exist")
    result = BUILDERS[name](root)
    path = Path(out) / f"{name}_cuts.jsonl.gz"
    manifest_writer.write_jsonl_gz(path, result.cuts)
    return path, result


def summary(result: EvalSet) -> str:
    """Counts of kept cuts, of each label, and of skipped inputs by reason."""
    lines = [f"kept {len(result.cuts)} cuts"]
    for key in ("emotion", "gender", "age_bin"):
        counts = collections.Counter(c["supervisions"][0].get("custom", {}).get(key) for c in result.cuts)
        counts.pop(None, None)
        if counts:
            lines.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    hours = sum(c["duration"] for c in result.cuts) / 3600
    lines.append(f"  {hours:.3f} h of audio")
    for reason, n in sorted(result.skipped.items()):
        lines.append(f"skipped {n}: {reason}")
    for reason, n in sorted(result.incomplete.items()):
        lines.append(f"kept {n} without a label: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--root", required=True, help="dataset root (psc: the FCaps manifest file)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path, result = build(args.name, args.root, args.out)
    except ValueError as e:
        sys.exit(f"eval_sets: {e}")
    print(f"wrote {path}\n{summary(result)}", flush=True)


if __name__ == "__main__":
    main()
