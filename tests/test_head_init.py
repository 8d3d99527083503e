"""Data-dependent audio-head initialisation: the fold is exact and uses the pooled features' statistics."""

import copy

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsp_jax.features import fbank
from clsp_jax.models.clsp import CLSPNet, fold_input_standardization
from clsp_jax.train.head_init import standardize_audio_head
from train_fixtures import small_model_config, tone_batch


def test_fold_input_standardization_is_exact():
    layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.arange(3.0)
    before = copy.deepcopy(layer)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    mean, std = rng.normal(size=5), rng.uniform(0.5, 2.0, size=5)
    fold_input_standardization(layer, mean, std)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(before((x - mean) / std)), atol=1e-5)


def test_standardize_audio_head_uses_batches_of_one_shape():
    net = CLSPNet(small_model_config(dropout=False), rngs=nnx.Rngs(0))
    before = copy.deepcopy(net.audio_projection["0"])
    batches = [tone_batch(3, 1, seed=0), tone_batch(2, 1, seconds=0.6), tone_batch(3, 1, seed=1, padded=False)]
    stats = standardize_audio_head(net, iter([{k: jnp.asarray(v) for k, v in b.items()} for b in batches]), 2)
    used = [batches[0], batches[2]]  # the 0.6 s batch has another shape and is skipped
    pooled = np.concatenate([np.asarray(net.pooled_audio(*fbank(jnp.asarray(b["audio"]), jnp.asarray(b["audio_lens"]))))
                             for b in used])
    np.testing.assert_allclose(stats["mean"], pooled.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["std"], np.maximum(pooled.std(0), 1e-3 * pooled.std(0).max()), rtol=1e-3,
                               atol=1e-5)
    # The head now computes on standardised inputs what it computed before on raw ones.
    standardised = (pooled - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(np.asarray(net.audio_projection["0"](jnp.asarray(pooled))),
                               np.asarray(before(jnp.asarray(standardised))), atol=1e-4)
    assert abs(standardised.mean(0)).max() < 1e-3
