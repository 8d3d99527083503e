"""The sharded train step equals the single-device one on 8 fake CPU devices, with its state really sharded.

Three steps of a small CLSP (`train_fixtures.small_model_config`: the reference fixture's widths, fewer
layers to keep XLA:CPU compiles short; dropout on) with AdamW (eps 1e-3: Adam's first steps are
sign(gradient) where gradients are ~0, which would turn float32 summation noise into lr-sized differences)
on meshes (data, fsdp, tensor) = (8,1,1), (2,2,2) and, marked slow, (2,4,1): losses and the parameters after
3 steps match one device. XLA must see 8 host devices before JAX starts, so everything runs in a child process
(this file run as a script with the meshes as JSON prints a JSON report); the pytest side only asserts on
the report.
"""

import json
import sys

import numpy as np
import pytest
from train_fixtures import report_on_fake_devices, small_model_config, tone_batch

# Data parallel; FSDP and tensor parallel together. FSDP alone (its own child process and compilations) is slow.
MESHES = [(8, 1, 1), (2, 2, 2)]
SLOW_MESHES = [(2, 4, 1)]
ALL_MESHES = [*MESHES, *(pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MESHES)]
TRAIN = dict(objective="multi_positive", loss_cfg={}, seed=0, ema_decay=0.9)
OPTIM = dict(base_lr=3e-3, schedule="constant", param_groups=[], eps=1e-3)
# A weight of each tower and its expected spec per mesh: [64, 128] ("embed", "mlp"), [1000, 64] ("vocab", "embed").
FF_KERNEL = "speech/encoder/encoders/1/encoder/layers/0/feed_forward2/in_proj/kernel"
WORD_EMBEDDING = "text_encoder/embeddings/word_embeddings/embedding"
EXPECTED_SPECS = {
    (8, 1, 1): {FF_KERNEL: [None, None], WORD_EMBEDDING: [None, None]},
    (2, 4, 1): {FF_KERNEL: ["fsdp", None], WORD_EMBEDDING: [None, "fsdp"]},
    (2, 2, 2): {FF_KERNEL: ["fsdp", "tensor"], WORD_EMBEDDING: ["tensor", "fsdp"]},
}


def _relative_error(got, want) -> float:
    """max |got - want| / max |want| over every leaf of two pytrees."""
    import jax

    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    diff = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) for g, w in zip(got, want))
    return diff / max(float(np.max(np.abs(np.asarray(w)))) for w in want)


def _leaf(tree, suffix: str):
    import jax

    from clsp_jax.sharding import path_str

    found = [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if path_str(p).endswith(suffix)]
    assert len(found) == 1, (suffix, len(found))
    return found[0]


def _report(meshes: list[tuple[int, int, int]]) -> dict:
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from clsp_jax import losses, optim, sharding
    from clsp_jax.models.clsp import CLSPNet
    from clsp_jax.models.text import TextEncoder
    from clsp_jax.train import state as train_state, step

    assert jax.device_count() == 8, jax.devices()
    cfg = small_model_config()
    batch = tone_batch(8, losses.OBJECTIVES[TRAIN["objective"]].captions)
    make_net = lambda: CLSPNet(cfg, rngs=nnx.Rngs(0))
    net = make_net()
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx, schedule = optim.make_optimizer(OPTIM, params)

    def run(step_fn, state, batch):
        losses = []
        for _ in range(3):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        return losses, state

    initial = train_state.init_state(net, tx, ema=True)
    init_params = jax.device_get(initial["params"])
    ref_losses, ref = run(jax.jit(step.make_train_step(graphdef, rest, tx, schedule, **TRAIN)), initial, batch)
    ref = jax.device_get(ref)
    report = {"reference_losses": ref_losses, "ref_update_size": _relative_error(ref["params"], init_params)}

    for shape in map(tuple, meshes):
        mesh = sharding.make_mesh(shape)
        state, shardings = train_state.init_sharded_state(make_net, tx, mesh, ema=True)
        out = {"init_error": _relative_error(state["params"], init_params)}
        step_fn = sharding.JittedTrainStep(step.make_train_step(graphdef, rest, tx, schedule, **TRAIN, mesh=mesh),
                                           shardings, mesh)
        device_batch = sharding.global_batch(batch, mesh)
        out["losses"], live = run(step_fn, state, device_batch)
        # Two programs, each compiled once; the update donates the state it was given.
        out["programs"] = [step_fn.gradients._cache_size(), step_fn.update._cache_size()]
        out["first_state_donated"] = all(x.is_deleted() for x in jax.tree.leaves(state))
        final_host = jax.device_get(live)
        out["param_error"] = _relative_error(final_host["params"], ref["params"])
        out["opt_state_error"] = _relative_error(final_host["opt_state"], ref["opt_state"])
        out["ema_error"] = _relative_error(final_host["ema"], ref["ema"])
        # Where the arrays of the state after 3 steps live.
        for name in (FF_KERNEL, WORD_EMBEDDING):
            x = _leaf(live["params"], name)
            mu = _leaf(live["opt_state"], "mu/" + name)
            out[name] = {"spec": list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec)),
                         "shard_shape": list(x.addressable_shards[0].data.shape), "shape": list(x.shape),
                         "mu_same_sharding": mu.sharding.is_equivalent_to(x.sharding, x.ndim),
                         "ema_same_sharding": _leaf(live["ema"], name).sharding.is_equivalent_to(x.sharding, x.ndim)}
        report[str(shape)] = out

    # check_no_large_replicated: quiet at the largest replicated size, raises once a bigger weight is replicated.
    mesh = sharding.make_mesh((2, 4, 1))
    abstract = jax.eval_shape(lambda: nnx.to_pure_dict(params))
    shardings = sharding.param_shardings(abstract, mesh)
    largest = sharding.replicated_report(abstract, shardings, top=1)[0]
    sharding.check_no_large_replicated(abstract, shardings, mesh, max_elements=largest[1])
    shardings["text_encoder"]["embeddings"]["word_embeddings"]["embedding"] = NamedSharding(mesh, P())
    try:
        sharding.check_no_large_replicated(abstract, shardings, mesh, max_elements=largest[1])
        report["replicated_flagged"] = ""
    except ValueError as e:
        report["replicated_flagged"] = str(e)
    report["largest_replicated"] = list(largest)
    report["word_embedding_elements"] = int(np.prod(abstract["text_encoder"]["embeddings"]["word_embeddings"]
                                                    ["embedding"].shape))

    # jit_init=True builds the same state as the eager default, directly sharded (a small net: XLA:CPU compiles
    # each random draw separately, so a whole CLSP would take a minute).
    text_cfg = dict(cfg["text"])
    make_text = lambda: TextEncoder(text_cfg, rngs=nnx.Rngs(3))
    text_tx = optax.sgd(0.1, momentum=0.9)
    mesh = sharding.make_mesh((2, 2, 2))
    eager_state, _ = train_state.init_sharded_state(make_text, text_tx, mesh)
    jit_state, _ = train_state.init_sharded_state(make_text, text_tx, mesh, jit_init=True)
    x = _leaf(jit_state["params"], "embeddings/word_embeddings/embedding")
    report["jit_init"] = {"error": _relative_error(jit_state, eager_state),
                          "spec": list(x.sharding.spec), "shard_shape": list(x.addressable_shards[0].data.shape)}
    return report


@pytest.fixture(scope="module")
def report():
    return report_on_fake_devices(__file__, args=[json.dumps(MESHES)])


@pytest.fixture(scope="module")
def slow_report():
    return report_on_fake_devices(__file__, args=[json.dumps(SLOW_MESHES)])


def _mesh_report(request, mesh) -> dict:
    return request.getfixturevalue("slow_report" if mesh in SLOW_MESHES else "report")[str(mesh)]


def _mesh_id(mesh):
    return "x".join(map(str, mesh))


def test_reference_run_trains(report):
    """The comparison below is not vacuous: 3 steps move the weights by ~1e-3 of their scale."""
    assert report["ref_update_size"] > 1e-3
    assert len(set(report["reference_losses"])) == 3


@pytest.mark.parametrize("mesh", ALL_MESHES, ids=_mesh_id)
def test_sharded_step_matches_one_device(request, report, mesh):
    out = _mesh_report(request, mesh)
    assert out["init_error"] == 0.0  # init_sharded_state places the eager init exactly
    np.testing.assert_allclose(out["losses"], report["reference_losses"], rtol=1e-5)
    for key in ("param_error", "opt_state_error", "ema_error"):
        assert out[key] <= 1e-5, (key, out[key])
    # The reference is the step as one program (`jax.jit(step)`); the sharded one runs it as two.
    assert out["programs"] == [1, 1] and out["first_state_donated"]


@pytest.mark.parametrize("mesh", ALL_MESHES, ids=_mesh_id)
@pytest.mark.parametrize("name", [FF_KERNEL, WORD_EMBEDDING], ids=["ff_kernel", "word_embedding"])
def test_state_is_sharded_by_the_rules(request, mesh, name):
    got = _mesh_report(request, mesh)[name]
    spec = EXPECTED_SPECS[mesh][name]
    assert got["spec"] == spec
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    assert got["shard_shape"] == [n // (sizes[a] if a else 1) for n, a in zip(got["shape"], spec)]
    assert got["mu_same_sharding"] and got["ema_same_sharding"]


def test_check_no_large_replicated_flags_a_replicated_weight(report):
    assert report["word_embedding_elements"] > report["largest_replicated"][1]
    assert WORD_EMBEDDING in report["replicated_flagged"]
    assert str(report["word_embedding_elements"]) in report["replicated_flagged"]


def test_jit_init_equals_eager_init_and_is_sharded(report):
    got = report["jit_init"]
    assert got["error"] <= 1e-6
    assert got["spec"] == ["tensor", "fsdp"] and got["shard_shape"] == [500, 32]


if __name__ == "__main__":
    print(json.dumps(_report(json.loads(sys.argv[1]))))
