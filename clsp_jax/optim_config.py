"""The optimizer's config: its keys and their defaults (`clsp_jax.optim` builds the optimizer from them).
Imports no jax or optax, so a training config loads fast.

One flat mapping (a dict or an `ml_collections.ConfigDict`); `clsp_jax.optim.resolve_config` fills missing keys
from `default_optim_config()` and rejects unknown ones. Keys:

  base_lr          peak LR of unscaled parameters (the new heads, logit_scale). Default 1e-3.
  schedule         "warmup_cosine" (default) | "eden" | "constant".
  warmup_steps     linear warmup length in optimizer steps (Eden's `warmup_batches`). Default 1000.
  warmup_start     LR at step 0 as a fraction of base_lr; the warmup rises linearly from it to 1.
                   Default 0.0 (Eden's own default is 0.5).
  total_steps      warmup_cosine only: the step where the cosine reaches its floor. Required there.
  min_lr_ratio     warmup_cosine only: floor = base_lr * min_lr_ratio. Default 0.01.
  eden_lr_batches  Eden `lr_batches`. Default 100000 (the authors' fine-tuning value).
  eden_lr_epochs   Eden `lr_epochs`. Default 100 (the authors' fine-tuning value).
  steps_per_epoch  Eden only: optimizer steps per data epoch, to derive Eden's epoch index. Required there.
  optimizer        "adamw" (default) | "scaled_adam" (icefall's ScaledAdam, the authors' optimizer:
                   `clsp_jax.optim.scaled_adam`; one clipping group per distinct LR, as icefall's param
                   groups).
  b1, b2, eps      Adam moments (ScaledAdam's betas and eps too). Defaults 0.9, 0.98, 1e-8 (b2 and eps as in
                   the authors' ScaledAdam).
  weight_decay     AdamW only: decoupled weight decay, multiplied by the parameter's LR. Default 0.01.
  no_decay         AdamW only: regexes; matching parameters get no weight decay. Parameters with ndim < 2
                   (biases, norm scales, bypass scales, logit_scale) never decay. Default [] (kernels and
                   embeddings decay).
  clip_norm        AdamW only: global-norm gradient clipping threshold over the trainable parameters;
                   None = off. Default 1.0.
  clipping_scale   ScaledAdam only: clip each group's gradient norm to this multiple of the median of its
                   recent norms; None = off. Default 2.0 (the authors' value).
  clipping_update_period  ScaledAdam only: updates between refreshes of the clipping threshold (and the
                   length of the norm history); clipping starts at this update. Default 100.
  scalar_lr_scale  ScaledAdam only: LR factor of size-1 tensors and of every tensor's scale. Default 0.1.
  param_min_rms, param_max_rms  ScaledAdam only: bounds of a tensor's RMS for its scale updates. Defaults
                   1e-5, 3.0.
  scalar_max       ScaledAdam only: size-1 tensors are clamped to [-scalar_max, scalar_max] before each
                   step. Default 10.0.
  size_update_period  ScaledAdam only: updates between scale updates (and RMS refreshes). Default 4.
  param_groups     list of {"pattern": regex, "lr_scale": float, "name"?: str}; a parameter takes the
                   lr_scale of the first pattern that matches its path, else 1. Default: the two towers
                   (speech encoder_embed + encoder, text encoder) at 0.02222 of base_lr, as the authors'
                   `--encoder-lr-scale 0.02222`.
  frozen           regexes; matching parameters get zero updates and hold no optimizer state. Default [].
  ema_decay        decay of a float32 weight EMA kept by the train step (`clsp_jax.optim.ema_update`); None = off.
  average_period   icefall's model averaging: every this many steps the train step folds the weights into a
                   running mean of the snapshots since the start (`clsp_jax.averaging`); None or 0 = off.
                   The authors' value is 200.

Parameter paths (the patterns' subject) are described in `clsp_jax.optim`.
"""

import copy

TOWERS_PATTERN = r"^(speech|text_encoder)/"
ENCODER_LR_SCALE = 0.02222  # the authors' --encoder-lr-scale: towers at ~0.001 when base_lr is 0.045

_DEFAULTS = dict(
    base_lr=1e-3,
    schedule="warmup_cosine",
    warmup_steps=1000,
    warmup_start=0.0,
    total_steps=None,
    min_lr_ratio=0.01,
    eden_lr_batches=100000.0,
    eden_lr_epochs=100.0,
    steps_per_epoch=None,
    optimizer="adamw",
    b1=0.9,
    b2=0.98,
    eps=1e-8,
    clipping_scale=2.0,
    clipping_update_period=100,
    scalar_lr_scale=0.1,
    param_min_rms=1e-5,
    param_max_rms=3.0,
    scalar_max=10.0,
    size_update_period=4,
    weight_decay=0.01,
    no_decay=[],
    clip_norm=1.0,
    param_groups=[{"name": "towers", "pattern": TOWERS_PATTERN, "lr_scale": ENCODER_LR_SCALE}],
    frozen=[],
    ema_decay=None,
    average_period=None,
)


def default_optim_config() -> dict:
    """AdamW + linear warmup + cosine, heads at 1e-3, towers at 0.02222x; `total_steps` must be set."""
    return copy.deepcopy(_DEFAULTS)


def faithful_optim_config() -> dict:
    """The authors' stage-1 optimizer: ScaledAdam (clipping 2x the median norm of the last 100 updates) with
    Eden (lr_batches 1e5, lr_epochs 100, 500 warmup steps from 0.5), base 0.045, towers 0.02222x.
    `steps_per_epoch` must be set.

    ScaledAdam's per-tensor update is the Adam direction times the tensor's RMS, so 0.045 acts like ~1e-3
    on typical 0.02-RMS weights; AdamW at these numbers would take far larger steps.
    """
    cfg = default_optim_config()
    cfg.update(optimizer="scaled_adam", schedule="eden", base_lr=0.045, warmup_steps=500, warmup_start=0.5,
               weight_decay=0.0, clip_norm=None)
    return cfg
