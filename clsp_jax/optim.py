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

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clsp_jax.models.clsp import LOGIT_SCALE_MAX
from clsp_jax.optim_config import default_optim_config
from clsp_jax.sharding import path_str

SCHEDULES = ("warmup_cosine", "eden", "constant")


def resolve_config(cfg: Mapping | None) -> dict:
    """Defaults merged with `cfg` (dict or ConfigDict), validated -> plain dict."""
    given = {} if cfg is None else dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    out = default_optim_config()
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ValueError(f"unknown optimizer config keys {unknown}; known: {sorted(out)}")
    out.update(given)
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


def make_optimizer(cfg: Mapping, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """-> (tx, base schedule). `params`: the trainable pytree (nnx.State or nested dict) or its shapes.

    tx = multi_transform({trainable: clip_by_global_norm -> Adam -> decoupled decay (masked) -> x lr_scale
    -> x -schedule, frozen: set_to_zero}); frozen leaves hold optax.MaskedNode in every state, i.e. no
    moments. Per parameter, the update is AdamW's with LR schedule(count) * lr_scale (decay scales too).
    """
    cfg = resolve_config(cfg)
    rules = _Rules(cfg)
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not paths:
        raise ValueError("make_optimizer got a params pytree without leaves")
    rules.check_matches(paths)
    schedule = make_schedule(cfg)
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
