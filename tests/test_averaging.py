"""icefall's model averaging (`clsp_jax.averaging`): the running average kept in float32 with compensation
equals a float64 recomputation over thousands of folds, and the average between two running averages equals
the float64 mean of the snapshots between them. The same update through the trainer's jitted step, saved and
resumed, is tested on the micro run of test_checkpoint_faults.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsp_jax import averaging

PERIOD = 3
FOLDS = 5000


@pytest.fixture(scope="module")
def snapshots():
    """[FOLDS, 64] float32 weights drifting as in training: a random walk around offsets of 1 (first half of
    the columns) and 100 (second half), where float32 rounding of a running mean loses the most."""
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(0, 1e-3, (FOLDS, 64)), axis=0) + rng.normal(0, 1, 64)
    walk[:, 32:] += 100.0
    return walk.astype(np.float32)


def _running(snapshots: np.ndarray, record: tuple[int, ...]):
    """Steps 1 .. FOLDS·PERIOD through `average_update` (jitted, one scan); a step that is a multiple of PERIOD
    sees the next snapshot, every other step sees 1e4 (which must never be folded in). Returns the running
    averages after the folds counted in `record`."""
    snaps = jnp.asarray(snapshots)

    def body(average, step):
        x = jnp.where(step % PERIOD == 0, snaps[jnp.maximum(step // PERIOD - 1, 0)], 1e4)
        average = averaging.average_update(average, {"w": x}, step, PERIOD)
        return average, average

    _, history = jax.jit(lambda: jax.lax.scan(body, averaging.average_init({"w": snaps[0]}),
                                              jnp.arange(1, FOLDS * PERIOD + 1, dtype=jnp.int32)))()
    return [jax.tree.map(lambda h: np.asarray(h[n * PERIOD - 1]), history) for n in record]


def test_running_average_equals_a_float64_recomputation_over_thousands_of_folds(snapshots):
    first, last = _running(snapshots, (1, FOLDS))
    assert int(first["count"]) == 1 and int(last["count"]) == FOLDS
    np.testing.assert_array_equal(averaging.average_value(first)["w"], snapshots[0])  # the first fold is exact
    reference = snapshots.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(averaging.average_value(last)["w"], reference, rtol=1e-6, atol=0)

    # The same recurrence in plain float32 (icefall's update without its float64) misses the same tolerance:
    # the test can tell the compensation from none.
    plain = np.zeros(64, np.float32)
    for k, x in enumerate(snapshots, start=1):
        w = np.float32(1 / k)
        plain = plain * (np.float32(1) - w) + x * w
    assert np.max(np.abs(plain - reference) / np.abs(reference)) > 1e-6


def test_average_between_two_running_averages_is_the_mean_of_the_snapshots_between(snapshots):
    counts = (1, 1234, FOLDS - 100, FOLDS)
    saved = dict(zip(counts, _running(snapshots, counts)))
    snapshots64 = snapshots.astype(np.float64)
    # From the start (an empty running average), and between two (the last 100 folds: the end's average
    # weighs 50 times, so its rounding errors are magnified the most).
    for start, end in ((0, 1234), (1, FOLDS), (1234, FOLDS), (FOLDS - 100, FOLDS)):
        a_start = np.zeros(64) if start == 0 else averaging.average_value(saved[start])["w"]
        got = averaging.average_between((start, {"w": a_start}), (end, averaging.average_value(saved[end])))
        np.testing.assert_allclose(got["w"], snapshots64[start:end].mean(axis=0), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="no snapshot between"):
        averaging.average_between((5, {"w": a_start}), (5, {"w": a_start}))
