"""The train step on cached text states: equal to the step on tokens, its non-finite guard, its objective
checks, and the siglip objective with its learnable logit bias (dense = sharded over 8 fake CPU devices).

XLA must see 8 host devices before JAX starts, so the sharded siglip case runs in a child process (this file
run as a script prints a JSON report); the pytest side only asserts on the report.
"""

import json
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from clsp_jax import sharding
from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train.state import init_state, state_shardings
from clsp_jax.train.step import make_train_step
from clsp_jax.train.text_cache import TextStateCache, cached_text_states
from eval_fixtures import TOKENIZER
from train_fixtures import minilm_vocab_net, report_on_fake_devices, tone_batch

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
    step = jax.jit(make_train_step(graphdef, rest, tx, lambda s: 1e-3, objective="multi_positive", loss_cfg={},
                                   frozen=FROZEN))
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


def test_the_donated_moments_are_updated_in_place(setup):
    """The update program, as the trainer compiles it (`JittedTrainStep`), copies none of the optimizer's
    moments: with the donated state, each is read and overwritten in place. (The non-finite guard as a select
    of new and old values made XLA copy every moment, twice the parameter bytes.)"""
    net, _, tx, _, _, state_batch = setup
    graphdef, _, rest = nnx.split(net, nnx.Param, ...)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state = init_state(net, tx)
    step = sharding.JittedTrainStep(make_train_step(graphdef, rest, tx, lambda s: 1e-3, objective="multi_positive",
                                                    loss_cfg={}, frozen=FROZEN, mesh=mesh),
                                    state_shardings(state, mesh), mesh)
    _, update = step.compile(state, sharding.global_batch(state_batch, mesh))
    hlo = update.as_text()
    inputs = re.findall(r"%(\S+) = \S+ parameter\(\d+\)", hlo)
    moments = {name for name in inputs if re.search(r"_(mu|nu)_", name)}
    assert len(moments) > 20, inputs[:10]  # the names carry the state's paths, so the check below can see them
    copied = set(re.findall(r" copy\(%(\S+)\)", hlo)) & moments
    assert not copied, sorted(copied)[:5]


def test_the_step_checks_its_objective(setup):
    """Clear errors for an unknown name, a network without the bias siglip needs, a batch with other captions."""
    net, _, tx, _, token_batch, _ = setup
    graphdef, _, rest = nnx.split(net, nnx.Param, ...)
    make = lambda name: make_train_step(graphdef, rest, tx, lambda s: 1e-3, objective=name, loss_cfg={})
    with pytest.raises(ValueError, match="unknown objective 'clip'"):
        make("clip")
    state = init_state(net, tx)
    with pytest.raises(ValueError, match="objective 'siglip' needs a network with a logit_bias"):
        jax.eval_shape(make("siglip"), state, token_batch)
    with pytest.raises(ValueError, match="objective 'infonce' needs 1 caption"):
        jax.eval_shape(make("infonce"), state, token_batch)


# ---------------------------------------------------------------------------------------------------------
# SigLIP: the dense step and the step sharded over (data, fsdp) = (2, 4) agree, and the bias trains.

SIGLIP_LR = 0.1
BIAS_INIT = -10.0


def _siglip_report() -> dict:
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from clsp_jax.models.clsp import CLSPNet
    from train_fixtures import small_model_config

    assert jax.device_count() == 8, jax.devices()
    net = CLSPNet({**small_model_config(dropout=False), "logit_bias_init": BIAS_INIT}, rngs=nnx.Rngs(0))
    graphdef, _, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.sgd(SIGLIP_LR)  # plain SGD: the bias moves by -lr x its gradient
    batch = tone_batch(8, 1)
    make = lambda mesh: jax.jit(make_train_step(graphdef, rest, tx, lambda s: SIGLIP_LR, objective="siglip",
                                                loss_cfg={"objective": "siglip"}, mesh=mesh))
    dense_state, dense = make(None)(init_state(net, tx), batch)
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    placed = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
    sharded_state, sharded = make(mesh)(init_state(net, tx), placed)
    dense_params, sharded_params = jax.device_get((dense_state["params"], sharded_state["params"]))
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    param_error = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(dense_params), leaves(sharded_params)))
    return {
        "dense_loss": float(dense["loss"]),
        "sharded_loss": float(sharded["loss"]),
        "metric_names": sorted(dense) == sorted(sharded),
        "metric_bias": float(dense["logit_bias"]),
        "dense_bias": float(dense_params["logit_bias"]),
        "sharded_bias": float(sharded_params["logit_bias"]),
        "param_error": param_error,
    }


@pytest.fixture(scope="module")
def siglip_report():
    return report_on_fake_devices(__file__)


def test_siglip_step_sharded_equals_dense(siglip_report):
    r = siglip_report
    assert np.isfinite(r["dense_loss"]) and r["dense_loss"] > 1.0  # a bias of -10 misses every positive pair
    np.testing.assert_allclose(r["sharded_loss"], r["dense_loss"], rtol=1e-5)
    assert r["metric_names"]
    assert r["param_error"] <= 1e-5
    np.testing.assert_allclose(r["sharded_bias"], r["dense_bias"], rtol=1e-6)


def test_siglip_step_trains_the_logit_bias(siglip_report):
    r = siglip_report
    assert r["metric_bias"] == BIAS_INIT  # the loss saw the network's bias
    gradient = (BIAS_INIT - r["dense_bias"]) / SIGLIP_LR
    # Almost every pair is a negative already below -10, so the positives pull the bias up (gradient < 0).
    assert gradient < -0.1, gradient


if __name__ == "__main__":
    print(json.dumps(_siglip_report()))
