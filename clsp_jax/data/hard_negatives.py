"""Stage-3 hard negatives: a caption with one attribute of the clip rewritten to a wrong value.

The attribute is one of gender, speaking rate, pitch, accent, an intrinsic tag or a situational tag,
tried in random order until one of them occurs in the caption's wording. Only words that state the
clip's *true* value are rewritten (a "fast speed" clip has its "fast"/"quickly" turned into
"slow"/"slowly"; a "measured speed" or "medium-pitched" clip offers no rate/pitch rewrite); text in
double quotes (a transcript) is left alone. An accent is replaced by another accent, from the same
group with probability ``p_intra_group`` (harder) and otherwise from another group. If no attribute
of the clip is found, any gendered word is flipped; if there is none either, there is no negative.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# (word for one value, word for the opposite value). Longer phrases are matched before the words
# they contain ("high-pitched" before "high").
GENDER_WORDS = (
    ("female", "male"), ("woman", "man"), ("women", "men"), ("girl", "boy"), ("lady", "gentleman"),
    ("feminine", "masculine"), ("she", "he"), ("her", "his"), ("hers", "his"), ("herself", "himself"),
)
RATE_WORDS = (  # (fast, slow)
    ("fast-paced", "slow-paced"), ("fast", "slow"), ("faster", "slower"), ("quick", "slow"),
    ("quickly", "slowly"), ("rapid", "slow"), ("rapidly", "slowly"), ("hurried", "unhurried"),
    ("rushed", "leisurely"), ("brisk", "leisurely"), ("briskly", "leisurely"),
)
PITCH_WORDS = (  # (high, low)
    ("high-pitched", "low-pitched"), ("high", "low"), ("higher", "lower"), ("highest", "lowest"),
    ("rising", "falling"), ("rises", "falls"), ("raised", "lowered"), ("upward", "downward"),
)
ACCENT_GROUPS = {
    "native english": (
        "american", "british", "english", "australian", "canadian", "new zealand", "irish",
        "northern irish", "scottish", "welsh", "southern american", "brooklyn/new york",
        "british-american",
    ),
    "other english": ("indian", "nigerian", "jamaican", "filipino", "british-guyanese", "colombian-american"),
    "romance": (
        "spanish", "mexican", "colombian", "argentine", "chilean", "paraguayan", "dominican",
        "portuguese", "brazilian", "italian", "french", "romanian",
    ),
    "germanic and slavic": (
        "german", "dutch", "swedish", "norwegian", "swiss", "belgian", "finnish", "hungarian",
        "russian", "ukrainian", "polish", "czech", "croatian", "serbian", "slovenian",
    ),
    "east asian": ("mandarin", "cantonese", "chinese", "japanese"),
    "middle eastern": ("turkish", "dari", "jordanian"),
}
ACCENT_GROUP = {accent: group for group, accents in ACCENT_GROUPS.items() for accent in accents}
# Opposites of tag words (both directions are used). Word forms of a tag are listed with it.
INTRINSIC_OPPOSITES = (
    ("raspy", "smooth"), ("raspy", "silky"), ("raspiness", "smoothness"), ("guttural", "silky"),
    ("husky", "crisp"), ("huskiness", "crispness"), ("slurred", "crisp"), ("nasal", "deep"),
    ("nasality", "depth"), ("shrill", "deep"), ("shrillness", "depth"), ("staccato", "flowing"),
    ("punctuated", "flowing"), ("stammering", "flowing"), ("stammer", "flow"), ("hesitant", "flowing"),
    ("hesitantly", "fluently"), ("lisp", "crisp"), ("pitchy", "monotone"), ("booming", "hushed"),
    ("booming", "soft"), ("upbeat", "monotonous"), ("authoritative", "hesitant"),
    ("inviting", "authoritative"), ("vocal-fry", "smooth"),
)
SITUATIONAL_OPPOSITES = (
    ("happy", "sad"), ("happy", "saddened"), ("happiness", "sadness"), ("happy", "angry"),
    ("happy", "pained"), ("laughing", "saddened"), ("laughter", "sadness"), ("enthusiastic", "bored"),
    ("enthusiasm", "boredom"), ("angry", "calm"), ("anger", "calmness"), ("scared", "calm"),
    ("anxious", "calm"), ("anxiety", "calmness"), ("confused", "calm"), ("animated", "passive"),
    ("animated", "sleepy"), ("loud", "whispered"), ("admiring", "disgusted"), ("desirous", "disgusted"),
    ("awed", "bored"), ("sympathetic", "sarcastic"), ("admiring", "sarcastic"), ("guilty", "happy"),
    ("enunciated", "slurred"), ("singsong", "monotone"),
)


def _opposites(pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for a, b in pairs:
        table.setdefault(a, []).append(b)
        table.setdefault(b, []).append(a)
    return {k: tuple(dict.fromkeys(v)) for k, v in table.items()}


INTRINSIC_TABLE = _opposites(INTRINSIC_OPPOSITES)
SITUATIONAL_TABLE = _opposites(SITUATIONAL_OPPOSITES)


def _match_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def replace_words(text: str, mapping: dict[str, str]) -> str | None:
    """Rewrites whole words (case-insensitive, case kept) outside double quotes in one pass.

    Returns None when no word of ``mapping`` occurs (so nothing was perturbed).
    """
    if not mapping:
        return None
    words = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r'("[^"]*")|\b(' + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    hits = 0

    def substitute(m: re.Match) -> str:
        nonlocal hits
        if m.group(1):
            return m.group(1)
        hits += 1
        return _match_case(m.group(2), mapping[m.group(2).lower()])

    out = pattern.sub(substitute, text)
    return out if hits else None


def _two_way(pairs, true_side: int) -> dict[str, str]:
    """{word stating the true value: word stating the other}; the first pair of a word wins."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        mapping.setdefault(pair[true_side], pair[1 - true_side])
    return mapping


def _gender(text, gender, rng):
    side = {"female": 0, "male": 1}.get(gender)
    return None if side is None else replace_words(text, _two_way(GENDER_WORDS, side))


def _rate(text, rate, rng):
    side = {"fast speed": 0, "slow speed": 1}.get(rate)
    return None if side is None else replace_words(text, _two_way(RATE_WORDS, side))


def _pitch(text, pitch, rng):
    side = {"high-pitched": 0, "low-pitched": 1}.get(pitch)
    return None if side is None else replace_words(text, _two_way(PITCH_WORDS, side))


def wrong_accent(accent: str, rng: np.random.Generator, p_intra_group: float) -> str:
    """Another accent: same group with probability p_intra_group (if the group has another)."""
    group = ACCENT_GROUP[accent]
    same = [a for a in ACCENT_GROUPS[group] if a != accent]
    if same and rng.random() < p_intra_group:
        return same[rng.integers(len(same))]
    others = [g for g in ACCENT_GROUPS if g != group]
    members = ACCENT_GROUPS[others[rng.integers(len(others))]]
    return members[rng.integers(len(members))]


def _accent(text, accent, rng, p_intra_group):
    accent = accent.lower()
    if accent not in ACCENT_GROUP:
        return None
    return replace_words(text, {accent: wrong_accent(accent, rng, p_intra_group)})


def _tags(text, tags, rng, table):
    for i in rng.permutation(len(tags)):
        tag = tags[i].lower()
        if tag in table:
            opposites = table[tag]
            out = replace_words(text, {tag: opposites[rng.integers(len(opposites))]})
            if out is not None:
                return out
    return None


def perturb_caption(
    text: str,
    *,
    gender: str,
    speaking_rate: str,
    pitch: str,
    accent: str,
    intrinsic_tags: Sequence[str],
    situational_tags: Sequence[str],
    rng: np.random.Generator,
    p_intra_group: float = 0.2,
) -> str | None:
    """``text`` with one of the clip's attributes rewritten, or None if none can be."""
    attempts = (
        lambda: _gender(text, gender, rng),
        lambda: _rate(text, speaking_rate, rng),
        lambda: _pitch(text, pitch, rng),
        lambda: _accent(text, accent, rng, p_intra_group),
        lambda: _tags(text, list(intrinsic_tags), rng, INTRINSIC_TABLE),
        lambda: _tags(text, list(situational_tags), rng, SITUATIONAL_TABLE),
    )
    for i in rng.permutation(len(attempts)):
        out = attempts[i]()
        if out is not None:
            return out
    # The caption states no attribute we know for this clip; a gendered word still makes a
    # negative, whichever way it points.
    for side in (0, 1):
        out = replace_words(text, _two_way(GENDER_WORDS, side))
        if out is not None:
            return out
    return None
