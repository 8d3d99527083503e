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
  b1, b2, eps      Adam moments. Defaults 0.9, 0.98, 1e-8 (b2 and eps as in the authors' ScaledAdam).
  weight_decay     decoupled (AdamW) weight decay, multiplied by the parameter's LR. Default 0.01.
  no_decay         regexes; matching parameters get no weight decay. Parameters with ndim < 2 (biases,
                   norm scales, bypass scales, logit_scale) never decay. Default [] (kernels and
                   embeddings decay).
  clip_norm        global-norm gradient clipping threshold over the trainable parameters; None = off.
                   Default 1.0.
  param_groups     list of {"pattern": regex, "lr_scale": float, "name"?: str}; a parameter takes the
                   lr_scale of the first pattern that matches its path, else 1. Default: the two towers
                   (speech encoder_embed + encoder, text encoder) at 0.02222 of base_lr, as the authors'
                   `--encoder-lr-scale 0.02222`.
  frozen           regexes; matching parameters get zero updates and hold no optimizer state. Default [].
  ema_decay        decay of a float32 weight EMA kept by the train step (`clsp_jax.optim.ema_update`); None = off.

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
    b1=0.9,
    b2=0.98,
    eps=1e-8,
    weight_decay=0.01,
    no_decay=[],
    clip_norm=1.0,
    param_groups=[{"name": "towers", "pattern": TOWERS_PATTERN, "lr_scale": ENCODER_LR_SCALE}],
    frozen=[],
    ema_decay=None,
)


def default_optim_config() -> dict:
    """AdamW + linear warmup + cosine, heads at 1e-3, towers at 0.02222x; `total_steps` must be set."""
    return copy.deepcopy(_DEFAULTS)


def faithful_optim_config() -> dict:
    """The authors' stage-1 LR numbers and schedule: Eden (lr_batches 1e5, lr_epochs 100, 500 warmup steps
    from 0.5), base 0.045, towers 0.02222x, no weight decay. `steps_per_epoch` must be set.

    Caveat: the authors pair these numbers with ScaledAdam, whose per-tensor update is the Adam direction
    times the parameter's RMS (so 0.045 acts like ~1e-3 on typical 0.02-RMS weights) with adaptive
    clipping at 2x the median gradient norm. Plain AdamW at 0.045 takes far larger steps.
    """
    cfg = default_optim_config()
    cfg.update(schedule="eden", base_lr=0.045, warmup_steps=500, warmup_start=0.5, weight_decay=0.0)
    return cfg
