"""Caption sampling per stage and stage-3 attribute perturbation (clsp_jax.data.captions / hard_negatives)."""

from __future__ import annotations

import numpy as np
import pytest

from clsp_jax.data import captions, hard_negatives
from clsp_jax.data.captions import CaptionConfig, ClipText

CLIP = ClipText(
    global_captions=(
        "A high-pitched woman speaks quickly with an American accent.",
        "A female voice, fast and bright.",
    ),
    finegrained_captions=("fine one " * 20, "fine two " * 20, "fine three " * 20),
    gender="female", accent="american", pitch="high-pitched", speaking_rate="fast speed",
    intrinsic_tags=("raspy",), situational_tags=("happy",),
)


def rng(i=0):
    return np.random.default_rng(i)


def test_task2_probability_ramps_from_005_to_05_over_10k_steps():
    cfg = CaptionConfig(stage=2)
    got = [captions.task2_probability(t, cfg) for t in (0, 2000, 5000, 10000, 50000)]
    np.testing.assert_allclose(got, [0.05, 0.14, 0.275, 0.5, 0.5])


def test_task_draws_follow_the_schedule_and_depend_only_on_seed_and_step():
    cfg = CaptionConfig(stage=2)
    late = np.mean([captions.draw_task(7, t, cfg) for t in range(20000, 24000)])
    early = np.mean([captions.draw_task(7, t, cfg) for t in range(0, 400)])  # p in [0.05, 0.068]
    assert abs(late - 0.5) < 0.03 and early < 0.1
    tasks = lambda seed: [captions.draw_task(seed, t, cfg) for t in range(30000, 30050)]
    assert tasks(7) == tasks(7) and tasks(8) != tasks(7)
    assert {captions.draw_task(7, t, CaptionConfig(stage=s)) for s in (1, 3) for t in range(20000, 20100)} == {0}


def test_stage1_pools():
    def draws(pool):
        cfg = CaptionConfig(stage1_caption_pool=pool)
        return {captions.sample_captions(CLIP, 0, cfg, rng(i))[0][0] for i in range(60)}

    assert draws("finegrained") == set(CLIP.finegrained_captions)
    assert draws("global") == set(CLIP.global_captions)
    assert draws("both") == set(CLIP.global_captions + CLIP.finegrained_captions)
    assert draws("fixed") == {CLIP.finegrained_captions[0]}  # the same caption whatever the step's draw
    only_global = ClipText(global_captions=("g" * 40,), finegrained_captions=())
    assert captions.sample_captions(only_global, 0, CaptionConfig(), rng())[0] == ["g" * 40]
    assert captions.sample_captions(only_global, 0, CaptionConfig(stage1_caption_pool="fixed"), rng())[0] == ["g" * 40]
    with pytest.raises(ValueError, match="stage1_caption_pool"):
        CaptionConfig(stage1_caption_pool="short")


def test_stage2_tasks_and_fallbacks():
    cfg = CaptionConfig(stage=2)
    for i in range(20):
        (g, f), _ = captions.sample_captions(CLIP, captions.TASK_GLOBAL_FINE, cfg, rng(i))
        assert g in CLIP.global_captions and f in CLIP.finegrained_captions
        (f1, f2), _ = captions.sample_captions(CLIP, captions.TASK_TWO_FINE, cfg, rng(i))
        assert f1 != f2 and {f1, f2} <= set(CLIP.finegrained_captions)
    one_fine = ClipText(global_captions=("g" * 40,), finegrained_captions=("f" * 130,))
    assert captions.sample_captions(one_fine, captions.TASK_TWO_FINE, cfg, rng())[0] == ["f" * 130, "g" * 40]
    no_global = ClipText(global_captions=(), finegrained_captions=("a" * 130, "b" * 130))
    pair, _ = captions.sample_captions(no_global, captions.TASK_GLOBAL_FINE, cfg, rng())
    assert sorted(pair) == ["a" * 130, "b" * 130]
    single = ClipText(global_captions=(), finegrained_captions=("a" * 130,))
    assert captions.sample_captions(single, captions.TASK_TWO_FINE, cfg, rng())[0] == ["a" * 130] * 2


def test_stage3_adds_a_perturbed_global_caption():
    cfg = CaptionConfig(stage=3)
    for i in range(20):
        (g, f, neg), valid = captions.sample_captions(CLIP, 0, cfg, rng(i))
        assert valid and g in CLIP.global_captions and f in CLIP.finegrained_captions and neg != g
    plain = ClipText(global_captions=("Someone talks in a room with an echo.",), finegrained_captions=("x" * 130,))
    (g, _, neg), valid = captions.sample_captions(plain, 0, cfg, rng())
    assert not valid and neg == g


def perturb(text, **attrs):
    defaults = dict(gender="", speaking_rate="", pitch="", accent="", intrinsic_tags=(), situational_tags=(), rng=rng())
    return hard_negatives.perturb_caption(text, **{**defaults, **attrs})


def test_gender_rate_pitch_swaps_keep_case_and_quotes():
    assert perturb('A woman says "she is here" and she smiles; Her tone is FEMALE.', gender="female") == (
        'A man says "she is here" and he smiles; His tone is MALE.'
    )
    assert perturb("He lowers his voice.", gender="male") == "She lowers her voice."
    assert perturb("She talks fast, quickly and at a rapid pace.", speaking_rate="fast speed") == (
        "She talks slow, slowly and at a slow pace."
    )
    # The authors' casing (capitalised -> str.title()) and their slow-side words ("measured" -> "fast").
    assert perturb("Slow-paced, deliberate and measured, SLOW.", speaking_rate="slow speed") == (
        "Fast-Paced, rushed and fast, FAST.")
    assert perturb("Fast and Rushed.", speaking_rate="fast speed") == "Slow and Deliberate."
    assert perturb("A high-pitched voice rising higher.", pitch="high-pitched") == "A low-pitched voice falling lower."
    # "measured" / "medium" give nothing to rewrite, and no gendered word is left: no negative
    assert perturb("A measured, even delivery.", speaking_rate="measured speed", pitch="medium-pitched") is None
    # Words outside their lists stay ("women", "lady", "hers", "leisurely", "faster").
    assert perturb("Two women, a lady; hers is leisurely, faster.", gender="female", speaking_rate="fast speed",
                   pitch="high-pitched") is None
    assert perturb("Raising it, UPWARD.", pitch="high-pitched") == "Lowering it, DOWNWARD."
    # Nothing of the clip's own attributes: the other gender's words are flipped, for a known gender only
    # (their code raises otherwise: the negative is masked).
    assert perturb("He speaks; Himself.", gender="female") == "She speaks; Herself."
    assert perturb("He speaks.", gender="") is None


def test_accent_swaps_within_or_across_groups():
    text = "A speaker with an Indian accent."
    same = {perturb(text, accent="indian", rng=rng(i), p_intra_group=1.0) for i in range(30)}
    other = {perturb(text, accent="indian", rng=rng(i), p_intra_group=0.0) for i in range(30)}
    group = hard_negatives.ACCENT_GROUPS["other english"]
    words = lambda outs: {o.removeprefix("A speaker with an ").removesuffix(" accent.").lower() for o in outs}
    assert words(same) <= set(group) - {"indian"} and len(words(same)) > 2
    assert not words(other) & set(group) and len(words(other)) > 5


def test_tag_swaps_use_the_clips_tags_only():
    out = perturb("A raspy voice, happy and bright.", intrinsic_tags=("raspy",), situational_tags=())
    assert out in {"A smooth voice, happy and bright.", "A silky voice, happy and bright."}
    out = perturb("A raspy voice, happy and bright.", situational_tags=("happy",))
    assert out in {f"A raspy voice, {w} and bright." for w in ("sad", "saddened", "angry", "pained", "guilty")}
    assert perturb("A raspy voice.", intrinsic_tags=("smooth",)) is None
    # Their tag words and word forms; tags and accents are looked up as given (no case folding).
    assert perturb("Vocal-fry and punctuated.", intrinsic_tags=("vocal-fry",)) == "Smoothness and punctuated."
    assert perturb("Punctuated speech.", intrinsic_tags=("punctuated",)) == "Flowing speech."
    assert perturb("Full of guilt.", situational_tags=("guilt",)) == "Full of happiness."
    assert perturb("An upbeat voice.", intrinsic_tags=("upbeat",)) in {"An monotonous voice.", "An monotone voice."}
    assert perturb("A raspy voice.", intrinsic_tags=("Raspy",)) is None
    assert perturb("An Indian accent.", accent="Indian") is None
    assert hard_negatives.INTRINSIC_TABLE["booming"] == ("hushed", "hushedly", "soft", "softly")
    assert hard_negatives.SITUATIONAL_TABLE["calm"] == ("angry", "scared", "anxious", "confused")


def test_each_attribute_gets_picked():
    text = "A high-pitched woman speaks quickly with an American accent, raspy and happy."
    outs = {perturb(text, gender="female", speaking_rate="fast speed", pitch="high-pitched", accent="american",
                    intrinsic_tags=("raspy",), situational_tags=("happy",), rng=rng(i)) for i in range(80)}
    changed = {next(w for w, v in zip(text.split(), o.split()) if w != v) for o in outs}
    assert changed == {"high-pitched", "woman", "quickly", "American", "raspy", "happy."}
