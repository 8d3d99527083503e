"""Speech tower parity with the authors' PyTorch Conv2dSubsampling + Zipformer2 (eval mode), and its contract."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clsp_jax.convert import load_torch_state
from clsp_jax.models.zipformer import (SpeechEncoder, ZipformerConfig, rel_to_abs, speech_param_count, swoosh_l,
                                       swoosh_r)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = ["clsp_spear_tiny", "clsp_varied_tiny"]

# Two small stacks (the second downsampled and wider) for the cheap behaviour tests.
MINI = dict(
    feature_dim=80,
    downsampling_factor=[1, 2],
    num_encoder_layers=[1],
    encoder_dim=[32, 48],
    encoder_unmasked_dim=[16, 32],
    query_head_dim=[8],
    pos_head_dim=[4],
    value_head_dim=[6],
    pos_dim=16,
    num_heads=[2],
    feedforward_dim=[64],
    cnn_module_kernel=[7, 5],
    output_downsampling_factor=2,
)

SPEAR_XLARGE = dict(
    feature_dim=128,
    downsampling_factor=[1, 2, 4, 8, 4, 2, 1],
    num_encoder_layers=[1, 2, 3, 4, 1, 1, 1],
    encoder_dim=[1280],
    encoder_unmasked_dim=[768],
    query_head_dim=[32],
    pos_head_dim=[4],
    value_head_dim=[12],
    pos_dim=48,
    num_heads=[8],
    feedforward_dim=[3840],
    cnn_module_kernel=[31, 31, 15, 15, 15, 31, 31],
    output_downsampling_factor=2,
)


def _jit_forward(model):
    """Tree-mode jit: (state, features, lens) -> (embed_out, embed_lens, frames, frame_lens)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, features, lens):
        m = nnx.merge(graphdef, state)
        e, el = m.embed(features, lens)
        y, yl = m(features, lens)
        return e, el, y, yl

    return lambda features, lens: run(state, features, lens)


@functools.lru_cache(maxsize=None)
def _reference(name):
    data = np.load(FIXTURES / f"{name}.npz")
    cfg = json.loads(str(data["config"]))["speech"]
    # Parameters only live in the module state, so the checkpoint loads into an abstract model: no init.
    model = nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0)))
    prefix = "state_dict/"
    state = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix + "encoder")}
    load_torch_state(model, state)
    forward = _jit_forward(model)
    ours = forward(data["inputs/features"], data["inputs/feature_lens"])
    return data, cfg, state, forward, [np.asarray(x) for x in ours]


def _max_err_valid(ours, ref, lens):
    return max(float(np.abs(ours[i, :n] - ref[i, :n]).max()) for i, n in enumerate(lens))


@pytest.mark.parametrize("name", REFERENCES)
def test_embed_matches_reference(name):
    data, _, _, _, (embed, embed_lens, _, _) = _reference(name)
    ref, ref_lens = data["outputs/embed_out"], data["outputs/embed_out_lens"]
    np.testing.assert_array_equal(embed_lens, ref_lens)
    assert embed.shape == ref.shape
    err = _max_err_valid(embed, ref, ref_lens)
    assert err <= 1e-3 * max(1.0, float(np.abs(ref).max())), err  # measured ~1e-5


@pytest.mark.parametrize("name", REFERENCES)
def test_encoder_matches_reference(name):
    data, _, _, _, (_, _, frames, frame_lens) = _reference(name)
    ref, ref_lens = data["outputs/encoder_out"], data["outputs/encoder_out_lens"]
    np.testing.assert_array_equal(frame_lens, ref_lens)
    np.testing.assert_array_equal(ref_lens, [99, 63, 36])
    assert frames.shape == ref.shape
    err = _max_err_valid(frames, ref, ref_lens)
    assert err <= 1e-3 * max(1.0, float(np.abs(ref).max())), err  # measured ~7e-6
    for i, n in enumerate(frame_lens):
        assert not np.any(frames[i, n:]), "frames past the length must be zero"


def test_padding_invariance():
    """Utterance 1 (257 frames) alone in a shorter tensor gives the same valid frames as in the batch."""
    data, _, _, forward, (embed, _, frames, frame_lens) = _reference("clsp_spear_tiny")
    features = data["inputs/features"][1:2, :300]
    e, el, y, yl = (np.asarray(x) for x in forward(features, np.array([257])))
    assert int(yl[0]) == int(frame_lens[1]) == 63
    np.testing.assert_allclose(e[0, : int(el[0])], embed[1, : int(el[0])], atol=1e-4)
    np.testing.assert_allclose(y[0, :63], frames[1, :63], atol=1e-4)
    assert y.shape[1] == (((300 - 7) // 2) + 1) // 2


def test_full_size_param_count():
    """SPEAR-XLarge speech tower (no heads), built abstractly."""
    assert speech_param_count(SPEAR_XLARGE) == 596_973_236


def _fill_random(model, seed):
    """Random parameters from numpy: a real init compiles one tiny program per shape (~10 s here)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "kernel":  # torch-default scale
            bound = 1.0 / np.sqrt(np.prod(var.shape[:-1]))
            value = rng.uniform(-bound, bound, var.shape)
        else:  # biases, norm scales, bypass scales
            value = rng.uniform(0.2, 0.8, var.shape)
        var.value = jnp.asarray(value, var.dtype)


@functools.lru_cache(maxsize=None)
def _mini():
    """A randomly initialised MINI model, inputs (one padded), and its jitted eval forward."""
    model = nnx.eval_shape(lambda: SpeechEncoder(MINI, rngs=nnx.Rngs(0)))
    _fill_random(model, seed=1)
    features = jax.random.normal(jax.random.key(0), (2, 60, MINI["feature_dim"]))
    lens = jnp.array([60, 43])
    return model, features, lens, _EVAL(model, features, lens)


_EVAL = nnx.jit(lambda m, f, n: m(f, n))


def test_jit_matches_eager_and_shapes():
    model, features, lens, (y_jit, l_jit) = _mini()
    y_eager, l_eager = model(features, lens)
    assert y_eager.shape == (2, 13, 48) and model.output_dim == 48
    np.testing.assert_array_equal(l_eager, [13, 9])  # 60 -> 26 -> 13 and 43 -> 18 -> 9
    np.testing.assert_array_equal(l_jit, l_eager)
    np.testing.assert_allclose(y_jit, y_eager, atol=1e-5)


def test_bf16_close_to_float32():
    model, features, lens, (ref, _) = _mini()
    model_bf16 = nnx.eval_shape(lambda: SpeechEncoder(MINI, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(model_bf16, nnx.state(model, nnx.Param))
    got, _ = _EVAL(model_bf16, features, lens)
    assert got.dtype == jnp.float32  # the residual stream stays float32, as under torch autocast
    rel_rms = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref**2)))
    assert rel_rms < 2e-2, rel_rms


def test_dropout_only_in_training():
    model, features, lens, (eval_out, _) = _mini()
    train = nnx.jit(lambda m, f, n, key: m(f, n, deterministic=False, rngs=nnx.Rngs(dropout=key))[0])
    train1, train1_again, train2 = (train(model, features, lens, jax.random.key(k)) for k in (0, 0, 1))
    assert bool(jnp.all(jnp.isfinite(train1)))
    assert float(jnp.abs(train1 - eval_out).max()) > 1e-3
    assert float(jnp.abs(train1 - train2).max()) > 1e-3
    np.testing.assert_array_equal(train1, train1_again)
    with pytest.raises(ValueError, match="rngs"):
        model(features, lens, deterministic=False)


def test_rel_to_abs_indexes_key_minus_query_offsets():
    t = 5
    # scores[i, n] = 100 * i + (n - (t - 1)): the relative offset is readable from the value.
    scores = 100 * np.arange(t)[:, None] + (np.arange(2 * t - 1)[None, :] - (t - 1))
    out = np.asarray(rel_to_abs(jnp.asarray(scores)))
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    np.testing.assert_array_equal(out, 100 * i + (j - i))
    np.testing.assert_array_equal(np.asarray(rel_to_abs(jnp.ones((1, 1)))), [[1.0]])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(encoder_dim=[32, 48, 64]), "encoder_dim"),
        (dict(num_heads=[2, 2, 2]), "num_heads"),
        (dict(encoder_unmasked_dim=[40, 32]), "encoder_unmasked_dim"),
        (dict(cnn_module_kernel=[8]), "odd"),
        (dict(pos_dim=15), "pos_dim"),
        (dict(output_downsampling_factor=4), "output_downsampling_factor"),
        (dict(feature_dim=6), "feature_dim"),
        (dict(downsampling_factor=[1, 0]), "downsampling_factor"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_encoder_layers=["x"]), "num_encoder_layers"),
        (dict(subsampling_channels=[8, 32]), "subsampling_channels"),
        (dict(subsampling_channels=[8, 0, 32]), "subsampling_channels"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ZipformerConfig.from_mapping(dict(MINI, **change))


def test_config_missing_key_and_shared_values():
    cfg = dict(MINI)
    del cfg["pos_dim"]
    with pytest.raises(ValueError, match="pos_dim"):
        ZipformerConfig.from_mapping(cfg)
    parsed = ZipformerConfig.from_mapping(dict(MINI, joint_dim=512, downsampling_factor="1,2"))
    assert parsed.num_heads == (2, 2) and parsed.downsampling_factor == (1, 2) and parsed.dropout == 0.1
    assert parsed.subsampling_channels == (8, 32, 128)  # icefall's Conv2dSubsampling widths


def test_subsampling_channels_set_the_front_end_widths():
    model = SpeechEncoder(dict(MINI, subsampling_channels=(4, 8, 16)), rngs=nnx.Rngs(0))
    embed = model.encoder_embed
    assert embed.conv["0"].kernel.shape[-1] == 4 and embed.conv["7"].kernel.shape[-2:] == (8, 16)
    assert embed.out.kernel.shape == (embed.out_width * 16, MINI["encoder_dim"][0])
    out, lens = model(jnp.ones((2, 60, 80)), jnp.array([60, 40]))
    assert out.shape == (2, 13, 48) and lens.tolist() == [13, 8] and bool(jnp.isfinite(out).all())


def test_input_errors():
    model = nnx.eval_shape(lambda: SpeechEncoder(MINI, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="features must be"):
        model(jnp.zeros((2, 60, 81)), jnp.array([60, 60]))
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(jnp.zeros((2, 8, 80)), jnp.array([8, 8]))
    with pytest.raises(ValueError, match="feature_lens"):
        model(jnp.zeros((2, 60, 80)), jnp.array([60]))


@pytest.mark.parametrize("swoosh, shift, offset", [(swoosh_l, 4.0, 0.035), (swoosh_r, 1.0, 0.313261687)])
def test_swoosh_derivative_and_what_its_backward_keeps(swoosh, shift, offset):
    """Value, gradient and forward-mode derivative equal autodiff of the formula; after a matmul, the backward
    keeps two arrays of the hidden size (the slope and the activation, which the next matmul's weight gradient
    reads) where autodiff of softplus kept three."""
    formula = lambda x: jax.nn.softplus(x - shift) - 0.08 * x - offset
    x = jnp.linspace(-30.0, 30.0, 601)
    np.testing.assert_allclose(swoosh(x), formula(x), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(swoosh))(x), jax.vmap(jax.grad(formula))(x), atol=1e-6)
    np.testing.assert_allclose(jax.jvp(swoosh, (x,), (jnp.ones_like(x),))[1], jax.vmap(jax.grad(formula))(x),
                               atol=1e-6)
    w, h = jnp.ones((8, 16)), jnp.ones((5, 8))
    kept = lambda act: [leaf.shape for leaf in jax.tree.leaves(jax.vjp(lambda h, w: act(h @ w) @ w.T, h, w)[1])]
    assert kept(swoosh).count((5, 16)) == 2 and kept(formula).count((5, 16)) == 3
