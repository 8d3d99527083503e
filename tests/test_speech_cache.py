"""The speech-state cache: a clip's cached frame average is the frozen tower's eval forward, found again at
any padded length without recomputing; the step on cached states embeds as the step on audio does in eval
mode and trains the heads, leaving the tower as it was."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from clsp_jax.features import fbank
from clsp_jax.train import speech_cache
from clsp_jax.train.speech_cache import SpeechStateCache, check_cacheable
from clsp_jax.train.state import init_state
from clsp_jax.train.step import embed_batch, make_train_step
from train_fixtures import minilm_vocab_net, tone_batch


@pytest.fixture(scope="module")
def net():
    return minilm_vocab_net()


def test_states_are_the_eval_forward_and_are_found_at_any_padding(net, monkeypatch):
    batch = tone_batch(3, 1)  # clips 1 and 2 end before the padded length
    cache = SpeechStateCache(net.speech)
    states = cache(batch["audio"], batch["audio_lens"])
    feats, feat_lens = fbank(batch["audio"], batch["audio_lens"])
    np.testing.assert_allclose(states, np.asarray(net.pooled_audio(feats, feat_lens)), rtol=1e-5, atol=1e-6)
    assert states.shape == (3, net.speech.output_dim) and len(cache) == 3

    # Clip 1 padded to a longer batch, beside clip 0: both found, nothing computed.
    n = int(batch["audio_lens"][1])
    longer = np.zeros((2, batch["audio"].shape[1] + 1600), np.float32)
    longer[0, :n], longer[1, : batch["audio"].shape[1]] = batch["audio"][1, :n], batch["audio"][0]
    monkeypatch.setattr(speech_cache, "_pooled", lambda *a: pytest.fail("a cached clip was computed again"))
    again = cache(longer, np.array([n, batch["audio_lens"][0]], np.int32))
    np.testing.assert_array_equal(again, states[[1, 0]])


def test_the_step_on_cached_states(net):
    batch = tone_batch(3, 2)
    cache = SpeechStateCache(net.speech)
    cached = {"speech_states": cache(batch["audio"], batch["audio_lens"]),
              **{k: batch[k] for k in ("input_ids", "attention_mask")}}
    (a1, t1), (a2, t2) = embed_batch(net, batch), embed_batch(net, cached)  # eval mode
    np.testing.assert_allclose(np.asarray(a2), np.asarray(a1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(t2), np.asarray(t1))

    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.adam(1e-3)
    step = jax.jit(make_train_step(graphdef, rest, tx, lambda s: 1e-3, objective="multi_positive", loss_cfg={},
                                   frozen=[r"^speech/"]))
    state, metrics = step(init_state(net, tx), cached)
    assert np.isfinite(float(metrics["loss"]))
    before, after = nnx.to_pure_dict(params), state["params"]
    for a, b in zip(jax.tree.leaves(before["speech"]), jax.tree.leaves(after["speech"])):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(before["audio_projection"]), jax.tree.leaves(after["audio_projection"]))]
    assert all(moved)


def test_only_a_frozen_tower_is_cached():
    paths = ["speech/encoder/w", "speech/embed/b", "audio_projection/linear/kernel"]
    check_cacheable(paths, [r"^speech/"])
    with pytest.raises(ValueError, match="speech/embed/b"):
        check_cacheable(paths, [r"^speech/encoder/"])
    with pytest.raises(ValueError, match="no speech parameters"):
        check_cacheable(paths[2:], [r"^speech/"])
