"""Zipformer's training-time regularisers (icefall `scaling.py`), as JAX ops.

Each gradient-shaping op is a `jax.custom_vjp` whose forward is the identity, so a network's forward values
do not depend on them; only the gradient that flows back through them changes:

  scale_grad              multiplies the gradient by a constant.
  limit_param_value       flips the sign of gradients that would push a parameter further outside [min, max].
  penalize_abs_values_gt  adds the gradient of `penalty * sum(relu(|x| - limit))`.
  balancer                adds, per channel, a push towards a range of mean/stddev and of RMS, scaled by the
                          size of the incoming gradient (`Balancer`).
  whiten                  adds the gradient of a whitening metric of the channel covariance when the metric
                          exceeds a limit, scaled to a fraction of the incoming gradient's norm (`Whiten`).

icefall applies most of them on a random fraction of forward calls (its `prob` arguments, drawn with Python's
`random`). Here the draw is explicit: the ops take an `active` bool scalar, and the `Balancer` / `Whiten`
sites take it from a `Draws`, one module's uniform draws made from a single key of the "dropout" stream of
an `nnx.Rngs` (one key per module rather than per site keeps the traced program small: every key costs a
hash). `None` in place of the draws means eval mode (identity, no draw).

Differences from icefall, all in when the ops fire, none in what they compute:
- icefall's `Whiten` keeps state between calls: after a backward pass whose metric was under the limit it
  fires with probability `min_prob` (0.025 in Zipformer), otherwise `max_prob` (0.25). A custom VJP cannot
  write module state, so `Whiten` here fires with one fixed probability (default `max_prob`). The penalty only
  acts when the metric is over the limit, so while a constraint is violated both fire equally often; while it
  is met both leave the gradient unchanged, and this one merely evaluates the metric more often.
- icefall's `Balancer` also skips ~5% of calls when CUDA memory use is in its top 5%; not reproduced.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

_TINY = 1e-20  # icefall's floor on variances, norms and RMS values


class Draws:
    """The random draws of one module's regulariser sites: `size` uniforms from one key of `rngs`'s "dropout"
    stream, handed out in call order by `coin`; `rngs` stays available for per-sequence masks."""

    def __init__(self, rngs: nnx.Rngs, size: int = 32):
        self.rngs = rngs
        self._uniform = jax.random.uniform(rngs["dropout"](), (size,))
        self._used = 0

    def coin(self, prob: float) -> jax.Array:
        """A bool scalar, True with probability `prob`."""
        if self._used == self._uniform.shape[0]:
            raise ValueError(f"Draws: all {self._used} draws used; make it with a larger size")
        self._used += 1
        return self._uniform[self._used - 1] < prob


# ----------------------------------------------------------------------------------------------------------
# scale_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_grad(x: jax.Array, alpha: float) -> jax.Array:
    """Identity forward; the backward pass multiplies the gradient by `alpha` (icefall ScaleGrad)."""
    return x


def _scale_grad_fwd(x, alpha):
    return x, None


def _scale_grad_bwd(alpha, _, g):
    return ((g * alpha).astype(g.dtype),)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


# ----------------------------------------------------------------------------------------------------------
# limit_param_value


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def limit_param_value(x: jax.Array, active: jax.Array, min_value: float, max_value: float) -> jax.Array:
    """Identity forward. Backward, where `active`: below `min_value` a positive gradient (which gradient
    descent would follow downwards) is negated, above `max_value` a negative one is, so the optimiser moves
    elements back into [min_value, max_value]. Any shape; `active` a bool scalar."""
    return x


def _limit_fwd(x, active, min_value, max_value):
    return x, (x, active)


def _limit_bwd(min_value, max_value, res, g):
    x, active = res
    flipped = jnp.where((g > 0) & (x < min_value), -g, g)
    flipped = jnp.where((flipped < 0) & (x > max_value), -flipped, flipped)
    return jnp.where(active, flipped, g), None


limit_param_value.defvjp(_limit_fwd, _limit_bwd)


# ----------------------------------------------------------------------------------------------------------
# penalize_abs_values_gt


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def penalize_abs_values_gt(x: jax.Array, active: jax.Array, limit: float, penalty: float) -> jax.Array:
    """Identity forward; where `active`, the backward pass adds the gradient of
    `penalty * sum(relu(|x| - limit))`, i.e. `penalty * sign(x)` on elements with |x| > limit."""
    return x


def _penalize_fwd(x, active, limit, penalty):
    return x, (x, active)


def _penalize_bwd(limit, penalty, res, g):
    x, active = res
    extra = jnp.where(active & (jnp.abs(x) > limit), penalty * jnp.sign(x), 0.0)
    return (g + extra.astype(g.dtype)).astype(g.dtype), None


penalize_abs_values_gt.defvjp(_penalize_fwd, _penalize_bwd)


# ----------------------------------------------------------------------------------------------------------
# balancer


@dataclasses.dataclass(frozen=True)
class BalancerLimits:
    """The balancer's per-channel targets in the form its penalty uses: mean/stddev in [min_mean, max_mean],
    RMS in [min_rms, max_rms]; `grad_scale` is the RMS of the added term relative to |gradient|."""

    min_mean: float
    max_mean: float
    min_rms: float
    max_rms: float
    grad_scale: float

    @classmethod
    def from_proportions(cls, min_positive, max_positive, min_abs, max_abs, grad_scale) -> "BalancerLimits":
        """From icefall's arguments: the fraction of positive values and the mean absolute value per channel.

        For Gaussian data, mean |x| = sqrt(2/pi) * RMS, and the fraction positive p is Phi(mean/stddev),
        inverted here with icefall's approximation erfinv(y) ~= atanh(y) / (sqrt(pi) ln 2) on y = 2p - 1.
        """

        def positive_to_mean(p: float) -> float:
            y = 2.0 * p - 1.0
            eps = 1e-10  # keeps p = 0 or 1 finite
            return 0.8139535143 * 0.5 * (math.log(1.0 + y + eps) - math.log(1.0 - y + eps))

        abs_to_rms = 1.25331413732  # sqrt(pi / 2)
        return cls(positive_to_mean(min_positive), positive_to_mean(max_positive), abs_to_rms * min_abs,
                   abs_to_rms * max_abs, grad_scale)


def _balancer_penalty(x: jax.Array, limits: BalancerLimits) -> jax.Array:
    """Sum over channels of how far each channel's mean/stddev and log-RMS lie outside their ranges;
    x [..., C] float32, statistics over all leading axes."""
    axes = tuple(range(x.ndim - 1))
    mean_sq = jnp.mean(x * x, axis=axes)
    mean = jnp.mean(x, axis=axes)
    stddev = jnp.sqrt(jnp.maximum(mean_sq - mean * mean, _TINY))
    rms = jnp.sqrt(jnp.maximum(mean_sq, _TINY))
    m = mean / stddev
    mean_excess = jax.nn.relu(m - limits.max_mean) + jax.nn.relu(limits.min_mean - m)
    log_rms = jnp.log(rms)
    # the limits' logs are constants (min_rms may be 0: log -inf, a term that is never positive)
    rms_excess = jax.nn.relu(log_rms - jnp.log(limits.max_rms)) + jax.nn.relu(jnp.log(limits.min_rms) - log_rms)
    return jnp.sum(mean_excess + rms_excess)


def balancer_grad(x: jax.Array, g: jax.Array, limits: BalancerLimits) -> jax.Array:
    """The balancer's backward pass: g + |g| * d, d = the penalty's gradient with each channel rescaled to
    RMS `grad_scale`. x, g [..., C]; returns g's dtype (computed in float32)."""
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    d = jax.grad(_balancer_penalty)(x32, limits)
    d_rms = jnp.maximum(jnp.sqrt(jnp.mean(d * d, axis=axes, keepdims=True)), _TINY)
    return (g32 + jnp.abs(g32) * (d * (limits.grad_scale / d_rms))).astype(g.dtype)


def _gated(grad_fn):
    """`op(x, active, limits)`: identity forward; where `active` (a scalar bool) the backward pass is
    `grad_fn(x, g, limits)`, else g unchanged (`lax.cond`, so an inactive site skips that work)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def op(x, active, limits):
        return x

    def fwd(x, active, limits):
        return x, (x, active)

    def bwd(limits, res, g):
        x, active = res
        return jax.lax.cond(active, lambda: grad_fn(x, g, limits), lambda: g), None

    op.defvjp(fwd, bwd)
    return op


# x [..., C] (channels last), active: scalar bool.
balancer = _gated(balancer_grad)


@dataclasses.dataclass(frozen=True)
class Balancer:
    """A balancer site with icefall's arguments (defaults: icefall's `Balancer` defaults, `prob` at the end of
    its schedule). Call `(x [..., C], draws)`: identity when `draws` is None, else active with probability
    `prob`."""

    min_positive: float = 0.05
    max_positive: float = 0.95
    min_abs: float = 0.2
    max_abs: float = 100.0
    grad_scale: float = 0.04
    prob: float = 0.125

    @property
    def limits(self) -> BalancerLimits:
        return BalancerLimits.from_proportions(self.min_positive, self.max_positive, self.min_abs, self.max_abs,
                                               self.grad_scale)

    def __call__(self, x: jax.Array, draws: Draws | None) -> jax.Array:
        if draws is None:
            return x
        return balancer(x, draws.coin(self.prob), self.limits)


# ----------------------------------------------------------------------------------------------------------
# whiten


def whitening_metric(x: jax.Array, num_groups: int) -> jax.Array:
    """1.0 when, within each of `num_groups` channel groups, the centred covariance is a multiple of I (the
    same multiple in every group); larger otherwise. x [..., C] float32 -> scalar; frames are all leading
    positions."""
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"whitening_metric: {c} channels do not split into {num_groups} groups")
    per_group = c // num_groups
    x = x.reshape(-1, num_groups, per_group)
    x = x - jnp.mean(x, axis=0, keepdims=True)
    covar = jnp.einsum("ngi,ngj->gij", x, x, precision=jax.lax.Precision.HIGHEST)
    mean_diag = jnp.mean(jnp.diagonal(covar, axis1=1, axis2=2))
    # mean diagonal of covar @ covar (covar is symmetric)
    mean_diag_of_square = jnp.sum(covar * covar) / (num_groups * per_group)
    return mean_diag_of_square / (mean_diag * mean_diag + _TINY)


@dataclasses.dataclass(frozen=True)
class WhitenLimits:
    num_groups: int
    whitening_limit: float
    grad_scale: float


def whiten_grad(x: jax.Array, g: jax.Array, limits: WhitenLimits) -> jax.Array:
    """The whitener's backward pass: g unchanged while the metric is under the limit, else g plus the
    metric's gradient rescaled to norm grad_scale * |g| (norms over the whole tensor). Returns g's dtype."""
    metric, d = jax.value_and_grad(whitening_metric)(x.astype(jnp.float32), limits.num_groups)
    g32 = g.astype(jnp.float32)
    scale = limits.grad_scale * jnp.linalg.norm(g32) / (jnp.linalg.norm(d) + _TINY)
    return jnp.where(metric < limits.whitening_limit, g, g + (d * scale).astype(g.dtype))


whiten = _gated(whiten_grad)  # x [..., C] (channels last), active: scalar bool


@dataclasses.dataclass(frozen=True)
class Whiten:
    """A whitening site with icefall's arguments; `prob` is its `max_prob` (see the module doc). Call
    `(x [..., C], draws)`: identity when `draws` is None, else active with probability `prob`."""

    whitening_limit: float
    grad_scale: float
    num_groups: int = 1
    prob: float = 0.25

    def __call__(self, x: jax.Array, draws: Draws | None) -> jax.Array:
        if draws is None:
            return x
        limits = WhitenLimits(self.num_groups, self.whitening_limit, self.grad_scale)
        return whiten(x, draws.coin(self.prob), limits)
