"""ScaledAdam (`clsp_jax.optim.scaled_adam`, selected by optim.optimizer="scaled_adam") against icefall's
ScaledAdam + Eden, update by update; on 8 fake devices against one; through an Orbax save and restore.

The fixture tests/fixtures/scaled_adam_icefall.npz holds icefall's own numbers. A script outside the
repository built 25 tensors named like CLSP's (every kind the network has: 0-d scalars, size-1 tensors of 1
and 3 dimensions, vectors incl. a zero-initialised bias, matrices, a 1-row embedding, 2-d and depthwise conv
kernels, two tensors of one shape, which icefall batches together; one tensor under param_min_rms, one near
param_max_rms, a scalar pushed past scalar_max, one starting past it), random gradients for 30 updates
(heads and towers spiking x8 on different updates; the heads' whole gradient zero on updates 1-3, the
towers' on update 5), and ran the authors' ScaledAdam (clipping_scale 2) with Eden in their loop
(step_epoch per epoch of 10 updates; step_batch, then step) with two param groups (heads at LR 0.05, towers
at 0.025, one frozen tensor left out), once with clipping_update_period 100 (no clipping in 30 updates) and
once with 5 (thresholds refreshed on updates 5, 10, ...; clipping from update 5, including icefall's x20 on
the towers when their zero gradient at update 5 left no threshold). It recorded the params after every
update and each group's clipping factor. Here the same run goes through `optim.make_optimizer`.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clsp_jax import optim, optim_config, sharding

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "scaled_adam_icefall.npz")
TOLERANCE = 1e-5  # relative, on the parameters after each update
FAKE_DEVICE_TOLERANCE = 1e-6
MESHES = [(1, 8, 1)]  # (data, fsdp, tensor)


@functools.cache
def _fixture() -> tuple[dict, dict]:
    with np.load(FIXTURE) as data:
        return json.loads(str(data["meta"])), {k: data[k] for k in data.files if k != "meta"}


def _nest(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    out = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _flat(tree) -> dict:
    return {sharding.path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _problem(run: str):
    """(optim config, initial params, [grads of each update]) of the fixture's run `run`."""
    meta, data = _fixture()
    eden = meta["eden"]
    cfg = dict(optimizer="scaled_adam", schedule="eden", base_lr=meta["base_lr"],
               eden_lr_batches=eden["lr_batches"], eden_lr_epochs=eden["lr_epochs"],
               warmup_steps=int(eden["warmup_batches"]), warmup_start=eden["warmup_start"],
               steps_per_epoch=meta["steps_per_epoch"], clipping_update_period=meta["runs"][run],
               param_groups=[{"name": "towers", "pattern": optim_config.TOWERS_PATTERN,
                              "lr_scale": meta["tower_lr_scale"]}],
               frozen=[p["path"] for p in meta["params"] if p["role"] == "frozen"])
    paths = [p["path"] for p in meta["params"]]
    params = _nest({p: jnp.asarray(data[f"init/{p}"]) for p in paths})
    # The frozen tensor gets a gradient too: the optimizer must ignore it.
    grads = [_nest({p: data[f"grads/{p}"][t] if f"grads/{p}" in data else np.ones_like(data[f"init/{p}"])
                    for p in paths}) for t in range(meta["steps"])]
    return cfg, params, grads


@functools.cache
def _step(run: str):
    """(tx, jitted (params, opt_state, grads) -> (params, opt_state)) of run `run`."""
    cfg, params, _ = _problem(run)
    tx, _ = optim.make_optimizer(cfg, params)

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, jax.jit(step)


def _run(run: str, step_fn=None, start=None, updates=None):
    """([flat params after each update], [{group: clipping factor} per update], (params, opt_state) at the
    end) of `updates` updates (default all) from `start` (default the fixture's initial state)."""
    _, params, grads = _problem(run)
    tx, step = _step(run)
    step = step_fn or step
    params, opt_state = start if start is not None else (params, jax.jit(tx.init)(params))
    after, factors = [], []
    for t in range(updates or len(grads)):
        params, opt_state = step(params, opt_state, grads[t])
        after.append(_flat(params))
        factors.append({k: float(v) for k, v in optim.clip_factors(opt_state).items()})
    return after, factors, (params, opt_state)


def _relative_errors(after: list[dict], ref: list[dict]) -> list[float]:
    """Per update, max over tensors of max|ours - ref| / max|ref|."""
    return [max(float(np.max(np.abs(a[p] - r[p])) / max(np.max(np.abs(r[p])), 1e-30)) for p in r)
            for a, r in zip(after, ref)]


@functools.cache
def _reference_run(run: str):
    """`_run(run)` on one device, computed once."""
    return _run(run)


@pytest.mark.parametrize("run", ["period100", "period5"])
def test_matches_icefall_every_update(run):
    meta, data = _fixture()
    ref = [{p["path"]: data[f"{run}/{p['path']}"][t] for p in meta["params"] if p["role"] != "frozen"}
           for t in range(meta["steps"])]
    after, factors, _ = _reference_run(run)
    errors = _relative_errors(after, ref)
    assert max(errors) <= TOLERANCE, [f"update {t}: {e:.2e}" for t, e in enumerate(errors) if e > TOLERANCE]
    schedule = optim.make_schedule(_problem(run)[0])
    np.testing.assert_allclose([float(schedule(t)) for t in range(meta["steps"])], data[f"{run}/head_lr"], rtol=1e-6)
    frozen = [p["path"] for p in meta["params"] if p["role"] == "frozen"]
    assert frozen and all(np.array_equal(after[-1][p], data[f"init/{p}"]) for p in frozen)
    # Clipping groups in LR order: "lr_scale_0" holds the towers (x0.5), "lr_scale_1" the heads (x1).
    ours = np.array([[f[f"inner_states/lr_scale_{i}/inner_state"] for i in (1, 0)] for f in factors])
    np.testing.assert_allclose(ours, data[f"{run}/clip_factors"], rtol=1e-5)
    clipped = {(int(t), meta["groups"][g]) for t, g in zip(*np.nonzero(ours != 1.0))}
    if run == "period100":  # clipping starts at update 100
        assert not clipped
    else:  # the spikes after update 5, and icefall's x20 on the towers until their first threshold (10)
        assert clipped == {(7, "heads"), (13, "heads"), (14, "heads"), (22, "heads"), (27, "heads"),
                           (18, "towers"), (26, "towers"), (6, "towers"), (7, "towers"), (8, "towers"),
                           (9, "towers")}
        assert ours[6, 1] == 20.0 and 0.2 < ours[7, 0] < 0.3


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Orbax StandardSave/Restore of params and ScaledAdam state mid-run (update 12: mid size period, after a
    clipping refresh); continuing gives the uninterrupted run's params exactly."""
    import orbax.checkpoint as ocp

    straight, _, _ = _reference_run("period5")
    _, _, (params, opt_state) = _run("period5", updates=12)
    state = {"params": params, "opt_state": opt_state}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(optim.clip_factors(restored["opt_state"]), dict) and optim.clip_factors(restored["opt_state"])
    _, params, grads = _problem("period5")
    _, step = _step("period5")
    params, opt_state = restored["params"], restored["opt_state"]
    for t in range(12, len(grads)):
        params, opt_state = step(params, opt_state, grads[t])
        for path, value in _flat(params).items():
            np.testing.assert_array_equal(value, straight[t][path], err_msg=f"update {t} {path}")


def _report() -> dict:
    """{"<mesh>": {"errors": max relative error per update, "factors_equal": bool, "sharded": count of
    sharded state arrays}} of the period-5 run on each mesh of `MESHES` against one device."""
    from clsp_jax.train import state as train_state

    assert jax.device_count() == 8, jax.devices()
    one, one_factors, _ = _reference_run("period5")
    tx, _ = _step("period5")
    _, params, grads = _problem("period5")
    report = {}
    for shape in MESHES:
        mesh = sharding.make_mesh(shape)
        state = {"params": params, "opt_state": jax.jit(tx.init)(params)}
        shardings = train_state.state_shardings(state, mesh)
        state = jax.device_put(state, shardings)

        def step(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        jitted = jax.jit(step, in_shardings=(shardings["params"], shardings["opt_state"], shardings["params"]),
                         out_shardings=(shardings["params"], shardings["opt_state"]))
        placed = lambda p, s, g: jitted(p, s, jax.device_put(g, shardings["params"]))
        after, factors, _ = _run("period5", step_fn=placed, start=(state["params"], state["opt_state"]))
        sharded = sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
        report[str(shape)] = {"errors": _relative_errors(after, one), "factors_equal": factors == one_factors,
                              "sharded": sharded}
    return report


@pytest.fixture(scope="module")
def fake_device_report():
    from train_fixtures import report_on_fake_devices

    return report_on_fake_devices(__file__)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_fake_devices_equal_one_device(fake_device_report, mesh):
    report = fake_device_report[str(mesh)]
    assert len(report["errors"]) == 30 and max(report["errors"]) <= FAKE_DEVICE_TOLERANCE, report["errors"]
    assert report["factors_equal"]
    assert report["sharded"] >= 10  # kernels, embeddings and their moments are split over the mesh


# ---------------------------------------------------------------- config and arguments


def test_lr_groups_and_frozen_state():
    """One clipping group per distinct lr_scale (two patterns at one scale share it); frozen leaves hold no
    state; faithful_optim_config selects ScaledAdam."""
    _, params, _ = _problem("period5")
    groups = [{"pattern": r"^speech/", "lr_scale": 0.5}, {"pattern": r"^text_encoder/", "lr_scale": 0.5},
              {"pattern": r"^audio_projection/", "lr_scale": 0.25}]
    cfg = dict(optimizer="scaled_adam", schedule="constant", param_groups=groups, frozen=[r"^logit_"])
    tx, _ = optim.make_optimizer(cfg, params)
    state = jax.eval_shape(tx.init, params)
    found = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, optim.ScaledAdamState))[0]
    groups = {sharding.path_str(k).split("/")[1]: _flat(s.delta) for k, s in found
              if isinstance(s, optim.ScaledAdamState)}
    assert sorted(groups) == ["lr_scale_0", "lr_scale_1", "lr_scale_2"]
    assert all(p.startswith("audio_projection/") for p in groups["lr_scale_0"])
    assert {p.split("/")[0] for p in groups["lr_scale_1"]} == {"speech", "text_encoder"}
    assert {p.split("/")[0] for p in groups["lr_scale_2"]} == {"text_projection"}
    assert not any("logit_" in sharding.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0])
    faithful = optim_config.faithful_optim_config()
    assert faithful["optimizer"] == "scaled_adam" and faithful["clipping_scale"] == 2.0
    tx, _ = optim.make_optimizer(dict(faithful, steps_per_epoch=100), params)
    assert list(optim.clip_factors(jax.eval_shape(tx.init, params))) == ["inner_states/lr_scale_0/inner_state",
                                                                       "inner_states/lr_scale_1/inner_state"]


def test_first_update_by_hand():
    """Update 0 (no clipping, no scale update): a tensor moves by -lr (1-beta1) rms(p) g / (|g| + eps)
    elementwise (Adam's first step, bias-corrected second moment only), a scalar by -lr 0.1 (1-beta1) sign(g)
    after the clamp to +-scalar_max."""
    params = {"w": jnp.array([[3.0, -4.0], [0.0, 0.0]]), "s": jnp.array(12.0), "one": jnp.array([0.5])}
    grads = {"w": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "s": jnp.array(-3.0), "one": jnp.array([2.0])}
    tx = optim.scaled_adam(0.1)
    upd, state = jax.jit(tx.update)(grads, tx.init(params), params)
    rms = np.sqrt(25 / 4)
    np.testing.assert_allclose(upd["w"], -0.1 * 0.1 * rms * np.array([[1, -1], [1, 0]]), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(upd["s"], (10.0 - 12.0) + 0.1 * 0.1 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(upd["one"], [-0.1 * 0.1 * 0.1], rtol=1e-6)
    assert int(state.count) == 1 and float(state.clip_factor) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(betas=(0.99, 0.9)), "betas"),
    (dict(size_update_period=0), "size_update_period"),
    (dict(clipping_update_period=2.5), "clipping_update_period"),
    (dict(param_min_rms=3.0), "param_min_rms"),
    (dict(clipping_scale=0.0), "clipping_scale"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.scaled_adam(0.1, **kwargs)


def test_bad_config_and_missing_params():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optim.make_optimizer(dict(optimizer="sgd", schedule="constant"), {"w": jnp.ones(2)})
    tx = optim.scaled_adam(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


if __name__ == "__main__":
    print(json.dumps(_report()))


def test_compiled_update_does_not_grow_with_the_number_of_tensors():
    """Every tensor's update reads the clipping factor. The factor's norm must be computed once, not copied
    into each reader's fused computation (which made a step over the tiny config's 719 tensors compile for
    tens of minutes): the largest fusion of a step is the same size for 20 and for 80 tensors."""

    def largest_fusion(n):
        params = {f"w{i}": jnp.full((4, 4), 0.1 * (i + 1)) for i in range(n)}
        tx = optim.scaled_adam(0.01)

        def step(params, state, x):
            grads = jax.grad(lambda p: sum(jnp.sum(jnp.tanh(w * x)) for w in p.values()))(params)
            return tx.update(grads, state, params)

        text = jax.jit(step).lower(params, tx.init(params), jnp.ones((4, 4))).compile().as_text()
        bodies = re.findall(r"\n%fused_computation[^\n]*\{\n(.*?)\n\}", text, re.S)
        assert bodies, "no fused computations in the compiled step"
        return max(len(body.splitlines()) for body in bodies)

    assert largest_fusion(80) == largest_fusion(20)
