"""The train step on cached text states: equal to the step on tokens, and its non-finite guard."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train.step import init_state, make_train_step
from clsp_jax.train.text_cache import TextStateCache, cached_text_states
from eval_fixtures import TOKENIZER
from train_fixtures import minilm_vocab_net, tone_batch

CAPTIONS = ["A man speaks quickly in a low voice.", "Loud and high-pitched.",
            "A woman with a Scottish accent talks slowly, quietly and with a lively melody, then speeds up."]
FROZEN = [r"^text_encoder/(embeddings|encoder)/"]


@pytest.fixture(scope="module")
def setup():
    """(net, its params, optimizer, jitted stage-2 step with the text encoder frozen, token batch, state batch)."""
    net = minilm_vocab_net()
    tok = CaptionTokenizer(TOKENIZER, buckets=(16,))
    audio = tone_batch(3, 2)
    texts = [CAPTIONS[(k + i) % 3] for k in range(2) for i in range(3)]  # k-major rows, as the pipeline emits
    tokens = tok(texts, length=16)
    cache = TextStateCache.build(net.text_encoder, tok, CAPTIONS, length=16)
    common = {"audio": audio["audio"], "audio_lens": audio["audio_lens"]}
    token_batch = {**common, **{k: tokens[k].reshape(2, 3, -1).transpose(1, 0, 2)
                                for k in ("input_ids", "attention_mask")}}
    state_batch = {**common, "text_states": cached_text_states({"audio": audio["audio"], **tokens}, cache, 2)}
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.adam(1e-3)
    step = jax.jit(make_train_step(graphdef, rest, tx, lambda s: 1e-3, dict(objective="multi_positive",
                                                                           frozen=FROZEN)))
    return net, params, tx, step, token_batch, state_batch


def test_the_cached_step_equals_the_token_step(setup):
    """Stage 2 with the text encoder frozen and dropout off: same loss, same updated parameters."""
    net, params, tx, step, token_batch, state_batch = setup
    s1, m1 = step(init_state(net, tx), token_batch)
    s2, m2 = step(init_state(net, tx), state_batch)
    assert np.isfinite(float(m1["loss"]))
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    changed = 0
    for a, b, before in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
        changed += not np.array_equal(np.asarray(a), np.asarray(before))
    assert changed > 10  # the step trained something


def test_a_non_finite_loss_skips_the_update_and_counts_the_streak(setup):
    net, _, tx, step, _, good = setup
    bad = {**good, "audio": good["audio"].copy()}
    bad["audio"][1, 100] = np.nan
    after_good, metrics = step(init_state(net, tx), good)
    assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
    before = jax.tree.map(np.asarray, after_good)
    skipped, metrics = step(after_good, bad)
    skipped2, metrics2 = step(skipped, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["nonfinite"]) == int(metrics2["nonfinite"]) == 1
    assert int(skipped2["nonfinite_streak"]) == 2 and int(skipped2["step"]) == 3
    for key in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(skipped2[key]), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(np.asarray(x), y)
    recovered, metrics = step(skipped2, good)
    assert int(metrics["nonfinite"]) == 0 and int(recovered["nonfinite_streak"]) == 0
