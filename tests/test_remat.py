"""Per-layer rematerialisation changes memory only: loss and gradients equal those without it.

A Zipformer2 stack and the text tower, train mode (dropout on, same keys), the fixture's widths; each policy
is really applied (the jaxpr holds one checkpointed call per layer).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clsp_jax.models.remat import REMAT_POLICIES, check_remat
from clsp_jax.models.text import TextEncoder
from clsp_jax.models.zipformer import Zipformer2Encoder, length_mask

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "clsp_spear_tiny.npz")
CONFIG = json.loads(str(np.load(FIXTURE)["config"]))
# One Zipformer2 stack of the fixture's widths (64 channels, 4 heads, kernel 31).
STACK = dict(num_layers=2, pos_dim=16, embed_dim=64, num_heads=4, query_head_dim=8, pos_head_dim=4,
             value_head_dim=6, feedforward_dim=128, cnn_module_kernel=31, dropout=0.1)
TEXT = dict(CONFIG["text"], initializer_range=0.02)
LAYERS = {"speech": STACK["num_layers"], "text": TEXT["num_hidden_layers"]}


def _speech_loss(remat):
    model = Zipformer2Encoder(**STACK, rngs=nnx.Rngs(0), remat=remat)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 64)), jnp.float32)
    valid = length_mask(jnp.asarray([40, 27]), 40)

    def loss(model):
        y = model(x, valid, rngs=nnx.Rngs(dropout=jax.random.key(1)))
        return jnp.sum(jnp.where(valid[..., None], jnp.sin(y), 0.0))

    return model, loss


def _text_loss(remat):
    model = TextEncoder(TEXT, rngs=nnx.Rngs(0), remat=remat)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (3, 10)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 7:].set(0)

    def loss(model):
        pooled = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(1)))
        return jnp.sum(jnp.sin(3 * pooled))

    return model, loss


TOWERS = {"speech": _speech_loss, "text": _text_loss}


def _pure_value_and_grad(tower, remat):
    """(value_and_grad of the tower's loss as a function of its params, params)."""
    model, loss = TOWERS[tower](remat)
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.value_and_grad(lambda params: loss(nnx.merge(graphdef, params))), params


@pytest.mark.parametrize("remat", ["none", "layer", "layer_save_dots"])
@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_remat_wraps_each_layer(tower, remat):
    fn, params = _pure_value_and_grad(tower, remat)
    assert str(jax.make_jaxpr(fn)(params)).count("remat2[") == (0 if remat == "none" else LAYERS[tower])


# One policy per tower keeps the file fast (XLA:CPU compiles each variant for ~8 s); both go through the same
# `remat_layer_call`.
@pytest.mark.parametrize("tower, remat", [("speech", "layer_save_dots"), ("text", "layer")])
def test_remat_keeps_loss_and_gradients(tower, remat):
    (want_value, want_grads), (value, grads) = [jax.jit(fn)(params) for fn, params in
                                                (_pure_value_and_grad(tower, r) for r in ("none", remat))]
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    want_grads, grads = jax.tree.leaves(want_grads), jax.tree.leaves(grads)
    scale = max(float(jnp.max(jnp.abs(g))) for g in want_grads)
    assert max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(grads, want_grads)) <= 1e-6 * scale


def test_unknown_remat_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="remat 'layers'"):
        check_remat("layers")
    with pytest.raises(ValueError, match="choose from"):
        TextEncoder(TEXT, rngs=nnx.Rngs(0), remat="everything")
    assert set(REMAT_POLICIES) == {"none", "layer", "layer_save_dots"}
