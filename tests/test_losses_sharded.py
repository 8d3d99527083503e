"""Sharded losses equal their dense references, in value, metrics and gradient, on 8 fake CPU devices.

XLA must see 8 host devices before JAX starts, so all mesh cases run in one child process (this file run as
a script prints a JSON report); the pytest side only reads the report and asserts on it.
"""

import json

import pytest
from train_fixtures import report_on_fake_devices

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]  # over (data, fsdp, tensor); the batch is split over data x fsdp
CASES = ["infonce", "multi_positive", "multi_positive_mask_weights", "hard_negative", "sigmoid"]
TOLERANCE = 1e-5


def _relative_error(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _report() -> dict:
    """{"<mesh>/<case>": {"value": err, "metrics": err, "grad_<arg>": err, ...}, "checks": {...}}."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from clsp_jax import losses

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    b, k, d = 16, 2, 32

    def unit(*shape):
        x = rng.normal(size=shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    audio, text, neg = unit(b, d), unit(b, k, d), unit(b, d)
    mask = rng.random((b, k)) > 0.3
    mask[5] = False  # one clip with every caption padded away
    weights = rng.random((b, k)).astype(np.float32) + 0.1
    scale, bias = np.float32(14.0), np.float32(-5.0)
    # name -> (loss, arguments, names of the differentiated arguments)
    cases = {
        "infonce": (losses.infonce_loss, (audio, text[:, 0], scale), ("audio", "text", "scale")),
        "multi_positive": (losses.multi_positive_loss, (audio, text, scale), ("audio", "text", "scale")),
        "multi_positive_mask_weights": (
            losses.multi_positive_loss,
            (audio, text, scale, mask, weights),
            ("audio", "text", "scale"),
        ),
        "hard_negative": (
            losses.hard_negative_loss,
            (audio, text, neg, scale),
            ("audio", "text", "neg", "scale"),
        ),
        "sigmoid": (
            losses.sigmoid_loss,
            (audio, text[:, 0], scale, bias),
            ("audio", "text", "scale", "bias"),
        ),
    }

    def value_and_grads(fn, args, n_diff):
        def scalar(*diff):
            return fn(*diff, *args[n_diff:])

        run = jax.jit(jax.value_and_grad(scalar, argnums=tuple(range(n_diff)), has_aux=True))
        (loss, metrics), grads = run(*args[:n_diff])
        return loss, metrics, grads

    dense = {name: value_and_grads(fn, args, len(diff)) for name, (fn, args, diff) in cases.items()}

    report = {"checks": {}}
    for shape in MESHES:
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        for name, (fn, args, diff) in cases.items():
            placed = tuple(jax.device_put(x, batch) if x.ndim else x for x in args)
            loss, metrics, grads = value_and_grads(losses.sharded(fn, mesh), placed, len(diff))
            want_loss, want_metrics, want_grads = dense[name]
            errors = {"value": _relative_error(loss, want_loss)}
            errors["metrics"] = max(_relative_error(metrics[m], want_metrics[m]) for m in want_metrics)
            errors["metric_names"] = sorted(metrics) == sorted(want_metrics)
            for arg, got, want in zip(diff, grads, want_grads):
                errors[f"grad_{arg}"] = _relative_error(got, want)
            report[f"{shape}/{name}"] = errors

    # Forward and backward programs on 8 devices (2 clips each): the ring never holds [2, 16] logits, which
    # the gathered InfoNCE does.
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)

    def program(fn, *args):
        return str(jax.make_jaxpr(jax.grad(lambda *x: losses.sharded(fn, mesh)(*x)[0], argnums=(0, 1)))(*args))

    ring = program(losses.sigmoid_loss, audio, text[:, 0], scale, bias)
    gathered = program(losses.infonce_loss, audio, text[:, 0], scale)
    report["checks"]["sigmoid_ring_uses_ppermute"] = "ppermute" in ring
    report["checks"]["sigmoid_ring_never_gathers"] = "all_gather" not in ring
    report["checks"]["sigmoid_ring_logits_stay_local"] = "f32[2,16]" not in ring and "f32[2,16]" in gathered
    try:
        losses.sharded(losses.infonce_loss, mesh)(audio[:12], text[:12, 0], scale)
        report["checks"]["indivisible_batch_raises"] = False
    except ValueError as e:
        report["checks"]["indivisible_batch_raises"] = "does not divide" in str(e)
    return report


@pytest.fixture(scope="module")
def report():
    return report_on_fake_devices(__file__, timeout=600)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_equals_dense(report, mesh, case):
    errors = dict(report[f"{mesh}/{case}"])
    assert errors.pop("metric_names") is True
    assert any(name.startswith("grad_") for name in errors)
    assert all(e <= TOLERANCE for e in errors.values()), errors


@pytest.mark.parametrize(
    "check",
    [
        "sigmoid_ring_uses_ppermute",
        "sigmoid_ring_never_gathers",
        "sigmoid_ring_logits_stay_local",
        "indivisible_batch_raises",
    ],
)
def test_sharded_structure(report, check):
    assert report["checks"][check] is True


if __name__ == "__main__":
    print(json.dumps(_report()))
