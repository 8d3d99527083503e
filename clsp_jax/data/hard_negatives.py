"""Stage-3 hard negatives: a caption with one attribute of the clip rewritten to a wrong value.

The word lists, the casing of a rewritten word and the order of attempts are the CLSP authors'
(`attribute_perturbation.py` of their recipe). The attribute is one of gender, speaking rate, pitch, accent,
an intrinsic tag or a situational tag, tried in random order until one of them occurs in the caption's
wording. Only words that state the clip's *true* value are rewritten (a "fast speed" clip has its
"fast"/"quickly" turned into "slow"/"slowly"; a "measured speed" or "medium-pitched" clip offers no
rate/pitch rewrite); text in double quotes (a transcript) is left alone. A rewritten word keeps the case of
the original as theirs does: all capitals stay capitals, a capitalised word gets `str.title()` ("Fast-paced"
-> "Slow-Paced"), anything else lower case. An accent is replaced by another accent, from the same group
with probability ``p_intra_group`` (harder) and otherwise from another group; the tags and the accent are
looked up as given (no case folding), as theirs are. If no attribute of the clip is found, the gendered
words of the other gender are flipped (a "female" clip's caption saying "he" gets "she").

A failed perturbation: where their code raises (nothing above can be rewritten, or the gender rewrite meets
a clip whose gender is neither "female" nor "male"), ``perturb_caption`` returns None, the gender attempt
simply finds nothing, and the batch masks that clip's negative (``negative_valid``, counted in training).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# (word for one value, word for the opposite value), in the authors' order. A word that appears in several
# pairs is rewritten by its first pair (their rewrites run pair by pair, so a later pair finds it gone).
GENDER_WORDS = (
    ("female", "male"), ("woman", "man"), ("girl", "boy"), ("feminine", "masculine"), ("she", "he"),
    ("her", "his"), ("herself", "himself"),
)
RATE_WORDS = (  # (fast, slow)
    ("fast-paced", "slow-paced"), ("fast", "slow"), ("quick", "slow"), ("rapid", "slow"), ("rushed", "deliberate"),
    ("hurried", "unhurried"), ("quickly", "slowly"), ("rapidly", "slowly"), ("fast", "measured"),
)
PITCH_WORDS = (  # (high, low)
    ("high-pitched", "low-pitched"), ("higher", "lower"), ("high", "low"), ("raising", "lowering"),
    ("rises", "falls"), ("rising", "falling"), ("raised", "lowered"), ("upward", "downward"),
)
ACCENT_GROUPS = {
    "native english": (
        "american", "british", "australian", "canadian", "new zealand", "irish", "scottish", "welsh",
        "southern american", "brooklyn/new york", "northern irish", "british-american", "english",
    ),
    "other english": ("indian", "nigerian", "jamaican", "filipino", "british-guyanese", "colombian-american"),
    "romance": (
        "spanish", "mexican", "colombian", "argentine", "chilean", "paraguayan", "portuguese", "brazilian",
        "italian", "french", "romanian", "dominican",
    ),
    "germanic and slavic": (
        "german", "dutch", "swedish", "norwegian", "swiss", "belgian", "russian", "ukrainian", "polish",
        "czech", "croatian", "serbian", "slovenian", "hungarian", "finnish",
    ),
    "east asian": ("mandarin", "cantonese", "chinese", "japanese"),
    "middle eastern": ("turkish", "dari", "jordanian"),
}
ACCENT_GROUP = {accent: group for group, accents in ACCENT_GROUPS.items() for accent in accents}
# Opposites of tag words (both directions are used); a tag's other word forms are listed with it, as theirs.
INTRINSIC_OPPOSITES = (
    ("raspy", "smooth"), ("raspiness", "smoothness"), ("raspily", "smoothly"), ("raspy", "silky"),
    ("raspiness", "silkiness"), ("raspily", "silkily"), ("guttural", "silky"), ("gutturally", "silkily"),
    ("vocal-fry", "smoothness"), ("slurred", "crisp"), ("slurring", "crispness"), ("slurringly", "crisply"),
    ("husky", "crisp"), ("huskiness", "crispness"), ("huskily", "crisply"), ("nasal", "deep"),
    ("nasality", "depth"), ("nasally", "deeply"),
    ("staccato", "flowing"), ("punctuated", "flowing"), ("punctuation", "flow"), ("stammering", "flowing"),
    ("stammer", "flow"), ("stammeringly", "flowingly"), ("hesitant", "flowing"), ("hesitance", "flow"),
    ("hesitantly", "flowingly"), ("lisp", "crispness"), ("lisping", "crisp"), ("lispingly", "crisply"),
    ("shrill", "deep"), ("shrillness", "depth"), ("shrilly", "deeply"), ("pitchy", "monotone"),
    ("pitchiness", "monotony"), ("pitchily", "monotonously"),
    ("booming", "hushed"), ("boom", "hush"), ("booming", "hushedly"), ("booming", "soft"), ("boom", "softness"),
    ("booming", "softly"), ("upbeat", "monotonous"), ("upbeat", "monotone"), ("authoritative", "hesitant"),
    ("authority", "hesitance"), ("authoritatively", "hesitantly"), ("inviting", "authoritative"),
    ("invitation", "authority"), ("invitingly", "authoritatively"),
)
SITUATIONAL_OPPOSITES = (
    ("happy", "sad"), ("happy", "saddened"), ("happiness", "sadness"), ("happiness", "pain"),
    ("happiness", "anger"), ("happy", "pained"), ("happy", "angry"), ("enthusiastic", "bored"),
    ("enthusiasm", "boredom"), ("laughing", "saddened"), ("laugh", "sadness"), ("laughter", "sadness"),
    ("guilt", "happiness"), ("guilty", "happy"),
    ("angry", "calm"), ("anger", "calmness"), ("scared", "calm"), ("fear", "calmness"), ("anxious", "calm"),
    ("anxiety", "calmness"), ("animated", "passive"), ("animated", "sleepy"), ("loud", "whispered"),
    ("confused", "calm"), ("confusion", "calmness"),
    ("admiring", "disgusted"), ("admiration", "disgust"), ("desirous", "disgusted"), ("desire", "disgust"),
    ("awed", "bored"), ("awe", "boredom"), ("sympathetic", "sarcastic"), ("sympathy", "sarcasm"),
    ("admiring", "sarcastic"), ("admiration", "sarcasm"),
    ("enunciated", "slurred"), ("enunciation", "slurring"), ("singsong", "monotone"),
    ("singsongly", "monotonously"),
)


def _opposites(pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """{word: its opposites in pair order}; a word with several opposites gets one drawn uniformly."""
    table: dict[str, list[str]] = {}
    for a, b in pairs:
        table.setdefault(a, []).append(b)
        table.setdefault(b, []).append(a)
    return {k: tuple(v) for k, v in table.items()}


INTRINSIC_TABLE = _opposites(INTRINSIC_OPPOSITES)
SITUATIONAL_TABLE = _opposites(SITUATIONAL_OPPOSITES)


def _match_case(original: str, replacement: str) -> str:
    if original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement.title()
    return replacement.lower()


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
    if accent not in ACCENT_GROUP:
        return None
    return replace_words(text, {accent: wrong_accent(accent, rng, p_intra_group)})


def _tags(text, tags, rng, table):
    for i in rng.permutation(len(tags)):
        tag = tags[i]
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
    """``text`` with one of the clip's attributes rewritten, or None if none can be (see the module doc)."""
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
    # The caption states no attribute we know for this clip; a word of the other gender, flipped, still
    # makes a negative (theirs: only for a clip that is "female" or "male").
    side = {"female": 1, "male": 0}.get(gender)
    return None if side is None else replace_words(text, _two_way(GENDER_WORDS, side))
