"""Leakage check: what an evaluation set shares with the training data.

These keys are compared between every training cut and every evaluation cut (Lhotse MonoCut records,
see clsp_jax.data.manifests):

- ``speakers``: ``supervisions[*].speaker``, stripped and lower-cased. Speaker ids are only comparable within
  one corpus's naming (PSC holdout against PSC train, say); a match across corpora means the same string.
- ``recordings``: ``recording.id``.
- ``audio_paths``: every ``recording.sources[*].source``, as a POSIX path without a leading ``./``. The same
  file named from two different audio roots is not found this way; ``audio_hashes`` finds it.
- ``audio_hashes`` (only when audio roots are given): SHA-256 of the bytes of each source file. Only training
  files whose size equals that of some evaluation file are read, so the check costs one ``stat`` per training
  file plus a read of the few candidates.
- ``transcripts``: ``supervisions[*].text`` after `normalise_transcript` (Unicode NFKC, lower case, every
  punctuation mark, symbol and whitespace character removed), so "Kids are talking, by the door." and
  "kids are talking by the door" match. Empty normalised texts are ignored.

The evaluation manifest is indexed in memory; training manifests are streamed, so their size does not matter.
`find_overlap` is the pure function; `check_manifests` reads files; `overlap_summary` is the JSON block that
an evaluation report carries (``checked``, counts and examples per kind).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from clsp_jax.data import manifests

KINDS = ("speakers", "recordings", "audio_paths", "audio_hashes", "transcripts")


def normalise_transcript(text: str) -> str:
    """Lower case, NFKC, and no punctuation (Unicode P*), symbols (S*) or whitespace: the text's letters and
    digits only."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PSZC")


def _audio_path(source: str) -> str:
    path = source.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def cut_keys(record: dict) -> dict[str, set[str]]:
    """The comparison keys of one MonoCut record, by kind (``audio_hashes`` is filled by `check_manifests`)."""
    supervisions = [s for s in record.get("supervisions") or [] if isinstance(s, dict)]
    recording = record.get("recording") if isinstance(record.get("recording"), dict) else {}
    keys = {
        "speakers": {str(s["speaker"]).strip().lower() for s in supervisions if s.get("speaker")},
        "recordings": {str(recording["id"])} if recording.get("id") else set(),
        "audio_paths": {_audio_path(s["source"]) for s in recording.get("sources") or []
                        if isinstance(s, dict) and isinstance(s.get("source"), str) and s["source"]},
        "audio_hashes": set(),
        "transcripts": {normalise_transcript(s["text"]) for s in supervisions if isinstance(s.get("text"), str)},
    }
    keys["speakers"].discard("")
    keys["transcripts"].discard("")
    return keys


@dataclasses.dataclass
class Overlap:
    """What an evaluation set shares with training data.

    Attributes:
      num_train_cuts, num_eval_cuts: records compared.
      shared: kind -> key -> (sorted eval cut ids holding it, up to `max_train_ids` training cut ids).
      hashed: whether audio content was compared.
    """

    num_train_cuts: int = 0
    num_eval_cuts: int = 0
    shared: dict[str, dict[str, tuple[list[str], list[str]]]] = dataclasses.field(
        default_factory=lambda: {k: {} for k in KINDS})
    hashed: bool = False

    def eval_cuts_affected(self, kind: str | None = None) -> set[str]:
        """Ids of evaluation cuts sharing a key of ``kind`` (any kind when None) with the training data."""
        kinds = KINDS if kind is None else (kind,)
        return {i for k in kinds for eval_ids, _ in self.shared[k].values() for i in eval_ids}

    @property
    def clean(self) -> bool:
        return not any(self.shared.values())


def find_overlap(train_records: Iterable[dict], eval_records: Iterable[dict], *, max_train_ids: int = 3,
                 content_key: Callable[[dict, str], set[str]] | None = None) -> Overlap:
    """Keys that an evaluation cut shares with a training cut, by kind.

    Pure apart from ``content_key(record, side)`` (side "train" or "eval"), which, when given, returns the
    record's ``audio_hashes`` keys (`check_manifests` passes one that hashes files). Records that are not
    dicts are skipped.
    """
    index = {k: collections.defaultdict(list) for k in KINDS}
    result = Overlap(hashed=content_key is not None)
    for record in eval_records:
        if not isinstance(record, dict):
            continue
        result.num_eval_cuts += 1
        for kind, keys in _keys(record, "eval", content_key).items():
            for key in keys:
                index[kind][key].append(str(record.get("id")))
    for record in train_records:
        if not isinstance(record, dict):
            continue
        result.num_train_cuts += 1
        for kind, keys in _keys(record, "train", content_key).items():
            for key in keys:
                if key not in index[kind]:
                    continue
                eval_ids, train_ids = result.shared[kind].setdefault(key, (sorted(set(index[kind][key])), []))
                if len(train_ids) < max_train_ids:
                    train_ids.append(str(record.get("id")))
    return result


def _keys(record: dict, side: str, content_key) -> dict[str, set[str]]:
    keys = cut_keys(record)
    if content_key is not None:
        keys["audio_hashes"] = content_key(record, side)
    return keys


class _FileHasher:
    """content_key for `find_overlap`: SHA-256 of each plain-file source (tar members are not hashed).

    Evaluation files are hashed first and their sizes noted; a training file is read only when its size equals
    one of them. Hashes are cached per path (many cuts can share one recording)."""

    def __init__(self, train_root: str | Path, eval_root: str | Path):
        self.roots = {"train": Path(train_root), "eval": Path(eval_root)}
        self.eval_sizes: set[int] = set()
        self.cache: dict[Path, str] = {}

    def _files(self, record: dict, side: str) -> list[Path]:
        recording = record.get("recording") if isinstance(record.get("recording"), dict) else {}
        paths = []
        for s in recording.get("sources") or []:
            where = s.get("source") if isinstance(s, dict) else None
            if not isinstance(where, str) or not where or manifests.TAR_MEMBER_RE.match(where):
                continue
            path = Path(where) if os.path.isabs(where) else self.roots[side] / where
            paths.append(path)
        return paths

    def _hash(self, path: Path) -> str:
        if path not in self.cache:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self.cache[path] = digest.hexdigest()
        return self.cache[path]

    def __call__(self, record: dict, side: str) -> set[str]:
        hashes = set()
        for path in self._files(record, side):
            try:
                size = path.stat().st_size
                if side == "eval":
                    self.eval_sizes.add(size)
                elif size not in self.eval_sizes:
                    continue
                hashes.add(self._hash(path))
            except OSError:  # a missing or unreadable file has no content to compare
                continue
        return hashes


def _records(path: str | Path, skipped: collections.Counter) -> Iterator[dict]:
    for _, record in manifests.iter_manifest(path):
        if isinstance(record, manifests.ClipRejected):
            skipped[record.reason] += 1
        else:
            yield record


def check_manifests(train_manifests: Sequence[str | Path], eval_manifest: str | Path, *,
                    train_audio_root: str | Path | None = None, eval_audio_root: str | Path | None = None,
                    max_train_ids: int = 3) -> tuple[Overlap, dict[str, int]]:
    """`find_overlap` over manifest files -> (overlap, unreadable lines by reason).

    With both audio roots, audio content is compared too (``audio_hashes``). Raises ValueError naming a
    manifest that does not exist.
    """
    for path in [*train_manifests, eval_manifest]:
        if not Path(path).is_file():
            raise ValueError(f"manifest {path} does not exist")
    hasher = None
    if train_audio_root is not None and eval_audio_root is not None:
        hasher = _FileHasher(train_audio_root, eval_audio_root)
    skipped = collections.Counter()
    eval_records = list(_records(eval_manifest, skipped))  # indexed before any training file is hashed
    train = (r for path in train_manifests for r in _records(path, skipped))
    return find_overlap(train, eval_records, max_train_ids=max_train_ids, content_key=hasher), dict(skipped)


def overlap_summary(overlap: Overlap, *, train_manifests: Sequence[str | Path] = (),
                    eval_manifest: str | Path | None = None, max_examples: int = 10) -> dict:
    """The JSON block for an evaluation report: ``checked`` (True), what was compared, and per kind the number
    of shared keys, the number of evaluation cuts holding one, and up to ``max_examples`` examples
    (key, eval cut ids, training cut ids). ``clean`` is True when nothing is shared."""
    kinds = {}
    for kind in KINDS:
        if kind == "audio_hashes" and not overlap.hashed:
            continue
        shared = overlap.shared[kind]
        kinds[kind] = {
            "shared": len(shared),
            "eval_cuts": len(overlap.eval_cuts_affected(kind)),
            "examples": [{"key": key, "eval_cuts": eval_ids[:max_examples], "train_cuts": train_ids}
                         for key, (eval_ids, train_ids) in sorted(shared.items())[:max_examples]],
        }
    return {"checked": True, "train_manifests": [str(p) for p in train_manifests],
            "eval_manifest": None if eval_manifest is None else str(eval_manifest),
            "num_train_cuts": overlap.num_train_cuts, "num_eval_cuts": overlap.num_eval_cuts,
            "content_hashed": overlap.hashed, "clean": overlap.clean,
            "eval_cuts_affected": len(overlap.eval_cuts_affected()), "kinds": kinds}


def summary_line(summary: dict) -> str:
    """One line for a terminal: "overlap with training data: none" or the counts per kind."""
    if summary["clean"]:
        return (f"overlap with training data: none ({summary['num_eval_cuts']} eval cuts against "
                f"{summary['num_train_cuts']} training cuts)")
    parts = [f"{kind} {v['shared']} ({v['eval_cuts']} eval cuts)" for kind, v in summary["kinds"].items()
             if v["shared"]]
    return (f"overlap with training data: {summary['eval_cuts_affected']} of {summary['num_eval_cuts']} eval cuts "
            "share " + ", ".join(parts))
