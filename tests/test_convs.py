"""`clsp_jax.models.convs`: each form of convolution against `lax.conv_general_dilated`, values and gradients
(with respect to the input and the kernel, for a random cotangent); on a batch sharded over 4 fake devices, the
depthwise kernel gradient's loop runs without collectives under the mesh."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsp_jax.models import convs
from train_fixtures import report_on_fake_devices


def _reference(x, w, strides, padding, groups):
    spatial = "HW"[: x.ndim - 2]
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups,
                                        precision="highest")


def _ours(x, w, strides, padding, groups):
    return convs.conv_general_dilated(x, w, strides, padding, feature_group_count=groups)


def _value_and_grads(conv, x, w, strides, padding, groups, cotangent_seed=1):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding, groups), x, w)
    ct = jnp.asarray(np.random.default_rng(cotangent_seed).standard_normal(y.shape), y.dtype)
    return (y, *vjp(ct))


# (input shape, kernel shape, strides, padding, groups): the speech tower's convolutions at small sizes, odd
# lengths included (strided axes whose length is not a multiple of the stride).
CASES = {
    "conv0 3x3 pad (0, 1)": ((2, 13, 12, 1), (3, 3, 1, 4), (1, 1), ((0, 0), (1, 1)), 1),
    "conv4 3x3 stride 2": ((2, 11, 12, 4), (3, 3, 4, 6), (2, 2), "VALID", 1),
    "conv4 even lengths": ((2, 12, 10, 4), (3, 3, 4, 6), (2, 2), "VALID", 1),
    "conv7 3x3 stride (1, 2)": ((2, 9, 13, 6), (3, 3, 6, 8), (1, 2), "VALID", 1),
    "SAME, stride 2": ((2, 9, 8, 3), (3, 3, 3, 5), (2, 2), "SAME", 1),
    "1-D stride 3": ((2, 20, 3), (4, 3, 5), (3,), ((1, 2),), 1),
    "pointwise 1x1": ((2, 7, 5, 8), (1, 1, 8, 12), (1, 1), ((0, 0), (0, 0)), 1),
    "depthwise 7x7": ((2, 10, 9, 16), (7, 7, 1, 16), (1, 1), ((3, 3), (3, 3)), 16),
    "depthwise 1-D k=31": ((3, 40, 8), (31, 1, 8), (1,), ((15, 15),), 8),
    "depthwise 1-D, uneven padding": ((2, 17, 8), (5, 1, 8), (1,), ((4, 0),), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_lax_conv(case):
    shape, kernel, strides, padding, groups = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal(kernel), jnp.float32)
    want = _value_and_grads(_reference, x, w, strides, padding, groups)
    got = _value_and_grads(jax.jit(_ours, static_argnums=(2, 3, 4)), x, w, strides, padding, groups)
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), want, got):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(a))),
                                   err_msg=name)


def test_depthwise_kernel_gradient_over_several_blocks(monkeypatch):
    """The kernel gradient's scan over blocks of frames, with a last block that is mostly padding."""
    monkeypatch.setattr(convs, "_KERNEL_GRAD_BLOCK_ELEMENTS", 3 * 2 * 5 * 4)  # 3 frames per block, 10 frames
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 10, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
    args = ((1, 1), ((1, 1), (1, 1)), 4)
    want = _value_and_grads(_reference, x, w, *args)
    got = _value_and_grads(_ours, x, w, *args)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=2e-5, atol=1e-5)


def test_keeps_the_input_dtype():
    x = jnp.ones((1, 6, 6, 4), jnp.bfloat16)
    assert convs.conv_general_dilated(x, jnp.ones((3, 3, 1, 4), jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                                      feature_group_count=4).dtype == jnp.bfloat16
    assert convs.conv_general_dilated(x, jnp.ones((3, 3, 4, 2), jnp.bfloat16), (2, 2), "VALID").dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(rhs_dilation=(2, 2)), "dilation"),
    (dict(feature_group_count=2, rhs=(3, 3, 2, 4)), "grouped convolution"),
    (dict(feature_group_count=4, rhs=(3, 3, 1, 4), window_strides=(2, 2)), "depthwise convolution with strides"),
    (dict(padding="CIRCULAR"), "padding 'CIRCULAR'"),
])
def test_unsupported_convolutions_raise(kwargs, message):
    x = jnp.ones((1, 8, 8, 4))
    rhs = jnp.ones(kwargs.pop("rhs", (3, 3, 4, 4)))
    call = dict(window_strides=(1, 1), padding="VALID") | kwargs
    with pytest.raises(ValueError, match=message):
        convs.conv_general_dilated(x, rhs, call.pop("window_strides"), call.pop("padding"), **call)


# ------------------------------------------------------------------------------------- sharded batch

SHARDED_CASES = {"depthwise 7x7": ((8, 12, 9, 16), (7, 7, 1, 16)), "depthwise 1-D k=15": ((8, 30, 8), (15, 1, 8))}


def _collectives_in_loops(hlo: str) -> int:
    """Collective ops in the while-loop bodies of compiled HLO text (and the computations they call)."""
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            name = head.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)
    callees = {c: set(re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", "\n".join(lines)))
               for c, lines in computations.items()}
    inside, todo = set(), list(re.findall(r"body=%([\w.\-]+)", hlo))
    while todo:
        c = todo.pop()
        if c not in inside:
            inside.add(c)
            todo.extend(callees.get(c, ()))
    ops = r" (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\("
    return sum(bool(re.search(ops, line)) for c in inside for line in computations.get(c, ()))


def _sharded_report() -> dict:
    """On a (data 2, fsdp 2) mesh of 4 fake devices, the depthwise convolution's gradients with the batch
    sharded: traced under the mesh (as the train step is) and without it."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from clsp_jax import sharding

    mesh = sharding.make_mesh((2, 2, 1))
    convs._KERNEL_GRAD_BLOCK_ELEMENTS = 256  # a few frames per step of the loop: several steps
    report = {}
    for case, (shape, kernel) in SHARDED_CASES.items():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        w = jnp.asarray(0.3 * rng.standard_normal(kernel), jnp.float32)
        padding = tuple(((k - 1) // 2, k // 2) for k in kernel[:-2])
        args = ((1,) * len(padding), padding, shape[-1])
        want = _value_and_grads(_reference, x, w, *args)
        xs = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
        for traced in ("under_mesh", "no_mesh"):
            def grads(x, w):
                if traced == "no_mesh":
                    return _value_and_grads(_ours, x, w, *args)
                with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                    return _value_and_grads(_ours, x, w, *args)

            compiled = jax.jit(grads).lower(xs, w).compile()
            got = compiled(xs, w)
            error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(want, got))
            report[f"{case}/{traced}"] = {"error": error, "collectives_in_loops": _collectives_in_loops(
                compiled.as_text())}
    return report


@pytest.fixture(scope="module")
def sharded_report():
    return report_on_fake_devices(__file__, devices=4, timeout=600)


@pytest.mark.parametrize("case", list(SHARDED_CASES))
def test_sharded_batch_kernel_gradient_sums_each_shard_in_place(sharded_report, case):
    """Under the mesh the kernel gradient's loop has no collective (one all-reduce after it); traced without
    the mesh, XLA reduces over the sharded batch inside the loop, an all-reduce per step (what made a step of
    two processes 5x slower). The values are the same either way."""
    under, bare = sharded_report[f"{case}/under_mesh"], sharded_report[f"{case}/no_mesh"]
    assert under["error"] < 1e-5 and bare["error"] < 1e-5, (under, bare)
    assert under["collectives_in_loops"] == 0
    assert bare["collectives_in_loops"] > 0


if __name__ == "__main__":
    print(json.dumps(_sharded_report()))
