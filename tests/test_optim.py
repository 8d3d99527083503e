"""Optimizer, schedules, clamp and EMA (clsp_jax.optim, clsp_jax.optim_config) against hand-computed numbers."""

import collections
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from clsp_jax import optim, optim_config, sharding
from clsp_jax.models.clsp import CLSPNet

TOWER = optim_config.ENCODER_LR_SCALE


class _Linear(nnx.Module):
    def __init__(self, din, dout, seed):
        key = jax.random.key(seed)
        self.kernel = nnx.Param(jax.random.normal(key, (din, dout)))
        self.bias = nnx.Param(jnp.full((dout,), 0.5))


class _Toy(nnx.Module):
    """Same path shapes as CLSPNet: towers under speech/ and text_encoder/, heads, logit_scale."""

    def __init__(self):
        self.speech = nnx.Dict({"encoder_embed": _Linear(3, 4, 0),
                                "encoder": nnx.Dict({"layers": nnx.List([_Linear(4, 4, 1), _Linear(4, 4, 2)])})})
        self.text_encoder = nnx.Dict({"embeddings": nnx.Dict({"word_embeddings": nnx.Dict(
            {"embedding": nnx.Param(jnp.ones((5, 4)))})}), "pooler": _Linear(4, 4, 3)})
        self.audio_projection = nnx.Dict({"0": _Linear(4, 2, 4)})
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07)))


def _params():
    return nnx.state(_Toy(), nnx.Param)


def _flat(tree):
    return {sharding.path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _cfg(**kw):
    cfg = dict(schedule="constant", base_lr=1e-3, weight_decay=0.0, clip_norm=None)
    cfg.update(kw)
    return cfg


# ---------------------------------------------------------------- schedules


def _icefall_eden_lrs(base_lr, lr_batches, lr_epochs, warmup_batches, warmup_start, steps_per_epoch, epochs):
    """Independent transcription of icefall's loop: step_epoch(epoch-1) per epoch, then per batch
    batch_idx_train += 1; step_batch(batch_idx_train); optimizer.step() with that LR."""
    lrs, batch_idx_train = [], 0
    for epoch in range(1, epochs + 1):
        e = epoch - 1
        for _ in range(steps_per_epoch):
            batch_idx_train += 1
            b = batch_idx_train
            factor = ((b**2 + lr_batches**2) / lr_batches**2) ** -0.25 * ((e**2 + lr_epochs**2) / lr_epochs**2) ** -0.25
            warm = 1.0 if b >= warmup_batches else warmup_start + (1.0 - warmup_start) * (b / warmup_batches)
            lrs.append(base_lr * factor * warm)
    return np.array(lrs)


def test_eden_matches_icefall_loop_update_by_update():
    cfg = dict(schedule="eden", base_lr=0.045, eden_lr_batches=10.0, eden_lr_epochs=1.5, warmup_steps=5,
               warmup_start=0.5, steps_per_epoch=7)
    ref = _icefall_eden_lrs(0.045, 10.0, 1.5, 5, 0.5, 7, epochs=3)
    ours = np.asarray(jax.vmap(optim.make_schedule(cfg))(jnp.arange(21)))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # By hand: update 0 is icefall batch 1 of epoch 0: 0.045 * (101/100)^-1/4 * (0.5 + 0.5/5).
    np.testing.assert_allclose(ours[0], 0.045 * (101 / 100) ** -0.25 * 0.6, rtol=1e-6)


def test_eden_faithful_numbers():
    sched = optim.make_schedule(dict(optim_config.faithful_optim_config(), steps_per_epoch=1000))
    # count 0 -> batch 1: warmup 0.5 + 0.5/500 = 0.501; decay terms ~1.
    np.testing.assert_allclose(float(sched(0)), 0.045 * 0.501 * (1 + 1e-10) ** -0.25, rtol=1e-6)
    # count 499 -> batch 500 = warmup_batches: warmup done.
    np.testing.assert_allclose(float(sched(499)), 0.045 * ((500**2 + 1e10) / 1e10) ** -0.25, rtol=1e-6)
    # count 1999 -> batch 2000, epoch 1; with lr_batches=1000, lr_epochs=2: 5^-1/4 * 1.25^-1/4 * 0.045.
    cfg = dict(optim_config.faithful_optim_config(), steps_per_epoch=1000, eden_lr_batches=1000.0, eden_lr_epochs=2.0)
    np.testing.assert_allclose(float(optim.make_schedule(cfg)(1999)), 0.0284605, rtol=1e-5)


def test_warmup_cosine_values():
    cfg = dict(schedule="warmup_cosine", base_lr=1e-3, warmup_steps=100, warmup_start=0.1, total_steps=1100,
               min_lr_ratio=0.01)
    sched = optim.make_schedule(cfg)
    floor = 1e-5
    expect = {0: 1e-4, 50: 1e-4 + 0.9e-3 * 0.5, 100: 1e-3,
              350: floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25)),
              600: floor + (1e-3 - floor) * 0.5, 1100: floor, 5000: floor}
    for step, lr in expect.items():
        np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-5, err_msg=f"step {step}")
    assert float(optim.make_schedule(_cfg(base_lr=3e-4))(12345)) == pytest.approx(3e-4)


def test_learning_rates_for_logging():
    cfg = dict(optim_config.faithful_optim_config(), steps_per_epoch=1000)
    lrs = optim.learning_rates(cfg, 10_000)
    head = 0.045 * ((1e8 + 2 * 1e4 + 1 + 1e10) / 1e10) ** -0.25 * ((100 + 1e4) / 1e4) ** -0.25  # batch 10001, epoch 10
    assert lrs["lr"] == pytest.approx(head, rel=1e-6)
    assert lrs["lr/towers"] == pytest.approx(head * 0.02222, rel=1e-6)
    assert lrs["lr/towers"] == pytest.approx(0.001, rel=0.01)  # the recipe's "towers ~0.001"


@pytest.mark.parametrize("bad, match", [
    (dict(nope=1), "unknown optimizer config keys"),
    (dict(schedule="eden"), "steps_per_epoch"),
    (dict(schedule="warmup_cosine", total_steps=None), "total_steps"),
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(warmup_start=1.5), "warmup_start"),
    (dict(frozen=["("]), "bad regex"),
    (dict(param_groups=[{"pattern": "x"}]), "param_groups\\[0\\]"),
])
def test_bad_config_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(dict(_cfg(), **bad), _params())


def test_pattern_matching_nothing_is_a_value_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make_optimizer(_cfg(frozen=[r"^speach/"]), _params())


# ---------------------------------------------------------------- paths and groups


def test_path_str_key_kinds():
    nt = collections.namedtuple("NT", "w")
    tree = {"a": [{"k": 1.0}, (2.0,)], "nt": nt(w=3.0)}
    assert sorted(_flat(tree)) == ["a/0/k", "a/1/0", "nt/w"]
    assert sorted(_flat(_params()))[:2] == ["audio_projection/0/bias", "audio_projection/0/kernel"]
    assert "speech/encoder/layers/1/kernel" in _flat(_params())


def _first_update(cfg, params):
    tx, _ = optim.make_optimizer(cfg, params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, -0.3), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return _flat(updates)


def test_group_lr_scales_first_adam_step():
    """Adam's first step is lr * sign(g) per element, so |update| is the group's LR exactly."""
    groups = [{"name": "embed", "pattern": r"^speech/encoder_embed/", "lr_scale": 0.5},
              {"name": "towers", "pattern": optim_config.TOWERS_PATTERN, "lr_scale": TOWER}]
    for params in (_params(), nnx.to_pure_dict(_params())):
        upd = _first_update(_cfg(param_groups=groups), params)
        for path, u in upd.items():
            scale = 0.5 if path.startswith("speech/encoder_embed/") else (
                TOWER if path.startswith(("speech/", "text_encoder/")) else 1.0)
            np.testing.assert_allclose(u, 1e-3 * scale, rtol=1e-5, err_msg=path)
    assert optim.lr_scale_for(_cfg(), "text_encoder/encoder/layer/3/output/dense/kernel") == TOWER
    assert optim.lr_scale_for(_cfg(), "audio_projection/0/kernel") == 1.0


@pytest.mark.slow  # building even the abstract tiny CLSPNet takes ~10 s here
def test_default_groups_on_real_clsp_paths():
    data = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "clsp_spear_tiny.npz"))
    net = nnx.eval_shape(lambda: CLSPNet(json.loads(str(data["config"])), rngs=nnx.Rngs(0)))
    params = nnx.state(net, nnx.Param)
    paths = list(_flat(jax.tree.map(lambda x: np.zeros(()), params)))
    scales = {p: optim.lr_scale_for({}, p) for p in paths}
    towers = [p for p in paths if p.split("/")[0] in ("speech", "text_encoder")]
    assert len(towers) > 50 and all(scales[p] == TOWER for p in towers)
    assert {p for p in paths if scales[p] == 1.0} == set(paths) - set(towers)
    assert "logit_scale" in paths and "speech/encoder_embed/out/kernel" in towers
    cfg = dict(total_steps=10, warmup_steps=2, frozen=[r"^speech/"])
    tx, _ = optim.make_optimizer(cfg, params)
    state = jax.eval_shape(tx.init, params)
    state_paths = [sharding.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not [p for p in state_paths if "speech" in p]
    mu = {p.split("/mu/", 1)[1] for p in state_paths if "/mu/" in p}
    assert mu == {p for p in paths if not p.startswith("speech/")}
    assert len(state_paths) == 2 * len(mu) + 2  # mu, nu per trainable leaf; Adam and schedule step counts


# ---------------------------------------------------------------- frozen, decay, clipping


def test_frozen_params_unchanged_and_state_free():
    params = _params()
    tx, _ = optim.make_optimizer(_cfg(frozen=[r"^speech/"], weight_decay=0.1), params)
    state = tx.init(params)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    n_train = sum(1 for p in _flat(params) if not p.startswith("speech/"))
    assert not [k for k, _ in leaves if sharding.path_str(k).count("speech")]
    assert len(leaves) == 2 * n_train + 2  # Adam mu and nu per trainable leaf; Adam and schedule counts

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for _ in range(3):
        new, state = step(new, state)
    before, after = _flat(params), _flat(new)
    for path in before:
        if path.startswith("speech/"):
            np.testing.assert_array_equal(after[path], before[path])
        else:
            assert np.all(after[path] != before[path]), path


def test_weight_decay_mask():
    """Zero gradients: Adam's direction is 0, so the update is -lr * scale * wd * p on decayed leaves."""
    params = _params()
    tx, _ = optim.make_optimizer(_cfg(base_lr=1e-2, weight_decay=0.1, no_decay=[r"embedding$"]), params)
    grads = jax.tree.map(jnp.zeros_like, params)
    upd = _flat(jax.jit(tx.update)(grads, tx.init(params), params)[0])
    p = _flat(params)
    decayed = {path for path in p if p[path].ndim >= 2 and not path.endswith("embedding")}
    assert decayed == {"speech/encoder_embed/kernel", "speech/encoder/layers/0/kernel",
                       "speech/encoder/layers/1/kernel", "text_encoder/pooler/kernel", "audio_projection/0/kernel"}
    for path in p:
        scale = TOWER if path.startswith(("speech/", "text_encoder/")) else 1.0
        expect = -1e-2 * scale * 0.1 * p[path] if path in decayed else np.zeros_like(p[path])
        np.testing.assert_allclose(upd[path], expect, rtol=1e-5, atol=1e-12, err_msg=path)


def test_global_norm_clipping_over_trainable_only():
    """eps=1 makes Adam's first step g/(|g|+1), so the clipped gradient shows through."""
    params = {"a": jnp.zeros(2), "b": jnp.zeros(()), "frozen": jnp.zeros(())}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0), "frozen": jnp.array(100.0)}
    cfg = _cfg(base_lr=0.1, eps=1.0, clip_norm=1.0, frozen=["^frozen$"], param_groups=[])
    tx, _ = optim.make_optimizer(cfg, params)
    upd = tx.update(grads, tx.init(params), params)[0]
    # Trainable norm is 5 (the frozen 100 is excluded) -> clipped grads 0.6, 0.8.
    np.testing.assert_allclose(upd["a"], [-0.1 * 0.6 / 1.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(upd["b"], -0.1 * 0.8 / 1.8, rtol=1e-6)
    assert float(upd["frozen"]) == 0.0
    tx, _ = optim.make_optimizer(dict(cfg, clip_norm=None), params)
    np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]["b"], -0.1 * 4 / 5, rtol=1e-6)


def test_config_dict_accepted():
    cfg = ml_collections.ConfigDict(_cfg(param_groups=[{"pattern": optim_config.TOWERS_PATTERN, "lr_scale": 0.5}]))
    upd = _first_update(cfg, _params())
    np.testing.assert_allclose(upd["text_encoder/pooler/kernel"], 5e-4, rtol=1e-5)
    np.testing.assert_allclose(upd["logit_scale"], 1e-3, rtol=1e-5)


# ---------------------------------------------------------------- clamp and EMA


def test_clamp_logit_scale():
    for value, expect in [(-1.0, 0.0), (2.0, 2.0), (10.0, math.log(100.0))]:
        params = {"logit_scale": jnp.asarray(value, jnp.bfloat16), "head": {"logit_scale_w": jnp.asarray(-5.0)}}
        out = optim.clamp_logit_scale(params)
        assert out["logit_scale"].dtype == jnp.bfloat16
        np.testing.assert_allclose(float(out["logit_scale"]), float(jnp.asarray(expect, jnp.bfloat16)))
        assert float(out["head"]["logit_scale_w"]) == -5.0
    state = _params()
    state["logit_scale"][...] = jnp.asarray(7.0)
    out = optim.clamp_logit_scale(state)
    assert isinstance(out, nnx.State)
    np.testing.assert_allclose(float(out["logit_scale"][...]), math.log(100.0), rtol=1e-6)
    with pytest.raises(ValueError, match="no 'logit_scale'"):
        optim.clamp_logit_scale({"w": jnp.ones(2)})


def test_ema_float32_from_bf16():
    params = {"w": jnp.asarray([1.0, -2.0], jnp.bfloat16)}
    ema = optim.ema_init(jax.tree.map(jnp.zeros_like, params))
    update = jax.jit(optim.ema_update)
    for _ in range(10):
        ema = update(ema, params, 0.9)
    assert ema["w"].dtype == jnp.float32
    np.testing.assert_allclose(ema["w"], np.array([1.0, -2.0]) * (1 - 0.9**10), rtol=1e-6)
    state = _params()
    ema = optim.ema_update(optim.ema_init(state), jax.tree.map(lambda x: x + 1.0, state), 0.75)
    np.testing.assert_allclose(ema["logit_scale"][...], math.log(1 / 0.07) + 0.25, rtol=1e-6)
