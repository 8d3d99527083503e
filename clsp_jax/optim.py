"""Optimizer, learning-rate schedules, temperature clamp and weight EMA for CLSP training (pure optax).

Everything is configured by one flat mapping (a dict or an `ml_collections.ConfigDict`); missing keys take
the values of `clsp_jax.optim_config.default_optim_config()`, where the keys are described; unknown keys are a
ValueError.

A parameter's path is its pytree key path joined by "/", e.g.
"speech/encoder/encoders/0/layers/1/self_attn1/in_proj/kernel", "text_encoder/encoder/layer/3/output/
dense/kernel", "audio_projection/0/kernel", "logit_scale"; patterns use `re.search`, so anchor with "^".
The same paths come out of an `nnx.State` (whose Variables add a trailing `.value` attribute, dropped
here) and out of the equivalent plain nested dict.

Step convention: the update that moves the optimizer from `count` to `count + 1` applied updates uses
LR `schedule(count) * lr_scale`, so for logging at train step `count` (0-based, before the update),
`learning_rates(cfg, count)` gives each group's LR.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clsp_jax.models.clsp import LOGIT_SCALE_MAX
from clsp_jax.optim_config import default_optim_config
from clsp_jax.sharding import path_str

SCHEDULES = ("warmup_cosine", "eden", "constant")
OPTIMIZERS = ("adamw", "scaled_adam")


def resolve_config(cfg: Mapping | None) -> dict:
    """Defaults merged with `cfg` (dict or ConfigDict), validated -> plain dict."""
    given = {} if cfg is None else dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    out = default_optim_config()
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ValueError(f"unknown optimizer config keys {unknown}; known: {sorted(out)}")
    out.update(given)
    if out["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {out['optimizer']!r}")
    if out["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {out['schedule']!r}")
    if not out["base_lr"] > 0:
        raise ValueError(f"base_lr must be > 0, got {out['base_lr']!r}")
    if not 0.0 <= out["warmup_start"] <= 1.0:
        raise ValueError(f"warmup_start must be in [0, 1], got {out['warmup_start']!r}")
    if out["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {out['warmup_steps']!r}")
    if out["clip_norm"] is not None and not out["clip_norm"] > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {out['clip_norm']!r}")
    if out["ema_decay"] is not None and not 0.0 <= out["ema_decay"] < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {out['ema_decay']!r}")
    if out["average_period"] is not None and not out["average_period"] >= 0:
        raise ValueError(f"average_period must be >= 0 or None, got {out['average_period']!r}")
    groups = []
    for i, group in enumerate(out["param_groups"]):
        group = dict(group)
        if set(group) - {"name", "pattern", "lr_scale"} or not {"pattern", "lr_scale"} <= set(group):
            raise ValueError(f"param_groups[{i}] needs keys pattern, lr_scale (and optional name), got {group}")
        if not group["lr_scale"] >= 0:
            raise ValueError(f"param_groups[{i}] lr_scale must be >= 0, got {group['lr_scale']!r}")
        group.setdefault("name", group["pattern"])
        groups.append(group)
    out["param_groups"] = groups
    out["no_decay"], out["frozen"] = list(out["no_decay"]), list(out["frozen"])
    for pattern in [g["pattern"] for g in groups] + out["no_decay"] + out["frozen"]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"bad regex {pattern!r} in optimizer config: {e}") from None
    return out


def _map_paths(fn, tree):
    """tree_map with `fn(path_str, leaf)`."""
    return jax.tree_util.tree_map_with_path(lambda k, x: fn(path_str(k), x), tree)


class _Rules:
    """Compiled path rules of one config (frozen, LR groups, weight-decay mask)."""

    def __init__(self, cfg: dict):
        self.groups = [(re.compile(g["pattern"]), float(g["lr_scale"])) for g in cfg["param_groups"]]
        self.frozen = [re.compile(p) for p in cfg["frozen"]]
        self.no_decay = [re.compile(p) for p in cfg["no_decay"]]

    def is_frozen(self, path: str) -> bool:
        return any(p.search(path) for p in self.frozen)

    def lr_scale(self, path: str) -> float:
        return next((scale for p, scale in self.groups if p.search(path)), 1.0)

    def decays(self, path: str, ndim: int) -> bool:
        return ndim >= 2 and not any(p.search(path) for p in self.no_decay)

    def check_matches(self, paths: list[str]) -> None:
        """Every configured pattern must match some parameter: a typo would silently train at full LR."""
        named = [(p, "param_groups") for p, _ in self.groups] + [(p, "frozen") for p in self.frozen]
        named += [(p, "no_decay") for p in self.no_decay]
        for pattern, key in named:
            if not any(pattern.search(path) for path in paths):
                raise ValueError(f"{key} pattern {pattern.pattern!r} matches no parameter "
                                 f"(paths look like {paths[:3]})")


def training_paths(paths: Sequence[str], frozen: Sequence[str]) -> list[str]:
    """The parameter `paths` that no `frozen` regex matches (those the optimizer trains)."""
    patterns = [re.compile(p) for p in frozen]
    return [path for path in paths if not any(p.search(path) for p in patterns)]


def stop_frozen_gradients(frozen: list[str], params):
    """`params` with `jax.lax.stop_gradient` on leaves matching the `frozen` regexes.

    The train step applies it before the forward pass, so XLA drops the backward pass of frozen towers
    instead of computing gradients that the optimizer would zero.
    """
    patterns = [re.compile(p) for p in frozen]
    if not patterns:
        return params
    return _map_paths(lambda path, x: jax.lax.stop_gradient(x) if any(p.search(path) for p in patterns) else x,
                      params)


def lr_scale_for(cfg: Mapping, path: str) -> float:
    """LR multiplier of the parameter at `path`: the first matching param group's lr_scale, else 1."""
    return _Rules(resolve_config(cfg)).lr_scale(path)


def eden_factor(batch, epoch, lr_batches, lr_epochs, warmup_batches, warmup_start):
    """icefall's Eden multiplier of base_lr (works on floats or jax arrays):

        ((batch² + lr_batches²)/lr_batches²)^-¼ · ((epoch² + lr_epochs²)/lr_epochs²)^-¼ · warmup,
        warmup = warmup_start + (1 - warmup_start)·batch/warmup_batches  if batch < warmup_batches else 1.

    `batch` is icefall's 1-based count of batches seen so far, `epoch` its 0-based epoch index.
    """
    decay = ((batch**2 + lr_batches**2) / lr_batches**2) ** -0.25
    decay = decay * ((epoch**2 + lr_epochs**2) / lr_epochs**2) ** -0.25
    ramp = warmup_start + (1.0 - warmup_start) * batch / max(warmup_batches, 1e-30)
    return decay * jnp.where(batch >= warmup_batches, 1.0, ramp)


def make_schedule(cfg: Mapping) -> optax.Schedule:
    """The base-LR schedule (multiply by a group's lr_scale for that group), a function of optax's count.

    "eden": icefall sets the LR for its n-th update (1-based `batch_idx_train = n`) in 0-based epoch
    e = (n-1) // steps_per_epoch, so optax count c maps to batch = c + 1, epoch = c // steps_per_epoch
    (an integer, stepping once per epoch as icefall's `step_epoch` does).
    """
    cfg = resolve_config(cfg)
    base, warmup, start = float(cfg["base_lr"]), int(cfg["warmup_steps"]), float(cfg["warmup_start"])
    if cfg["schedule"] == "constant":
        return optax.constant_schedule(base)
    if cfg["schedule"] == "warmup_cosine":
        total = cfg["total_steps"]
        if total is None or total <= warmup:
            raise ValueError(f"warmup_cosine needs total_steps > warmup_steps={warmup}, got {total!r}")
        return optax.warmup_cosine_decay_schedule(
            init_value=base * start, peak_value=base, warmup_steps=warmup, decay_steps=int(total),
            end_value=base * float(cfg["min_lr_ratio"]))
    spe = cfg["steps_per_epoch"]
    if spe is None or spe <= 0:
        raise ValueError(f"eden needs steps_per_epoch > 0 (optimizer steps per data epoch), got {spe!r}")
    lr_batches, lr_epochs = float(cfg["eden_lr_batches"]), float(cfg["eden_lr_epochs"])

    def eden(count):
        count = jnp.asarray(count, jnp.int32)
        batch = (count + 1).astype(jnp.float32)
        epoch = (count // int(spe)).astype(jnp.float32)
        return base * eden_factor(batch, epoch, lr_batches, lr_epochs, float(warmup), start)

    return eden


def learning_rates(cfg: Mapping, count) -> dict[str, float]:
    """{"lr": base LR, "lr/<group name>": base LR * lr_scale} used by the update at optax count `count`."""
    cfg = resolve_config(cfg)
    lr = float(make_schedule(cfg)(count))
    return {"lr": lr, **{f"lr/{g['name']}": lr * float(g["lr_scale"]) for g in cfg["param_groups"]}}


def _scale_by_path(scale_of) -> optax.GradientTransformation:
    """Multiplies each update leaf by `scale_of(path)` (a static Python float per parameter)."""

    def update(updates, state, params=None):
        del params
        return _map_paths(lambda path, u: u * scale_of(path), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ScaledAdamState(NamedTuple):
    """State of `scaled_adam`: arrays only (Orbax saves it like Adam's). Per-tensor fields mirror the params.

    count: int32 [], updates applied so far (icefall's `step`).
    delta: like each param: the momentum of the parameter change (size update and Adam step together).
    exp_avg_sq: like each param: the running mean of squared gradients.
    param_rms: float32 [] per param: its RMS, refreshed every `size_update_period` updates (unused, like the
      next two, for size-1 tensors).
    scale_exp_avg_sq: float32 [] per param: the running mean of the squared scale gradients.
    scale_grads: float32 [size_update_period] per param: sum(param * grad) of the last period's updates.
    model_norms: float32 [clipping_update_period]: the recent gradient norms, a ring indexed by count.
    norm_threshold: float32 []: clipping_scale x the median of `model_norms` at the last refresh.
    has_threshold: bool []: whether `norm_threshold` was ever set.
    clip_factor: float32 []: the factor the last update's gradients were multiplied by (1: not clipped).
    """

    count: jax.Array
    delta: Any
    exp_avg_sq: Any
    param_rms: Any
    scale_exp_avg_sq: Any
    scale_grads: Any
    model_norms: jax.Array
    norm_threshold: jax.Array
    has_threshold: jax.Array
    clip_factor: jax.Array


def scaled_adam(learning_rate: float | optax.Schedule, *, clipping_scale: float | None = 2.0,
                betas: tuple[float, float] = (0.9, 0.98), scalar_lr_scale: float = 0.1, eps: float = 1e-8,
                param_min_rms: float = 1e-5, param_max_rms: float = 3.0, scalar_max: float = 10.0,
                size_update_period: int = 4, clipping_update_period: int = 100) -> optax.GradientTransformation:
    """icefall's ScaledAdam (the Zipformer's optimizer) over any pytree of arrays, update for update.

    Tensors with more than one element take Adam steps (no first-moment bias correction; the second moment's
    correction stops once it exceeds 0.99) scaled by the tensor's RMS (at least `param_min_rms`), plus a
    learned change of the tensor's overall scale every `size_update_period` updates at LR x
    `scalar_lr_scale`, which never shrinks a tensor whose RMS is under `param_min_rms` nor grows it past
    `param_max_rms`. Size-1 tensors (0-d included) take plain Adam steps at LR x `scalar_lr_scale`, after
    being clamped to [-scalar_max, scalar_max]. Both kinds share one momentum `delta` (beta1).

    Clipping (`clipping_scale` not None): the update's gradient norm is sqrt(sum over tensors of
    |grad x param_rms|², size-1 tensors unscaled). Each update from the second on records its norm in a
    ring of `clipping_update_period` slots (an all-zero gradient records nothing); when count is a multiple
    of the period the threshold becomes clipping_scale x the ring's median (its largest quartile value if the
    median is 0). From update `clipping_update_period` on, gradients are scaled down to the threshold
    (an infinite norm zeroes them); a threshold never set (an all-zero gradient at the refresh) scales them
    by 20, as icefall does. The whole pytree is one clipping group: icefall clips each param group (one per
    learning rate) separately, so `make_optimizer` builds one `scaled_adam` per LR scale.

    Args:
      learning_rate: float, or an optax schedule of the update count (0 for the first update).
      the rest: icefall's ScaledAdam arguments of the same names.
    Returns the transformation; its `update` needs `params` (the clamp of size-1 tensors and the scale
    update read them). The state is a `ScaledAdamState`.
    """
    beta1, beta2 = (float(b) for b in betas)
    if not 0.0 < beta1 <= beta2 < 1.0:
        raise ValueError(f"scaled_adam betas must satisfy 0 < beta1 <= beta2 < 1, got {betas!r}")
    if clipping_scale is not None and not clipping_scale > 0:
        raise ValueError(f"scaled_adam clipping_scale must be > 0 or None, got {clipping_scale!r}")
    if not 0.0 < param_min_rms < param_max_rms:
        raise ValueError(f"scaled_adam needs 0 < param_min_rms < param_max_rms, got {param_min_rms!r}, "
                         f"{param_max_rms!r}")
    for name, value in (("size_update_period", size_update_period),
                        ("clipping_update_period", clipping_update_period)):
        if int(value) != value or value < 1:
            raise ValueError(f"scaled_adam {name} must be an integer >= 1, got {value!r}")
    size_period, clip_period = int(size_update_period), int(clipping_update_period)
    # icefall's quartile indices into the sorted ring: the median, and the top quartile used when it is 0.
    median_at = min(clip_period - 1, (clip_period // 4) * 2)
    top_at = min(clip_period - 1, (clip_period // 4) * 4)
    # 1 - beta**n as -expm1(n log beta): float32 keeps its relative precision where 1 - beta**n is small.
    log_beta2, log_beta2_size = math.log(beta2), size_period * math.log(beta2)
    beta2_size = beta2**size_period  # beta2 per scale update, which comes once per period
    lr_of = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def is_scalar(x) -> bool:
        return math.prod(x.shape) == 1

    def rms(p):
        return jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32))))

    def init(params):
        return ScaledAdamState(
            count=jnp.zeros((), jnp.int32),
            delta=jax.tree.map(jnp.zeros_like, params),
            exp_avg_sq=jax.tree.map(jnp.zeros_like, params),
            param_rms=jax.tree.map(rms, params),
            scale_exp_avg_sq=jax.tree.map(lambda p: jnp.zeros((), jnp.float32), params),
            scale_grads=jax.tree.map(lambda p: jnp.zeros((size_period,), jnp.float32), params),
            model_norms=jnp.zeros((clip_period,), jnp.float32),
            norm_threshold=jnp.zeros((), jnp.float32),
            has_threshold=jnp.zeros((), jnp.bool_),
            clip_factor=jnp.ones((), jnp.float32),
        )

    def clipping(grads, state):
        """-> (factor, model_norms, norm_threshold, has_threshold) of this update."""
        keep = (jnp.ones((), jnp.float32), state.model_norms, state.norm_threshold, state.has_threshold)
        if clipping_scale is None:
            return keep
        # The per-tensor sums are added as one sorted vector, not as a chain of scalar additions: every tensor's
        # update reads the clipping factor, and XLA:CPU's fusion pass copies a chain of cheap additions (one per
        # tensor) into each reader, quadratic in the number of tensors (a step training the tiny config's
        # speech tower, 719 tensors, did not compile within 10 minutes). A sort is never fused, so the sum is
        # computed once; ascending order also adds the small terms first.
        sums = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32) * (1.0 if is_scalar(g) else r)))
                          for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(state.param_rms))])
        sumsq = jnp.sum(jnp.sort(sums))
        count = state.count
        norm = jnp.sqrt(sumsq)
        record = (count > 0) & (sumsq != 0)
        norms = jnp.where(record, state.model_norms.at[count % clip_period].set(norm), state.model_norms)
        ordered = jnp.sort(norms)
        median = jnp.where(ordered[median_at] == 0, ordered[top_at], ordered[median_at])
        refresh = record & (count % clip_period == 0)
        threshold = jnp.where(refresh, clipping_scale * median, state.norm_threshold)
        has_threshold = state.has_threshold | refresh
        ratio = threshold / (norm + 1e-20)
        factor = jnp.where(ratio < 1.0, ratio, 1.0)  # a NaN ratio means no clipping, as Python's min(1, nan)
        factor = jnp.where(has_threshold, factor, 20.0)
        factor = jnp.where(record & (count >= clip_period), factor, 1.0)
        return factor, norms, threshold, has_threshold

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scaled_adam's update needs params (it clamps scalars and learns tensor scales)")
        count = state.count
        lr = jnp.asarray(lr_of(count), jnp.float32)
        factor, norms, threshold, has_threshold = clipping(updates, state)
        # The last update of each size period refreshes every tensor's RMS and, past the first update, moves
        # its overall scale by the period's scale gradients. Computed every update and selected, not behind a
        # lax.cond: a cond over every tensor compiles several times slower, and the extra work is one
        # reduction per tensor.
        due = count % size_period == size_period - 1
        move_scale = due & (count > 0)
        size_step = ((count + 1) // size_period).astype(jnp.float32)
        size_correction = jnp.sqrt(-jnp.expm1(size_step * log_beta2_size))
        correction = -jnp.expm1((count + 1).astype(jnp.float32) * log_beta2)

        def one(p, g, d, v, r, s, sg):
            """-> (update, delta, exp_avg_sq, param_rms, scale_exp_avg_sq, scale_grads) of one tensor."""
            g = jnp.where(factor == 0, jnp.zeros_like(g), g * factor.astype(g.dtype))  # 0 also clears infs
            v = beta2 * v + (1.0 - beta2) * jnp.square(g)
            if is_scalar(p):
                d = beta1 * d + g / (jnp.sqrt(v / correction) + eps) * (-lr * scalar_lr_scale * (1.0 - beta1))
                return jnp.clip(p, -scalar_max, scalar_max) - p + d, d, v, r, s, sg
            sg = sg.at[count % size_period].set(jnp.sum(p.astype(jnp.float32) * g.astype(jnp.float32)))
            r = jnp.where(due, rms(p), r)
            s_moved = beta2_size * s + (1.0 - beta2_size) * jnp.mean(jnp.square(sg))
            scale_step = -lr * scalar_lr_scale * size_correction * jnp.sum(sg) / (jnp.sqrt(s_moved) + eps)
            scale_step = jnp.where(r < param_min_rms, 0.0, scale_step)  # too small: never shrink further
            scale_step = jnp.minimum(scale_step, (param_max_rms - r) / r)  # never grow past param_max_rms
            scale_step = jnp.where(move_scale, scale_step, 0.0)
            v_hat = jnp.where(correction < 0.99, v * (1.0 / correction), v)
            alpha = -lr * (1.0 - beta1) * jnp.maximum(r, param_min_rms)
            d = beta1 * d + (1.0 - beta1) * (p * scale_step.astype(p.dtype)) + g / (jnp.sqrt(v_hat) + eps) * alpha
            return d, d, v, r, jnp.where(move_scale, s_moved, s), sg

        out = jax.tree.map(one, params, updates, state.delta, state.exp_avg_sq, state.param_rms,
                           state.scale_exp_avg_sq, state.scale_grads)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)
        new_state = ScaledAdamState(
            count=count + 1, delta=pick(1), exp_avg_sq=pick(2), param_rms=pick(3), scale_exp_avg_sq=pick(4),
            scale_grads=pick(5), model_norms=norms, norm_threshold=threshold, has_threshold=has_threshold,
            clip_factor=factor)
        return pick(0), new_state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Mapping, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """-> (tx, base schedule). `params`: the trainable pytree (nnx.State or nested dict) or its shapes.

    optimizer "adamw": tx = multi_transform({trainable: clip_by_global_norm -> Adam -> decoupled decay
    (masked) -> x lr_scale -> x -schedule, frozen: set_to_zero}). Per parameter, the update is AdamW's with
    LR schedule(count) * lr_scale (decay scales too).
    optimizer "scaled_adam": tx = multi_transform({one `scaled_adam` at LR schedule(count) * s per distinct
    lr_scale s, frozen: set_to_zero}), as icefall, whose param groups are the parameters of one LR and clip
    their gradients separately.
    Frozen leaves hold optax.MaskedNode in every state, i.e. no moments.
    """
    cfg = resolve_config(cfg)
    rules = _Rules(cfg)
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not paths:
        raise ValueError("make_optimizer got a params pytree without leaves")
    rules.check_matches(paths)
    schedule = make_schedule(cfg)
    if cfg["optimizer"] == "scaled_adam":
        return _scaled_adam_groups(cfg, rules, paths, schedule), schedule
    trainable = [optax.clip_by_global_norm(float(cfg["clip_norm"]))] if cfg["clip_norm"] is not None else []
    trainable += [
        optax.scale_by_adam(b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"])),
        optax.add_decayed_weights(
            float(cfg["weight_decay"]), mask=lambda p: _map_paths(lambda path, x: rules.decays(path, x.ndim), p)),
        _scale_by_path(rules.lr_scale),
        optax.scale_by_learning_rate(schedule),
    ]
    labels = lambda p: _map_paths(lambda path, _: "frozen" if rules.is_frozen(path) else "trainable", p)
    tx = optax.multi_transform({"trainable": optax.chain(*trainable), "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def _scaled_adam_groups(cfg: dict, rules: _Rules, paths: list[str], schedule) -> optax.GradientTransformation:
    """multi_transform of one scaled_adam per distinct lr_scale (labels "lr_scale_<i>", i in sorted order
    of the scales) and set_to_zero for the frozen leaves."""
    scales = sorted({rules.lr_scale(p) for p in paths if not rules.is_frozen(p)})
    label_of = {s: f"lr_scale_{i}" for i, s in enumerate(scales)}
    kwargs = dict(clipping_scale=None if cfg["clipping_scale"] is None else float(cfg["clipping_scale"]),
                  betas=(float(cfg["b1"]), float(cfg["b2"])), scalar_lr_scale=float(cfg["scalar_lr_scale"]),
                  eps=float(cfg["eps"]), param_min_rms=float(cfg["param_min_rms"]),
                  param_max_rms=float(cfg["param_max_rms"]), scalar_max=float(cfg["scalar_max"]),
                  size_update_period=cfg["size_update_period"],
                  clipping_update_period=cfg["clipping_update_period"])
    transforms = {label_of[s]: scaled_adam(lambda count, s=s: schedule(count) * s, **kwargs) for s in scales}
    transforms["frozen"] = optax.set_to_zero()
    labels = lambda p: _map_paths(
        lambda path, _: "frozen" if rules.is_frozen(path) else label_of[rules.lr_scale(path)], p)
    return optax.multi_transform(transforms, labels)


def clip_factors(opt_state) -> dict[str, jax.Array]:
    """{path of each `ScaledAdamState` in `opt_state`: the factor its last update's gradients were scaled by
    (1 = not clipped)}; {} for other optimizers. For logging."""
    found = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, ScaledAdamState))[0]
    return {path_str(k): s.clip_factor for k, s in found if isinstance(s, ScaledAdamState)}


def clamp_logit_scale(params):
    """Clamps every leaf named `logit_scale` to [0, ln 100] (the authors clamp after each optimizer step);
    other leaves pass through. Works on nnx.State or nested dicts; raises if there is no such leaf."""
    found = []

    def clamp(path, x):
        if path.rsplit("/", 1)[-1] != "logit_scale":
            return x
        found.append(path)
        return jnp.clip(x, 0.0, LOGIT_SCALE_MAX).astype(x.dtype)

    out = _map_paths(clamp, params)
    if not found:
        raise ValueError("clamp_logit_scale found no 'logit_scale' leaf in params")
    return out


def ema_init(params):
    """A float32 copy of `params` to start the EMA from."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def ema_update(ema_params, params, decay) -> Any:
    """ema <- decay * ema + (1 - decay) * params, in float32 whatever the dtype of `params`."""
    decay = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda e, p: decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32),
                        ema_params, params)
