"""Zipformer training regularisers (clsp_jax.models.regularisers and their sites in the speech tower).

Gradients are compared with tests/fixtures/zipformer_regularisers.npz: icefall's own `scaling.py` modules
(Balancer and Whiten forced to act with prob 1, ScaleGrad, LimitParamValue, penalize_abs_values_gt) run in
PyTorch on fixed float32 inputs x with a fixed upstream gradient g, recording d(sum(g * op(x)))/dx (see
tests/fixtures/README.md). Random choices (which sequences skip a layer, when a balancer acts) use our own
keys, so they are checked by their statistics and structure.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clsp_jax.models import regularisers as R
from clsp_jax.models.zipformer import (BypassModule, ConvNeXt, SpeechEncoder, ZipformerConfig, Zipformer2EncoderLayer,
                                       layer_skip_rate)

REF = np.load(Path(__file__).parent / "fixtures" / "zipformer_regularisers.npz")
META = json.loads(str(REF["meta"]))
ON, OFF = jnp.bool_(True), jnp.bool_(False)


def _vjp(op, x, g):
    """(op(x), d(sum(g * op(x)))/dx) as numpy (jitted: one compilation instead of one per eager op)."""

    @jax.jit
    def run(x, g):
        y, pull = jax.vjp(op, x)
        return y, pull(g)[0]

    return tuple(map(np.asarray, run(jnp.asarray(x), jnp.asarray(g))))


def _check_against_reference(prefix, op):
    x, g, ref = REF[prefix + "x"], REF[prefix + "g"], REF[prefix + "dx"]
    y, dx = _vjp(op, x, g)
    np.testing.assert_array_equal(y, x)  # forward is the identity
    assert np.max(np.abs(dx - ref)) <= 1e-5 * np.max(np.abs(ref))
    return x, g, dx


@pytest.mark.parametrize("name", ["default_max1", "ff_hidden", "keys"])
def test_balancer_matches_icefall(name):
    limits = R.BalancerLimits.from_proportions(**META[f"balancer/{name}"])
    x, g, dx = _check_against_reference(f"balancer/{name}/", lambda x: R.balancer(x, ON, limits))
    assert np.max(np.abs(dx - g)) > 1e-2 * np.max(np.abs(g))  # the inputs do violate the limits
    np.testing.assert_array_equal(_vjp(lambda x: R.balancer(x, OFF, limits), x, g)[1], g)


@pytest.mark.parametrize("name", ["groups1", "groups4", "under_limit"])
def test_whiten_matches_icefall(name):
    m = META[f"whiten/{name}"]
    limits = R.WhitenLimits(m["num_groups"], m["whitening_limit"], m["grad_scale"])
    prefix = f"whiten/{name}/"
    metric = R.whitening_metric(jnp.asarray(REF[prefix + "x"]), m["num_groups"])
    np.testing.assert_allclose(metric, REF[prefix + "metric"], rtol=1e-5)
    x, g, dx = _check_against_reference(prefix, lambda x: R.whiten(x, ON, limits))
    assert (np.max(np.abs(dx - g)) > 0) == (float(metric) > m["whitening_limit"])
    np.testing.assert_array_equal(_vjp(lambda x: R.whiten(x, OFF, limits), x, g)[1], g)


def test_scale_grad_limit_param_value_penalize_match_icefall():
    _check_against_reference("scale_grad/", lambda x: R.scale_grad(x, META["scale_grad"]["alpha"]))
    lo, hi = META["limit_param_value"]["min"], META["limit_param_value"]["max"]
    x, g, dx = _check_against_reference("limit_param_value/", lambda x: R.limit_param_value(x, ON, lo, hi))
    assert np.sum(dx != g) > 0
    np.testing.assert_array_equal(_vjp(lambda x: R.limit_param_value(x, OFF, lo, hi), x, g)[1], g)
    limit, penalty = META["penalize"]["limit"], META["penalize"]["penalty"]
    x, g, dx = _check_against_reference("penalize/", lambda x: R.penalize_abs_values_gt(x, ON, limit, penalty))
    assert np.sum(dx != g) > 0
    np.testing.assert_array_equal(_vjp(lambda x: R.penalize_abs_values_gt(x, OFF, limit, penalty), x, g)[1], g)


def test_sites_are_identity_without_rngs_and_act_with_their_probability():
    x, g = jnp.asarray(REF["balancer/ff_hidden/x"]), jnp.asarray(REF["balancer/ff_hidden/g"])
    site = R.Balancer(0.3, 1.0, 0.75, 5.0, prob=0.25)
    assert site(x, None) is x

    @jax.jit
    @jax.vmap
    def changed(key):
        _, pull = jax.vjp(lambda x: site(x, R.Draws(nnx.Rngs(dropout=key))), x)
        return jnp.any(pull(g)[0] != g)

    n = 800
    count = int(jnp.sum(changed(jax.random.split(jax.random.key(0), n))))
    assert abs(count - n * site.prob) < 4 * math.sqrt(n * site.prob * (1 - site.prob))


def test_layer_skip_rates_are_the_authors():
    assert [round(layer_skip_rate(d), 4) for d in (1, 2, 4, 8)] == [0.035, 0.0495, 0.07, 0.099]


def test_bypass_skips_whole_sequences_at_its_rate_and_never_in_eval():
    bypass = BypassModule(3, skip_rate=0.099)
    b = 4000
    src_orig = jax.random.normal(jax.random.key(1), (b, 2, 3))
    src = src_orig + 1.0
    mixed = np.asarray(bypass(src_orig, src))  # eval: src_orig + 0.5 (src - src_orig) everywhere
    np.testing.assert_allclose(mixed, np.asarray(src_orig) + 0.5, rtol=1e-6)
    out = np.asarray(bypass(src_orig, src, R.Draws(nnx.Rngs(dropout=2))))
    skipped = np.all(out == np.asarray(src_orig), axis=(1, 2))
    np.testing.assert_array_equal(out[~skipped], mixed[~skipped])
    expected = b * bypass.skip_rate
    assert abs(skipped.sum() - expected) < 4 * math.sqrt(expected * (1 - bypass.skip_rate))


def test_convnext_layerdrop_rate_and_identity_forward():
    block = nnx.jit(lambda: ConvNeXt(4, rngs=nnx.Rngs(0)))()
    block.pointwise_conv2.kernel[...] *= 100.0  # a residual branch as large as its input
    x = jax.random.normal(jax.random.key(3), (500, 3, 3, 4))

    @jax.jit
    def dropped(key):
        out, ref = block(x, R.Draws(nnx.Rngs(dropout=key))), block(x)
        same_as_eval = jnp.all(jnp.abs(out - ref) <= 1e-5 * jnp.abs(ref), axis=(1, 2, 3))
        is_input = jnp.all(out == x, axis=(1, 2, 3))
        return same_as_eval, is_input

    total = 0
    for i in range(8):
        same_as_eval, is_input = map(np.asarray, dropped(jax.random.key(10 + i)))
        assert np.all(same_as_eval ^ is_input)  # each sequence: the eval output, or dropped (the input)
        total += is_input.sum()
    expected = 8 * 500 * 0.015
    assert abs(total - expected) < 4 * math.sqrt(expected)


def test_layer_training_forward_is_eval_forward_or_its_input():
    """With dropout 0 the only forward effect of the regularisers is per-sequence skipping."""
    dims = dict(embed_dim=16, pos_dim=8, num_heads=2, query_head_dim=4, pos_head_dim=2, value_head_dim=4,
                feedforward_dim=32, cnn_module_kernel=3, dropout=0.0)
    # built under jit: one compilation instead of one per eager initialiser
    layer = nnx.jit(lambda: Zipformer2EncoderLayer(**dims, rngs=nnx.Rngs(0), regularisers=True, skip_rate=0.5))()
    src = jax.random.normal(jax.random.key(4), (16, 6, 16))
    pos = jax.random.normal(jax.random.key(5), (11, 8))
    valid = jnp.ones((16, 6), bool)
    out, ref = map(np.asarray, nnx.jit(lambda m: (m(src, pos, valid, rngs=nnx.Rngs(dropout=6)),
                                                  m(src, pos, valid)))(layer))
    is_input = np.all(out == np.asarray(src), axis=(1, 2))
    np.testing.assert_allclose(out[~is_input], ref[~is_input], rtol=1e-6, atol=1e-6)
    assert 0 < is_input.sum() < len(is_input)


MICRO = dict(feature_dim=16, downsampling_factor=[1, 2], num_encoder_layers=[1], encoder_dim=[8, 12],
             encoder_unmasked_dim=[8, 12], query_head_dim=[4], pos_head_dim=[2], value_head_dim=[4], pos_dim=4,
             num_heads=[2], feedforward_dim=[16], cnn_module_kernel=[3], output_downsampling_factor=2,
             subsampling_channels=[2, 4, 4], dropout=0.0)


def _custom_vjp_count(jaxpr) -> int:
    """Custom-VJP calls in a jaxpr, nested jaxprs (pjit, cond, ...) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name.startswith("custom_vjp")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    n += _custom_vjp_count(getattr(sub, "jaxpr", sub))
    return n


def test_every_site_is_wired_in_training_only():
    """Counts the custom-VJP ops that regularisers add to the traced tower: 29 per layer, 9 in the front end,
    one per downsampled stack's out_combiner; none in eval mode. (The convolutions are custom-VJP ops of
    their own, `clsp_jax.models.convs`: the same in every mode.)"""
    feats, lens = jnp.zeros((2, 40, 16)), jnp.array([40, 30])

    def count(cfg, train):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0))))

        def forward(state, key):
            rngs = nnx.Rngs(dropout=key) if train else None
            return nnx.merge(graphdef, state)(feats, lens, deterministic=not train, rngs=rngs)

        return _custom_vjp_count(jax.make_jaxpr(forward)(state, jax.random.key(0)).jaxpr)

    on = dict(MICRO, regularisers=True)
    convolutions = count(MICRO, train=True)
    assert convolutions == 3 + 1 + 2 * 2  # Conv2dSubsampling's 3x3s and depthwise 7x7, 2 conv modules per layer
    assert count(on, train=True) == convolutions + 29 * 2 + 9 + 1
    assert count(on, train=False) == count(MICRO, train=False) == convolutions


def test_eval_forward_is_the_same_program_with_regularisers_on():
    """Eval mode traces to the same jaxpr with and without regularisers (so the fixture tests, which run
    without them, cover both)."""
    feats, lens = jnp.zeros((2, 40, 16)), jnp.array([40, 30])

    def eval_jaxpr(cfg):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0))))
        return str(jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(feats, lens))(state))

    assert eval_jaxpr(dict(MICRO, regularisers=True)) == eval_jaxpr(MICRO)


def test_config_key():
    assert ZipformerConfig.from_mapping(MICRO).regularisers is False
    assert ZipformerConfig.from_mapping(dict(MICRO, regularisers=True)).regularisers is True
    with pytest.raises(ValueError, match="'regularisers' must be true or false"):
        ZipformerConfig.from_mapping(dict(MICRO, regularisers="yes"))
