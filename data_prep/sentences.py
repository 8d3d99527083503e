"""English sentences generated from small word lists and templates (no corpus text).

:func:`make_sentences` draws distinct sentences of about 4-14 words for the synthetic corpus; the same
``random.Random`` state always gives the same list.
"""

import random
import re

_WORDS = {
    "name": ["Maria", "Peter", "Aisha", "Tom", "Elena", "David", "Grace", "Omar", "Lucy", "Daniel", "Nina",
             "Samuel", "Rosa", "Henry", "Priya", "Oscar", "Hannah", "Victor", "Chloe", "Martin"],
    "noun": ["letter", "garden", "window", "bicycle", "kettle", "ladder", "blanket", "camera", "basket",
             "painting", "notebook", "umbrella", "lantern", "suitcase", "guitar", "map", "clock", "bridge",
             "boat", "recipe", "parcel", "jacket", "piano", "tent", "radio", "fence", "garage", "report"],
    "nouns": ["apples", "candles", "tickets", "stones", "photographs", "cookies", "envelopes", "flowers",
              "shells", "books", "chairs", "keys", "buttons", "plates", "maps", "lemons", "shirts", "coins"],
    "place": ["station", "market", "library", "harbour", "kitchen", "museum", "office", "bakery", "hospital",
              "school", "village", "theatre", "park", "airport", "beach", "farm", "hotel", "cinema"],
    "adj": ["old", "bright", "heavy", "quiet", "small", "wooden", "golden", "narrow", "broken", "shiny",
            "empty", "crowded", "tiny", "enormous", "purple", "dusty", "warm", "curious", "friendly", "strange"],
    "verb": ["paint", "fix", "carry", "clean", "find", "open", "borrow", "check", "move", "deliver", "wrap",
             "measure", "sell", "photograph", "return", "repair", "collect", "describe"],
    "verbed": ["painted", "fixed", "carried", "cleaned", "found", "opened", "borrowed", "checked", "moved",
               "delivered", "wrapped", "measured", "sold", "returned", "repaired", "collected", "described"],
    "time": ["this morning", "last night", "after lunch", "before sunrise", "on Sunday", "next week",
             "tomorrow evening", "in the spring", "at midnight", "every Friday", "later today", "in an hour"],
    "count": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty"],
    "weather": ["rains", "snows", "gets windy", "stays sunny", "turns cold", "clears up"],
    "feeling": ["surprised", "delighted", "puzzled", "relieved", "impressed", "amused"],
    "animal": ["dog", "cat", "horse", "goat", "parrot", "rabbit", "fox", "owl", "duck", "sheep"],
}

_TEMPLATES = [
    "The {adj} {noun} was {verbed} {time}.",
    "{name} {verbed} the {adj} {noun} near the {place}.",
    "Could you {verb} the {noun} {time}?",
    "I think we should {verb} the {noun} {time}.",
    "{name} bought {count} {nouns} at the {place} {time}.",
    "If it {weather} {time}, we will stay at the {place}.",
    "Please remember to {verb} the {noun} on your way to the {place}.",
    "My neighbour's {animal} sleeps beside the {adj} {noun}.",
    "{name} was {feeling} to see the {adj} {noun} at the {place}.",
    "There were {count} {adj} {nouns} on the table by the window.",
    "We walked to the {place} and {verbed} a {adj} {noun}.",
    "Nobody expected the {animal} to sit on the {noun}.",
    "The {place} opens early, so {name} can {verb} the {noun} {time}.",
    "Why did {name} leave the {noun} at the {place}?",
    "After the meeting, {name} {verbed} {count} {nouns} for the {place}.",
    "The {animal} ran across the {adj} {place} {time}.",
    "{name} and {name2} {verbed} the {noun} together {time}.",
    "Let us {verb} the {adj} {noun} and then head to the {place}.",
    "A {adj} {animal} was waiting outside the {place} {time}.",
    "When the {noun} arrived, {name} felt {feeling}.",
]


def _fill(template: str, rng: random.Random) -> str:
    """Replace each {slot} with a random word; {name2} draws a second, different name."""
    chosen: dict[str, str] = {}

    def pick(match: re.Match) -> str:
        slot = match.group(1)
        base = slot.rstrip("2")
        options = [w for w in _WORDS[base] if w != chosen.get(base)]
        word = rng.choice(options)
        chosen.setdefault(base, word)
        return word

    sentence = re.sub(r"\{(\w+)\}", pick, template)
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", sentence)


def make_sentences(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct sentences, in draw order. Raises ValueError when the grammar cannot supply them."""
    sentences: dict[str, None] = {}  # insertion-ordered set
    for _ in range(count * 50):
        if len(sentences) == count:
            break
        sentences.setdefault(_fill(rng.choice(_TEMPLATES), rng))
    if len(sentences) < count:
        raise ValueError(f"could only make {len(sentences)} distinct sentences, {count} requested")
    return list(sentences)
