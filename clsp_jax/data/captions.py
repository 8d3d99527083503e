"""Which captions a clip contributes to a training batch, per stage (docs/design.md §2).

Rows: a batch of B clips carries K captions per clip, caption k of clip i at row k*B + i.

- stage 1, K=1: one caption drawn each step from ``stage1_caption_pool`` ("finegrained", "global", "both"),
  or with "fixed" the same caption at every step: the clip's first fine-grained caption (its first global
  one if it has none), as the authors' stage 1 reads one fixed string per clip (the cut's
  ``supervisions[0].text``).
- stage 2, K=2: the step's task decides for the whole batch:
  task 0 (Task 1) = (a global caption, a fine-grained caption);
  task 1 (Task 2) = (two different fine-grained captions).
  p(task 1) = min(p_start + (p_end - p_start) * step / ramp_steps, p_end)  (0.05 -> 0.5 over 10k steps).
- stage 3, K=3: Task 1 plus a hard negative (row 2B + i): the global caption of row i with one
  attribute rewritten (``hard_negatives.perturb_caption``); ``negative_valid[i]`` is False when no
  attribute could be rewritten (the row then repeats the positive and must be masked out).

When a clip lacks what its task asks for, it falls back to the captions it has: no global caption
-> a fine-grained one in its place (and vice versa); a single fine-grained caption in Task 2 -> the
global one as the second caption, else the same caption twice.

Randomness is a pure function of (seed, step, row), so every host draws the same task for a step
and a clip gets the same captions whichever host loads it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from clsp_jax.data import hard_negatives

TASK_GLOBAL_FINE = 0  # Task 1
TASK_TWO_FINE = 1  # Task 2
POOLS = ("finegrained", "global", "both", "fixed")
# Distinct streams of the seed so task draws and caption draws never share random numbers.
_TASK_STREAM, _CAPTION_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class ClipText:
    """A clip's captions and tags, as stored in the dataset (strings)."""

    global_captions: tuple[str, ...]
    finegrained_captions: tuple[str, ...]  # sorted by length
    gender: str = ""
    accent: str = ""
    pitch: str = ""
    speaking_rate: str = ""
    intrinsic_tags: tuple[str, ...] = ()
    situational_tags: tuple[str, ...] = ()

    @classmethod
    def from_example(cls, example: dict) -> "ClipText":
        """From a decoded TFDS example (bytes fields)."""
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
        tags = example["tags"]
        return cls(
            global_captions=tuple(map(text, example["global_captions"])),
            finegrained_captions=tuple(map(text, example["finegrained_captions"])),
            gender=text(tags["gender"]),
            accent=text(tags["accent"]),
            pitch=text(tags["pitch"]),
            speaking_rate=text(tags["speaking_rate"]),
            intrinsic_tags=tuple(map(text, tags["intrinsic_tags"])),
            situational_tags=tuple(map(text, tags["situational_tags"])),
        )


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    stage: int = 1
    stage1_caption_pool: str = "finegrained"
    task2_prob_start: float = 0.05
    task2_prob_end: float = 0.5
    task2_ramp_steps: int = 10000
    accent_intra_group_prob: float = 0.2

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.stage1_caption_pool not in POOLS:
            raise ValueError(f"stage1_caption_pool must be one of {POOLS}, got {self.stage1_caption_pool!r}")

    @property
    def captions_per_clip(self) -> int:
        return self.stage


def task2_probability(step: int, cfg: CaptionConfig) -> float:
    ramp = cfg.task2_prob_start + (cfg.task2_prob_end - cfg.task2_prob_start) * step / cfg.task2_ramp_steps
    return min(ramp, cfg.task2_prob_end)


def draw_task(seed: int, step: int, cfg: CaptionConfig) -> int:
    """The task of a step: Task 2 (1) only in stage 2, with task2_probability(step)."""
    if cfg.stage != 2:
        return TASK_GLOBAL_FINE
    u = np.random.default_rng([seed, _TASK_STREAM, step]).random()
    return TASK_TWO_FINE if u < task2_probability(step, cfg) else TASK_GLOBAL_FINE


def clip_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """Caption randomness of global batch row ``row`` at ``step``."""
    return np.random.default_rng([seed, _CAPTION_STREAM, step, row])


def _choice(pool: Sequence[str], rng: np.random.Generator) -> int:
    return int(rng.integers(len(pool)))


def _pair(first: Sequence[str], second: Sequence[str], rng: np.random.Generator) -> tuple[str, str]:
    """One caption from ``first`` and a different one from ``second`` (see module doc fallbacks)."""
    a = first[_choice(first, rng)]
    rest = [c for c in second if c != a]
    if rest:
        return a, rest[_choice(rest, rng)]
    return a, a


def sample_captions(clip: ClipText, task: int, cfg: CaptionConfig, rng: np.random.Generator) -> tuple[list[str], bool]:
    """The clip's K captions (row order k = 0..K-1) and whether its hard negative is valid."""
    g, f = list(clip.global_captions), list(clip.finegrained_captions)
    if not g and not f:
        raise ValueError("clip has no captions")
    if cfg.stage == 1:
        if cfg.stage1_caption_pool == "fixed":
            return [(f or g)[0]], True
        pool = {"finegrained": f or g, "global": g or f, "both": g + f}[cfg.stage1_caption_pool]
        return [pool[_choice(pool, rng)]], True
    if task == TASK_TWO_FINE:
        if len(f) >= 2:
            return list(_pair(f, f, rng)), True
        return list(_pair(f or g, g or f, rng)), True
    captions = list(_pair(g or f, f or g, rng))
    if cfg.stage == 2:
        return captions, True
    negative = hard_negatives.perturb_caption(
        captions[0],
        gender=clip.gender,
        speaking_rate=clip.speaking_rate,
        pitch=clip.pitch,
        accent=clip.accent,
        intrinsic_tags=clip.intrinsic_tags,
        situational_tags=clip.situational_tags,
        rng=rng,
        p_intra_group=cfg.accent_intra_group_prob,
    )
    return captions + [negative if negative is not None else captions[0]], negative is not None


def eval_caption(clip: ClipText, kind: str) -> str | None:
    """The caption used for retrieval evaluation: first global, last (longest) fine-grained."""
    if kind == "global":
        return clip.global_captions[0] if clip.global_captions else None
    if kind == "finegrained":
        return clip.finegrained_captions[-1] if clip.finegrained_captions else None
    raise ValueError(f"caption kind must be 'global' or 'finegrained', got {kind!r}")
