"""Speaking-style captions for synthetic clips, written from the clip's true delivery settings.

A clip is a :class:`Profile`: a speaker (gender, accent) and one or two :class:`Style` parts, the second
part starting about half way. Global captions are short, time-free profiles; fine-grained captions are
narratives of how the clip unfolds. Wording follows the conventions of the authors' caption filters and
attribute perturbation: one speaker, no negations ("no", "not", "without", ...), fine-grained captions of
128-768 characters on one line, and the perturbable words (man/woman, he/she, fast/slow, high/low,
the accent name) stand for the attribute they name and nothing else.
"""

import dataclasses
import itertools
import random

RATES = ("slow speed", "measured speed", "fast speed")
PITCHES = ("low-pitched", "medium-pitched", "high-pitched")
LOUDNESS = ("quiet", "normal", "loud")
INTONATIONS = ("monotone", "natural", "animated")

FINE_MIN_CHARS, FINE_MAX_CHARS = 128, 768


@dataclasses.dataclass(frozen=True)
class Style:
    """Delivery over one stretch of a clip. ``pitch`` is "" for a whisper (it has no voiced pitch)."""

    speaking_rate: str
    pitch: str
    loudness: str
    intonation: str
    whisper: bool = False

    def __post_init__(self):
        if self.speaking_rate not in RATES or self.loudness not in LOUDNESS or self.intonation not in INTONATIONS:
            raise ValueError(f"unknown style {self}")
        if self.pitch not in (PITCHES if not self.whisper else ("",)):
            raise ValueError(f"style {self}: pitch must be one of {PITCHES}, or '' for a whisper")


@dataclasses.dataclass(frozen=True)
class Profile:
    """A clip's speaker and delivery: ``gender`` "male"/"female", ``accent`` a lower-case label such as
    "scottish" (shown title-cased), ``styles`` one part or two (before and after the change)."""

    gender: str
    accent: str
    styles: tuple[Style, ...]

    def __post_init__(self):
        if self.gender not in ("male", "female"):
            raise ValueError(f"gender must be 'male' or 'female', got {self.gender!r}")
        if len(self.styles) not in (1, 2):
            raise ValueError(f"a profile has 1 or 2 styles, got {len(self.styles)}")

    def constant(self, field: str) -> str | None:
        """The value of a Style field shared by all parts, or None when it changes."""
        values = {getattr(s, field) for s in self.styles}
        return values.pop() if len(values) == 1 else None


def tags(profile: Profile) -> tuple[list[str], list[str]]:
    """(intrinsic_tags, situational_tags) in the vocabulary of ParaSpeechCaps, from what the audio carries."""
    pitch = profile.constant("pitch")
    intrinsic = []
    if profile.constant("intonation") == "monotone":
        intrinsic.append("monotone")
    if pitch == "low-pitched" and profile.gender == "male":
        intrinsic.append("deep")
    if pitch == "high-pitched" and profile.gender == "female":
        intrinsic.append("shrill")
    situational = []
    if any(s.whisper for s in profile.styles):
        situational.append("whispered")
    if any(s.loudness == "loud" for s in profile.styles):
        situational.append("loud")
    if any(s.intonation == "animated" for s in profile.styles):
        situational.append("animated")
    return intrinsic, situational


# Phrase banks. Each entry is a list of interchangeable wordings.
_NOUN = {"male": ["man", "male speaker"], "female": ["woman", "female speaker"]}
_PRONOUN = {"male": ("he", "his"), "female": ("she", "her")}
_RATE_ADV = {
    "slow speed": ["slowly", "at a slow pace", "at a slow, unhurried pace"],
    "measured speed": ["at a measured pace", "at a moderate, measured speed", "at an even, measured pace"],
    "fast speed": ["quickly", "at a fast pace", "rapidly", "at a quick, hurried pace"],
}
_RATE_ADJ = {
    "slow speed": ["slow", "slow-paced", "unhurried"],
    "measured speed": ["measured", "moderately paced", "evenly paced"],
    "fast speed": ["fast", "fast-paced", "rapid", "quick"],
}
_PITCH_ADJ = {
    "low-pitched": ["low-pitched", "low"],
    "medium-pitched": ["medium-pitched", "moderately pitched", "mid-range"],
    "high-pitched": ["high-pitched", "high"],
}
_LOUD_ADV = {
    "quiet": ["quietly", "softly", "at a quiet volume"],
    "normal": ["at a comfortable volume", "at a moderate volume", "at an ordinary speaking volume"],
    "loud": ["loudly", "at a loud, forceful volume", "with a loud, projecting delivery"],
}
_LOUD_ADJ = {"quiet": ["quiet", "hushed"], "normal": ["comfortable", "moderate"], "loud": ["loud", "forceful"]}
_INTONATION_ADV = {
    "monotone": ["in a flat, monotone way", "with monotone intonation", "with a flat, monotone melody"],
    "natural": ["with natural intonation", "with a natural melody", "with ordinary, even intonation"],
    "animated": ["with lively, animated intonation", "with expressive, animated intonation",
                 "with a lively, swinging melody"],
}
_WHISPER_ADV = ["in a whisper", "in a breathy whisper", "in a hushed whisper"]
_VARYING = {"speaking_rate": "at a varying pace", "pitch": "with a shifting pitch", "loudness": "at a changing volume"}
_CHANGE = {  # (attribute, went up) -> wordings of the change, e.g. ("speaking_rate", True): speeds up
    ("speaking_rate", True): ["speeds up", "picks up the pace", "starts talking faster"],
    ("speaking_rate", False): ["slows down", "eases into a slower pace", "starts talking more slowly"],
    ("loudness", True): ["grows louder", "becomes louder", "turns up the volume"],
    ("loudness", False): ["becomes quieter", "drops to a quieter volume", "softens the volume"],
    ("pitch", True): ["moves to a higher pitch", "shifts up to a higher pitch"],
    ("pitch", False): ["drops to a lower pitch", "moves down to a lower pitch"],
}
_ORDER = {"speaking_rate": RATES, "pitch": PITCHES, "loudness": LOUDNESS}


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _accent(profile: Profile) -> str:
    return profile.accent.title()


def _pitch_words(style: Style, gender: str, rng: random.Random) -> str:
    """Adjectives for the voice, e.g. "deep, low-pitched" (tag words only when the tag applies)."""
    word = rng.choice(_PITCH_ADJ[style.pitch])
    if style.pitch == "low-pitched" and gender == "male":
        return "deep, " + word
    if style.pitch == "high-pitched" and gender == "female":
        return "shrill, " + word
    return word


def _style_adverbials(style: Style, gender: str, rng: random.Random, skip: tuple[str, ...] = ()) -> list[str]:
    """Adverbial phrases for one style: pace, voice (pitch or whisper), volume, intonation."""
    out = []
    if "speaking_rate" not in skip:
        out.append(rng.choice(_RATE_ADV[style.speaking_rate]))
    if style.whisper:
        out.append(rng.choice(_WHISPER_ADV))
    elif "pitch" not in skip:
        out.append(f"in {_a(_pitch_words(style, gender, rng))} voice")
    if "loudness" not in skip and not style.whisper:
        out.append(rng.choice(_LOUD_ADV[style.loudness]))
    if style.intonation != "natural" or rng.random() < 0.3:
        out.append(rng.choice(_INTONATION_ADV[style.intonation]))
    return out


def _profile_adverbials(profile: Profile, rng: random.Random) -> list[str]:
    """Time-free adverbials for a whole clip: constant attributes by value, changing ones as 'varying'."""
    changing = tuple(f for f in _VARYING if profile.constant(f) is None)
    out = _style_adverbials(profile.styles[0], profile.gender, rng, skip=changing)
    out += [_VARYING[f] for f in changing]
    return out


def global_caption(profile: Profile, rng: random.Random) -> str:
    """One short, time-free description of the speaker and delivery."""
    noun = rng.choice(_NOUN[profile.gender])
    accent = _accent(profile)
    adverbials = _profile_adverbials(profile, rng)
    frame = rng.randrange(4)
    if frame == 0:
        return f"{_cap(_a(noun))} with {_a(accent)} accent speaks {_join(adverbials)}."
    if frame == 1:
        return f"{_cap(_a(accent))}-accented {noun} talking {_join(adverbials)}."
    if frame == 2:
        verb = "whispers" if profile.constant("whisper") else "speaks"
        return f"With {_a(accent)} accent, {_a(noun)} {verb} {_join(adverbials)}."
    return f"{_cap(_a(noun))} with {_a(accent)} accent, speaking {_join(adverbials)}."


def _opening(profile: Profile, rng: random.Random, variant: int) -> str:
    accent = _accent(profile)
    adverbials = _join(_style_adverbials(profile.styles[0], profile.gender, rng))
    if variant == 0:  # "The speaker, a man ..." rather than "The speaker, a male speaker ..."
        return f"The speaker, {_a(_NOUN[profile.gender][0])} with {_a(accent)} accent, begins {adverbials}."
    noun = rng.choice(_NOUN[profile.gender])
    if variant == 1:
        return f"{_cap(_a(noun))} with {_a(accent)} accent opens the utterance {adverbials}."
    return f"Speaking with {_a(accent)} accent, {_a(noun)} starts {adverbials}."


def _middle(profile: Profile, rng: random.Random, variant: int) -> str:
    he, his = _PRONOUN[profile.gender]
    first = profile.styles[0]
    if len(profile.styles) == 1:
        pace = rng.choice(_RATE_ADJ[first.speaking_rate])
        voice = "whisper" if first.whisper else f"{_pitch_words(first, profile.gender, rng)} voice"
        if variant == 0:
            return f"{_cap(he)} keeps this {pace} tempo from start to finish, and {his} {voice} stays steady throughout."
        if variant == 1:
            loud = rng.choice(_LOUD_ADJ[first.loudness])
            return (f"The delivery stays consistent across the whole utterance, with the same {pace} rhythm "
                    f"and the same {loud} level from the first word to the last.")
        return f"{_cap(he)} holds that {pace} rhythm all the way through, keeping {his} {voice} even and controlled."
    second = profile.styles[1]
    changes = []
    for field, order in _ORDER.items():
        before, after = getattr(first, field), getattr(second, field)
        if before != after:
            changes.append(rng.choice(_CHANGE[(field, order.index(after) > order.index(before))]))
    rest = _join(_style_adverbials(second, profile.gender, rng))
    if variant == 0:
        return f"Midway through, {he} {_join(changes)}, and the second half is delivered {rest}."
    if variant == 1:
        return f"Then, about halfway in, the style shifts: {he} {_join(changes)}, continuing {rest}."
    return f"After a brief pause {he} {_join(changes)}, finishing the utterance {rest}."


def _energy(style: Style) -> int:
    return sum(_ORDER[f].index(getattr(style, f)) for f in ("speaking_rate", "loudness"))


def _closing(profile: Profile, rng: random.Random, variant: int) -> str:
    he, his = _PRONOUN[profile.gender]
    if len(profile.styles) == 2 and variant == 0:
        livelier = _energy(profile.styles[1]) >= _energy(profile.styles[0])
        opening, ending = ("restrained", "energetic") if livelier else ("energetic", "subdued")
        contrast = rng.choice(["clear", "easy to hear", "striking"])
        return f"The contrast between the {opening} opening and the more {ending} ending is {contrast}."
    if variant == 1:
        return f"{_cap(his)} articulation is clear and regular, with a smooth, synthetic timbre and short pauses between phrases."
    return f"{_cap(he)} ends on a settled, final note, the words evenly spaced and clearly pronounced."


def finegrained_caption(profile: Profile, rng: random.Random, variant: tuple[int, int, int]) -> str:
    """One narrative (opening, development, closing), each part in wording ``variant`` (three indices 0-2)."""
    o, m, c = variant
    return " ".join([_opening(profile, rng, o), _middle(profile, rng, m), _closing(profile, rng, c)])


def captions(profile: Profile, rng: random.Random, num_global: int = 2,
             num_finegrained: int = 3) -> tuple[list[str], list[str]]:
    """(global captions, fine-grained captions), each list of distinct strings in draw order.

    Fine-grained captions use distinct (opening, development, closing) wording combinations and are
    checked against the 128-768 character filter; raises ValueError if one falls outside it."""
    globals_: list[str] = []
    for _ in range(20 * num_global):
        if len(globals_) == num_global:
            break
        caption = global_caption(profile, rng)
        if caption not in globals_:
            globals_.append(caption)
    variants = rng.sample(list(itertools.product(range(3), repeat=3)), num_finegrained)
    fine = [finegrained_caption(profile, rng, v) for v in variants]
    for caption in fine:
        if not FINE_MIN_CHARS <= len(caption) <= FINE_MAX_CHARS:
            raise ValueError(f"fine-grained caption of {len(caption)} chars outside "
                             f"[{FINE_MIN_CHARS}, {FINE_MAX_CHARS}]: {caption!r}")
    return globals_, fine
