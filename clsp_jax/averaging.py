"""icefall's model averaging: the running mean of the weights kept during training, and the average between
two saved steps taken from two such running means.

Every `average_period` steps (at steps period, 2·period, ...) the train step folds the weights of that
step into a running mean, so after n folds it holds the mean of n snapshots. icefall keeps it in float64;
here it lives on the devices, sharded like the parameters, as a float32 mean plus a float32 compensation
(the rounding error of the mean, recovered exactly with Knuth's TwoSum at each fold), so that
`mean + comp` tracks the float64 mean to float32 rounding of the snapshots' spread, however many folds:

    {"count": int32 [] (snapshots folded in), "mean": float32 params, "comp": float32 params}

The average over the snapshots after step START up to step END is then a function of the two running means
saved at those steps (`average_between`, float64 on the host), as icefall's
`average_checkpoints_with_averaged_model`: (n_end·A_end − n_start·A_start) / (n_end − n_start).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def average_init(params) -> dict:
    """An empty running average shaped like `params` (count 0; mean and compensation zero, so the first fold
    takes the snapshot exactly)."""
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    return {"count": jnp.zeros((), jnp.int32), "mean": zeros, "comp": jax.tree.map(jnp.zeros_like, zeros)}


def _fold(mean, comp, x, weight):
    """(mean, comp) of the float32 pair whose sum moves by `weight` · (x − (mean + comp)).

    The increment is small next to the mean after the first folds; TwoSum gives the rounding error of
    mean + increment exactly, and that error is carried in `comp` instead of being lost."""
    x = x.astype(jnp.float32)
    increment = ((x - mean) - comp) * weight + comp
    total = mean + increment
    # TwoSum (Knuth): total + error == mean + increment exactly, whatever their magnitudes.
    back = total - mean
    error = (mean - (total - back)) + (increment - back)
    return total, error


def average_update(average: dict, params, step, period: int) -> dict:
    """The running average after step `step` (the step count once this step's update is applied, an int32
    scalar, possibly traced): `params` folded in when `step` is a positive multiple of `period`, else
    unchanged. Jit-compatible; the fold is skipped with `lax.cond`, not computed and discarded."""

    def fold(average, params):
        count = average["count"] + 1
        weight = 1.0 / count.astype(jnp.float32)
        pairs = jax.tree.map(lambda m, c, x: _fold(m, c, x, weight), average["mean"], average["comp"], params)
        is_pair = lambda t: isinstance(t, tuple)
        return {"count": count,
                "mean": jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
                "comp": jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)}

    due = (step > 0) & (step % period == 0)
    return jax.lax.cond(due, fold, lambda average, _: average, average, params)


def average_value(average: dict) -> Any:
    """The running average's weights, mean + comp, as float64 numpy arrays (host)."""
    return jax.tree.map(lambda m, c: np.asarray(m, np.float64) + np.asarray(c, np.float64),
                        average["mean"], average["comp"])


def average_between(start: tuple[int, Any], end: tuple[int, Any]) -> Any:
    """The float64 mean of the snapshots folded in after `start` up to `end`, from the two running averages.

    Args:
      start, end: (count, weights) of the running averages saved at the two steps: count the number of
        snapshots each holds, weights as `average_value` gives them (a count of 0 has weights of no
        consequence). end's count must exceed start's.
    Returns: the weights, float64, as (n_end·A_end − n_start·A_start) / (n_end − n_start), written as
      A_end + n_start/(n_end − n_start) · (A_end − A_start) so that no term grows with the counts.
    """
    (n_start, a_start), (n_end, a_end) = start, end
    if not 0 <= n_start < n_end:
        raise ValueError(f"no snapshot between the two running averages (counts {n_start} and {n_end})")
    ratio = n_start / (n_end - n_start)
    return jax.tree.map(lambda e, s: np.asarray(e, np.float64) + ratio * (np.asarray(e, np.float64) - s),
                        a_end, a_start)
