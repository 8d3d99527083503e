"""Lhotse MonoCut manifests of the paper's evaluation sets, built as the authors build them, each with a card.

    python -m data_prep.eval_sets {psc,cremad,iemocap,ravdess} --root DIR --out DIR [--protocol P]

Each dataset has the authors' protocol (the default) and a named alternative:

- ``psc``
  - ``holdout-test`` (authors'): ``DIR`` holds, for each source S of the PSC test split (voxceleb, expresso,
    ears), the holdout manifest ``*holdout-S.jsonl[.gz]`` and the test manifest ``*test-S.jsonl[.gz]``
    (any prefix, e.g. ``paraspeechcaps_cuts_holdout-voxceleb.jsonl.gz``). Kept: the holdout cuts whose first
    audio source path (``recording.sources[0].source``, compared as a string) is one of the test cuts',
    in holdout order, voxceleb then expresso then ears; then the caption filter below.
  - ``manifest``: ``DIR`` is one manifest file, already the test set; only the caption filter is applied.

  Caption filter (the authors' FCaps selection): 1 or 2 global captions, each >= 32 characters; no
  fine-grained caption mentioning several speakers; fine-grained captions without newlines, 128-768
  characters and without negations are kept, sorted by length; a cut left without one is dropped. All kept
  captions stay in the manifest; retrieval scores the first global and the last fine-grained one.
- ``cremad``
  - ``test`` (authors'): ``DIR/test/<clip>.wav`` with ``DIR/test/<clip>.json`` holding ``{"label": "A"}``
    (H, S, A, F, D or N). This is the test split of the X-ARES benchmark's CREMA-D packaging
    (``wds-audio-test*.tar`` unpacked). X-ARES's packaging draws it at random, without a fixed seed (15%
    of the clips rated with audio in ``finishedResponses.csv``), so the published archive, not a rule,
    defines it. Age and gender come from
    ``DIR/VideoDemographics.csv``; the speaker is the 4-digit actor id that starts the clip name.
  - ``all``: every ``DIR/**/AAAA_SSS_EEE_II.wav`` of the original release, emotion from the file name.
- ``iemocap``
  - ``dialog`` (authors'): ``DIR/Session{1..5}/dialog/EmoEvaluation/Ses*.txt`` summary lines
    ``[start - end]<TAB>TURN<TAB>emo<TAB>[V, A, D]``; each kept turn is cut from channel 0 of
    ``dialog/wav/<dialog>.wav`` at [start, end) s.
  - ``sentences``: the same turns, each the whole ``sentences/wav/<dialog>/<TURN>.wav`` file (IEMOCAP's
    own per-turn segmentation; a file with several channels is averaged when read). It differs from
    ``dialog`` in the audio heard (the per-turn file instead of the dialog recording's first channel) and
    in the segment edges, so its numbers are not the paper's.

  Both keep neu, hap, ang, sad and exc, with exc counted as happy (the paper's 4 classes); fru, sur,
  fea, dis, oth and xxx turns are dropped and counted.
- ``ravdess``
  - ``folds`` (authors'): ``DIR/fold_{0,1,2,3}/<clip>.wav`` with ``<clip>.json`` holding
    ``{"emotion": "fearful"}`` (the X-ARES benchmark's RAVDESS packaging, ``ravdess_fold_K_*.tar``
    unpacked); the set is all four folds together. Gender from the actor number that ends the clip name
    (odd male, even female).
  - ``original``: the audio-only speech files ``DIR/**/03-01-EE-II-SS-RR-AA.wav`` (modality, channel,
    emotion, intensity, statement, repetition, actor) of the original release.

Writes ``OUT/<name>_<protocol>_cuts.jsonl.gz`` and ``OUT/<name>_<protocol>_card.json``: the protocol, counts
per class of each label, the total duration, and ``cut_list_sha256``, a SHA-256 over the sorted cut list
(id, start and duration in ms, channel, labels; see `cut_list_sha256`) that two people can compare to confirm
they evaluated the same set whatever their audio paths. Audio sources are relative to ``--root`` (psc keeps
its input's sources). Labels live in ``supervisions[0].custom`` as the paper's zero-shot prompts name them
(clsp_jax.evals.prompts): ``emotion`` ("fear", not "fearful"), ``emotion_code`` (the dataset's own code),
``gender``, ``age`` and ``age_bin`` (CREMA-D). Inputs that cannot be used are skipped and counted by reason
in the card; a user error (missing directory or label files, unknown name or option) is one line on stderr
and exit code 2.
"""

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import soundfile

from clsp_jax import cli
from clsp_jax.data import manifests
from data_prep import manifest_writer

SAMPLE_RATE = 16000
AGE_BINS = ("<20", "20-39", "40-59", ">=60")

RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fear",
                    "07": "disgust", "08": "surprised"}
# The X-ARES packaging labels RAVDESS clips with the dataset's own emotion words.
RAVDESS_EMOTION_WORDS = {"neutral": "neutral", "calm": "calm", "happy": "happy", "sad": "sad", "angry": "angry",
                         "fearful": "fear", "disgust": "disgust", "surprised": "surprised"}
RAVDESS_FOLDS = (0, 1, 2, 3)
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
RAVDESS_INTENSITIES = {"01": "normal", "02": "strong"}
CREMAD_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
# X-ARES's CREMA-D labels: the first letter of the emotion (the displayed emotion of finishedResponses.csv).
CREMAD_LETTERS = {"A": "ANG", "D": "DIS", "F": "FEA", "H": "HAP", "N": "NEU", "S": "SAD"}
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
PSC_SOURCES = ("voxceleb", "expresso", "ears")
PSC_GLOBAL_CAPTION_COUNTS = (1, 2)

_RAVDESS_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
_CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_IEMOCAP_LABEL = re.compile(
    r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\t(\S+)\t(\w+)\t\[\s*([\d.]+),\s*([\d.]+),\s*([\d.]+)\s*\]\s*$")
_IEMOCAP_TRANSCRIPT = re.compile(r"^(\S+) \[[\d.]+-[\d.]+\]:\s?(.*)$")

log = logging.getLogger("eval_sets")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a set is built: ``paper`` is True for the authors' selection (numbers comparable with the paper)."""

    description: str
    paper: bool


PROTOCOLS = {
    "psc": {
        "holdout-test": Protocol("PSC holdout cuts whose audio source is in the PSC test split (voxceleb, "
                                 "expresso, ears), then the authors' caption filter", True),
        "manifest": Protocol("one given manifest, then the authors' caption filter", False),
    },
    "cremad": {
        "test": Protocol("CREMA-D test split of the X-ARES packaging (test/<clip>.wav + .json), labels from "
                         "the .json, age from VideoDemographics.csv", True),
        "all": Protocol("every CREMA-D clip of the original release, labels from the file names", False),
    },
    "iemocap": {
        "dialog": Protocol("Sessions 1-5, channel 0 of dialog/wav/<dialog>.wav cut at the EmoEvaluation times; "
                           "neu/hap/ang/sad with exc as happy", True),
        "sentences": Protocol("Sessions 1-5, the per-turn sentences/wav files; neu/hap/ang/sad with exc as "
                              "happy", False),
    },
    "ravdess": {
        "folds": Protocol("RAVDESS folds 0-3 of the X-ARES packaging together (fold_K/<clip>.wav + .json), "
                          "emotion from the .json, gender from the actor number", True),
        "original": Protocol("RAVDESS audio-only speech files of the original release, labels from the file "
                             "names", False),
    },
}
DEFAULT_PROTOCOL = {name: next(p for p, v in protocols.items() if v.paper) for name, protocols in PROTOCOLS.items()}
# The labels a card counts per class, and that enter the cut-list checksum.
LABEL_KEYS = {"psc": ("psc_source", "gender"), "cremad": ("emotion", "gender", "age_bin"),
              "iemocap": ("emotion", "gender"), "ravdess": ("emotion", "gender")}


@dataclasses.dataclass
class EvalSet:
    """Cuts in output order; per reason, how many inputs were skipped and how many kept cuts lack a label."""

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


def _audio_info(path: Path) -> tuple[object | None, str]:
    """(soundfile's info, "") for a usable audio file, or (None, why it is not usable)."""
    if not path.is_file():
        return None, "missing_audio"
    try:
        info = soundfile.info(path)
    except RuntimeError:  # soundfile's error (LibsndfileError) for files libsndfile cannot parse
        return None, "unreadable_audio"
    return (info, "") if info.frames > 0 else (None, "empty_audio")


def _audio_cut(result: EvalSet, cut_id: str, path: Path, root: Path, *, text: str, speaker: str | None,
               gender: str | None, custom: dict) -> bool:
    """Append the cut of a whole audio file and return True, or count why it cannot be used."""
    info, reason = _audio_info(path)
    if info is None:
        result.skip(reason, path)
        return False
    rec = manifest_writer.recording(cut_id, path.relative_to(root).as_posix(), info.frames, info.samplerate,
                                    target_rate=SAMPLE_RATE, num_channels=info.channels)
    if gender is not None:
        custom = {**custom, "gender": gender}
    result.cuts.append(manifest_writer.mono_cut(cut_id, rec, text=text, speaker=speaker, gender=gender,
                                                custom=custom))
    return True


def _labelled_audio(result: EvalSet, folder: Path) -> list[tuple[Path, dict]]:
    """(audio path, parsed label file) for each ``<clip>.json`` of ``folder``, in name order; audio files
    without a label file and unreadable label files are counted."""
    labels = sorted(folder.glob("*.json"))
    stems = {p.stem for p in labels}
    for wav in sorted(folder.glob("*.wav")):
        if wav.stem not in stems:
            result.skip("audio_without_label_file", wav)
    pairs = []
    for path in labels:
        try:
            item = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            result.skip("bad_label_file", f"{path}: {e}")
            continue
        if not isinstance(item, dict):
            result.skip("bad_label_file", f"{path}: not a JSON object")
            continue
        pairs.append((path.with_suffix(".wav"), item))
    return pairs


def _ravdess_name_labels(stem: str) -> dict | None:
    """Labels coded in a RAVDESS file name (None if the name does not end in the 7 codes)."""
    m = _RAVDESS_NAME.search(stem)
    if not m:
        return None
    modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
    if (emotion not in RAVDESS_EMOTIONS or intensity not in RAVDESS_INTENSITIES
            or statement not in RAVDESS_STATEMENTS or not 1 <= int(actor) <= 24):
        return None
    return {"modality": modality, "vocal_channel": channel, "emotion": RAVDESS_EMOTIONS[emotion],
            "emotion_code": emotion, "intensity": RAVDESS_INTENSITIES[intensity], "statement": statement,
            "repetition": int(repetition), "actor": int(actor)}


def _ravdess_gender(actor: int) -> str:
    return "male" if actor % 2 else "female"


def ravdess_original(root: Path) -> EvalSet:
    """RAVDESS audio-only speech files of the original release: 8 emotions, gender from the actor number."""
    result = EvalSet()
    for path in sorted(root.rglob("*.wav")):
        if not re.fullmatch(r"\d\d-\d\d-\d\d-\d\d-\d\d-\d\d-\d\d", path.stem):
            result.skip("unparseable_name", path)
            continue
        labels = _ravdess_name_labels(path.stem)
        if labels is None:
            result.skip("unknown_code", path)
            continue
        if (labels.pop("modality"), labels.pop("vocal_channel")) != ("03", "01"):
            result.skip("not_audio_only_speech", path)
            continue
        _audio_cut(result, f"ravdess-{path.stem}", path, root, text=RAVDESS_STATEMENTS[labels["statement"]],
                   speaker=f"ravdess-actor{labels['actor']:02d}", gender=_ravdess_gender(labels["actor"]),
                   custom=labels)
    return result


def ravdess_folds(root: Path) -> EvalSet:
    """RAVDESS as the X-ARES folds 0-3 (all four together): emotion from each clip's .json, gender from the
    actor number that ends the clip name."""
    missing = [f"fold_{k}" for k in RAVDESS_FOLDS if not (root / f"fold_{k}").is_dir()]
    if missing:
        raise ValueError(f"ravdess --protocol folds: {', '.join(missing)} not found under {root} (unpack X-ARES's "
                         "ravdess_fold_K_*.tar into DIR/fold_K, or use --protocol original)")
    result, seen = EvalSet(), set()
    for fold in RAVDESS_FOLDS:
        for wav, item in _labelled_audio(result, root / f"fold_{fold}"):
            word = item.get("emotion")
            if word not in RAVDESS_EMOTION_WORDS:
                result.skip("unknown_label", f"{wav.with_suffix('.json')}: emotion {word!r}")
                continue
            actor_field = wav.stem.rsplit("-", 1)[-1]
            if not actor_field.isdigit():
                result.skip("unparseable_name", wav)
                continue
            cut_id = f"ravdess-{wav.stem}"
            if cut_id in seen:
                result.skip("duplicate_clip", wav)
                continue
            actor = int(actor_field)
            custom = {"emotion": RAVDESS_EMOTION_WORDS[word], "emotion_label": word, "fold": fold, "actor": actor}
            named = _ravdess_name_labels(wav.stem)
            text = ""
            if named is not None:
                for key in ("emotion_code", "intensity", "statement", "repetition"):
                    custom[key] = named[key]
                text = RAVDESS_STATEMENTS[named["statement"]]
            if _audio_cut(result, cut_id, wav, root, text=text, speaker=f"ravdess-actor{actor:02d}",
                          gender=_ravdess_gender(actor), custom=custom):
                seen.add(cut_id)
                if named is not None and named["emotion"] != custom["emotion"]:
                    result.incomplete["label_differs_from_file_name"] += 1
    return result


def _find_demographics(root: Path) -> Path:
    found = [root / "VideoDemographics.csv"] if (root / "VideoDemographics.csv").is_file() else sorted(
        root.rglob("VideoDemographics.csv"))
    if not found:
        raise ValueError(f"cremad: VideoDemographics.csv not found under {root} (it gives the age and gender "
                         "labels; it ships with the CREMA-D release)")
    return found[0]


def _cremad_demographics(root: Path, result: EvalSet) -> dict[str, tuple[int, str]]:
    """ActorID -> (age, gender) from VideoDemographics.csv; bad rows are counted."""
    actors = {}
    with open(_find_demographics(root), newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            try:
                actors[row["ActorID"].strip()] = (int(row["Age"]), row["Sex"].strip().lower())
            except (KeyError, TypeError, ValueError, AttributeError):
                result.skip("bad_demographics_row", row)
    return actors


def _cremad_cut(result: EvalSet, actors: dict, wav: Path, root: Path, actor: str, code: str,
                custom: dict) -> None:
    custom = {"emotion": CREMAD_EMOTIONS[code], "emotion_code": code, **custom}
    gender = None
    if actor in actors:
        age, sex = actors[actor]
        custom.update(age=age, age_bin=age_bin(age))
        gender = sex if sex in ("male", "female") else None
    sentence = custom.get("sentence")
    kept = _audio_cut(result, f"cremad-{wav.stem}", wav, root, text=CREMAD_SENTENCES.get(sentence, ""),
                      speaker=f"cremad-{actor}", gender=gender, custom=custom)
    if kept and actor not in actors:
        result.incomplete["no_demographics"] += 1


def cremad_all(root: Path) -> EvalSet:
    """CREMA-D, every clip of the original release: 6 emotions from the file names; age, age bin and gender
    from the demographics table."""
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
        _cremad_cut(result, actors, path, root, actor, emotion,
                    {"intensity": CREMAD_INTENSITIES[intensity], "sentence": sentence})
    return result


def cremad_test(root: Path) -> EvalSet:
    """CREMA-D's X-ARES test split: emotion from each clip's .json label, speaker from the clip name."""
    folder = root / "test"
    if not folder.is_dir():
        raise ValueError(f"cremad --protocol test: {folder} not found (unpack the X-ARES CREMA-D test archives "
                         "wds-audio-test*.tar into it, or use --protocol all)")
    if not any(folder.glob("*.json")):
        raise ValueError(f"cremad --protocol test: no label files (<clip>.json) in {folder}")
    result = EvalSet()
    actors = _cremad_demographics(root, result)
    for wav, item in _labelled_audio(result, folder):
        letter = item.get("label")
        if letter not in CREMAD_LETTERS:
            result.skip("unknown_label", f"{wav.with_suffix('.json')}: label {letter!r}")
            continue
        actor = wav.stem.split("_", 1)[0]
        if not re.fullmatch(r"\d{4}", actor):
            result.skip("unparseable_name", wav)
            continue
        custom = {}
        m = _CREMAD_NAME.match(wav.stem)
        if m and m[2] in CREMAD_SENTENCES and m[4] in CREMAD_INTENSITIES:
            custom = {"intensity": CREMAD_INTENSITIES[m[4]], "sentence": m[2]}
        n_before = len(result.cuts)
        _cremad_cut(result, actors, wav, root, actor, CREMAD_LETTERS[letter], custom)
        if len(result.cuts) > n_before and m and m[3] != CREMAD_LETTERS[letter]:
            result.incomplete["label_differs_from_file_name"] += 1
    return result


def _iemocap_transcripts(session: Path) -> dict[str, str]:
    texts = {}
    for path in sorted((session / "dialog" / "transcriptions").glob("*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _IEMOCAP_TRANSCRIPT.match(line.strip())
            if m:
                texts[m.group(1)] = m.group(2).strip()
    return texts


def _iemocap_turns(root: Path, result: EvalSet):
    """Yields (session dir, session number, turn, code, start, end, (V, A, D)) for each kept summary line."""
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir() and re.fullmatch(r"Session\d+", p.name))
    if not sessions:
        raise ValueError(f"iemocap: no Session1..Session5 directories under {root}")
    # Ses*.txt as the authors glob it: also leaves out macOS "._Ses..." resource files found in some copies.
    label_files = {s: sorted((s / "dialog" / "EmoEvaluation").glob("Ses*.txt")) for s in sessions}
    if not any(label_files.values()):
        raise ValueError(f"iemocap: no label files (Session*/dialog/EmoEvaluation/Ses*.txt) under {root}")
    seen = set()
    for session in sessions:
        for label_file in label_files[session]:
            for line in label_file.read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.startswith("["):
                    continue  # headers and the per-annotator lines
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
                yield (session, int(session.name.removeprefix("Session")), turn, code, float(start), float(end),
                       (float(valence), float(arousal), float(dominance)))


def _iemocap(root: Path, protocol: str) -> EvalSet:
    result = EvalSet()
    texts, dialog_info = {}, {}
    for session, number, turn, code, start, end, (v, a, d) in _iemocap_turns(root, result):
        if session not in texts:
            texts[session] = _iemocap_transcripts(session)
        dialog = turn.rsplit("_", 1)[0]
        sex = turn.rsplit("_", 1)[-1][:1]
        gender = {"F": "female", "M": "male"}.get(sex)
        custom = {"emotion": IEMOCAP_EMOTIONS[code], "emotion_code": code, "valence": v, "arousal": a,
                  "dominance": d, "session": number, "dialog": dialog, "dialog_start": start, "dialog_end": end}
        speaker = f"iemocap-{turn[:5]}{sex}" if gender else None
        text = texts[session].get(turn, "")
        if protocol == "sentences":
            path = session / "sentences" / "wav" / dialog / f"{turn}.wav"
            _audio_cut(result, f"iemocap-{turn}", path, root, text=text, speaker=speaker, gender=gender,
                       custom=custom)
            continue
        path = session / "dialog" / "wav" / f"{dialog}.wav"
        if path not in dialog_info:
            dialog_info[path] = _audio_info(path)
        info, reason = dialog_info[path]
        if info is None:
            result.skip(reason, f"{turn}: {path}")
            continue
        if end <= start:
            result.skip("empty_segment", turn)
            continue
        rec = manifest_writer.recording(dialog, path.relative_to(root).as_posix(), info.frames, info.samplerate,
                                        target_rate=SAMPLE_RATE, num_channels=info.channels)
        try:
            cut = manifest_writer.mono_cut(f"iemocap-{turn}", rec, start=start, duration=end - start, text=text,
                                           speaker=speaker, gender=gender,
                                           custom={**custom, "gender": gender} if gender else custom)
        except ValueError:
            result.skip("segment_outside_audio", f"{turn}: [{start}, {end}] s, {path} has {rec['duration']} s")
            continue
        result.cuts.append(cut)
    return result


def iemocap_dialog(root: Path) -> EvalSet:
    """IEMOCAP, the authors' way: channel 0 of each dialog recording cut at the EmoEvaluation turn times."""
    return _iemocap(root, "dialog")


def iemocap_sentences(root: Path) -> EvalSet:
    """IEMOCAP from the per-turn sentences/wav files (same turns and labels as `iemocap_dialog`)."""
    return _iemocap(root, "sentences")


def _psc_filter(record: dict) -> dict:
    """The authors' caption filter of one cut -> the cut with its kept captions; raises ClipRejected."""
    clip = manifests.parse_cut(record)
    if len(clip.global_captions) not in PSC_GLOBAL_CAPTION_COUNTS:
        # The authors assert this; a cut outside it would stop their run, here it is dropped and counted.
        raise manifests.ClipRejected("global_caption_count", f"{len(clip.global_captions)} global captions")
    clip = manifests.select_captions(clip, manifests.CaptionRules())
    if not clip.finegrained_captions:
        raise manifests.ClipRejected("no_finegrained_captions")
    sup = dict(record["supervisions"][0])
    custom = dict(sup.get("custom") or {})
    key = "finegrained_captions" if "finegrained_captions" in custom else "long_captions"
    custom[key] = list(clip.finegrained_captions)
    sup["custom"] = custom
    return {**record, "supervisions": [sup, *record["supervisions"][1:]]}


def _psc_keep(result: EvalSet, records, where: str, source: str | None) -> None:
    for line_no, record in records:
        if isinstance(record, manifests.ClipRejected):
            result.skip(record.reason, f"{where}:{line_no}")
            continue
        try:
            cut = _psc_filter(record)
        except manifests.ClipRejected as e:
            result.skip(e.reason, f"{where}:{line_no} ({record['id']})")
            continue
        if source is not None:
            sup = cut["supervisions"][0]
            sup["custom"]["psc_source"] = source
        result.cuts.append(cut)


def _first_source(record: dict) -> str | None:
    sources = (record.get("recording") or {}).get("sources") or []
    return sources[0].get("source") if sources and isinstance(sources[0], dict) else None


def _psc_manifest(root: Path, split: str, source: str) -> Path:
    found = [p for p in sorted(root.iterdir())
             if p.name.endswith((f"{split}-{source}.jsonl", f"{split}-{source}.jsonl.gz"))]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ValueError(f"psc: {what} {split} manifest for {source} in {root} (want exactly one "
                         f"*{split}-{source}.jsonl[.gz])")
    return found[0]


def psc_holdout_test(root: Path) -> EvalSet:
    """PSC test as the authors build it: holdout cuts whose audio is in the test split, then the caption filter."""
    if not root.is_dir():
        raise ValueError(f"psc --protocol holdout-test: --root must be the directory of the PSC holdout and test "
                         f"manifests, {root} is not a directory")
    found = {s: (_psc_manifest(root, "holdout", s), _psc_manifest(root, "test", s)) for s in PSC_SOURCES}
    result = EvalSet()
    for source, (holdout, test) in found.items():
        test_sources = {_first_source(r) for _, r in manifests.iter_manifest(test) if isinstance(r, dict)}
        test_sources.discard(None)
        in_test = []
        for line_no, record in manifests.iter_manifest(holdout):
            if isinstance(record, dict) and _first_source(record) not in test_sources:
                result.skipped["holdout_audio_not_in_test_split"] += 1  # most of the holdout: counted, not logged
                continue
            in_test.append((line_no, record))
        _psc_keep(result, in_test, holdout.name, source)
    return result


def psc_manifest(path: Path) -> EvalSet:
    """One manifest taken as the test set; only the caption filter is applied."""
    if not path.is_file():
        raise ValueError(f"psc --protocol manifest: --root must be a manifest file, {path} is not a file")
    result = EvalSet()
    _psc_keep(result, manifests.iter_manifest(path), path.name, None)
    return result


BUILDERS = {
    ("psc", "holdout-test"): psc_holdout_test, ("psc", "manifest"): psc_manifest,
    ("cremad", "test"): cremad_test, ("cremad", "all"): cremad_all,
    ("iemocap", "dialog"): iemocap_dialog, ("iemocap", "sentences"): iemocap_sentences,
    ("ravdess", "folds"): ravdess_folds, ("ravdess", "original"): ravdess_original,
}


def _label_value(cut: dict, key: str):
    sup = cut["supervisions"][0]
    return (sup.get("custom") or {}).get(key, sup.get(key))


def cut_list_sha256(name: str, cuts: list[dict]) -> str:
    """SHA-256 (hex) of the cut list, independent of audio paths and of order: one line per cut, sorted,
    ``id<TAB>start_ms<TAB>duration_ms<TAB>channel<TAB>labels`` (labels: JSON of the set's label keys; for psc
    also the first global and the last fine-grained caption, the ones retrieval scores)."""
    lines = []
    for cut in cuts:
        labels = {k: _label_value(cut, k) for k in LABEL_KEYS[name]}
        if name == "psc":
            clip = manifests.parse_cut(cut)
            labels["captions"] = [clip.global_captions[0], clip.finegrained_captions[-1]]
        lines.append("\t".join([cut["id"], str(round(cut["start"] * 1000)), str(round(cut["duration"] * 1000)),
                                json.dumps(cut["channel"]), json.dumps(labels, sort_keys=True, ensure_ascii=False)]))
    return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()


def card(name: str, protocol: str, result: EvalSet) -> dict:
    """The set's card: protocol, counts per class, total duration, cut-list checksum, skipped inputs."""
    counts = {}
    for key in LABEL_KEYS[name]:
        c = collections.Counter(_label_value(cut, key) for cut in result.cuts)
        missing = c.pop(None, 0)
        counts[key] = dict(sorted(c.items()))
        if missing:
            counts[key]["(none)"] = missing
    return {
        "eval_set": name, "protocol": protocol, "protocol_description": PROTOCOLS[name][protocol].description,
        "paper_protocol": PROTOCOLS[name][protocol].paper, "num_cuts": len(result.cuts),
        "total_duration_s": round(sum(c["duration"] for c in result.cuts), 3), "counts": counts,
        "cut_list_sha256": cut_list_sha256(name, result.cuts),
        "skipped": dict(sorted(result.skipped.items())), "kept_without_label": dict(sorted(result.incomplete.items())),
    }


def build(name: str, root: str | Path, out: str | Path, protocol: str | None = None) -> tuple[Path, EvalSet]:
    """Make the ``name`` set by ``protocol`` (default: the authors') from ``root``; write
    ``out/<name>_<protocol>_cuts.jsonl.gz`` and its card ``out/<name>_<protocol>_card.json``.
    Raises ValueError for a user error (unknown name or protocol, missing inputs, nothing usable)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown eval set {name!r}; choose from {', '.join(sorted(PROTOCOLS))}")
    protocol = protocol or DEFAULT_PROTOCOL[name]
    if protocol not in PROTOCOLS[name]:
        raise ValueError(f"{name} has no protocol {protocol!r}; choose from {', '.join(PROTOCOLS[name])}")
    root = Path(root)
    if not root.exists():
        raise ValueError(f"--root {root} does not exist")
    result = BUILDERS[name, protocol](root)
    if not result.cuts:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(result.skipped.items())) or "no inputs found"
        raise ValueError(f"{name} --protocol {protocol}: no usable clips under {root} ({reasons})")
    out = Path(out)
    path = out / f"{name}_{protocol}_cuts.jsonl.gz"
    manifest_writer.write_jsonl_gz(path, result.cuts)
    (out / f"{name}_{protocol}_card.json").write_text(json.dumps(card(name, protocol, result), indent=2,
                                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    return path, result


def summary(name: str, protocol: str, result: EvalSet) -> str:
    """The card in a few lines: counts per class, hours of audio, skipped inputs by reason."""
    info = card(name, protocol, result)
    lines = [f"kept {info['num_cuts']} cuts ({name}, protocol {protocol}"
             f"{', as the paper' if info['paper_protocol'] else ', not the paper protocol'})"]
    for key, counts in info["counts"].items():
        lines.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append(f"  {info['total_duration_s'] / 3600:.3f} h of audio; cut list sha256 {info['cut_list_sha256']}")
    lines += [f"skipped {n}: {reason}" for reason, n in info["skipped"].items()]
    lines += [f"kept {n} without a label: {reason}" for reason, n in info["kept_without_label"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module doc); returns the exit code (2 for a user error, printed as one line)."""
    parser = cli.ArgumentParser(prog="python -m data_prep.eval_sets", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(PROTOCOLS))
    parser.add_argument("--root", required=True, help="dataset root (psc: the directory of the holdout and test "
                                                      "manifests, or one manifest with --protocol manifest)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--protocol", help="how to build the set; default the authors': " + "; ".join(
        f"{n}: {'|'.join(p)}" for n, p in PROTOCOLS.items()))
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        protocol = args.protocol or DEFAULT_PROTOCOL[args.name]
        path, result = build(args.name, args.root, args.out, protocol)
    except (ValueError, OSError) as e:
        return cli.usage_error("data_prep.eval_sets", e)
    print(f"wrote {path}\n{summary(args.name, protocol, result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
