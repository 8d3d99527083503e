"""The train step's non-finite guard: a NaN batch leaves parameters and optimizer state untouched."""

import jax
import numpy as np
import optax
from flax import nnx

from clsp_jax.models.clsp import CLSPNet
from clsp_jax.train.step import init_state, make_train_step
from train_fixtures import small_model_config, tone_batch


def test_a_non_finite_loss_skips_the_update_and_counts_the_streak():
    net = CLSPNet(small_model_config(dropout=False), rngs=nnx.Rngs(0))
    graphdef, _, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.adam(1e-3)
    step = jax.jit(make_train_step(graphdef, rest, tx, lambda s: 1e-3, dict(objective="multi_positive")))
    good = tone_batch(3, 2)
    bad = {**good, "audio": good["audio"].copy()}
    bad["audio"][1, 100] = np.nan

    state = init_state(net, tx)
    after_good, metrics = step(state, good)
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
