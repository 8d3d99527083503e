"""The sharded CLSP train step: fbank -> both towers -> contrastive objective -> optax update.

State is a plain pytree (`TrainState` dict) so Orbax and sharding see arrays only:

    {"step": int32 [], "params": nested dict of Params (float32 master weights), "opt_state": optax state,
     "ema": float32 params or None, "nonfinite_streak": int32 []}

The network runs with `dtype` = the compute dtype (bf16 by default on accelerators) over float32 master
weights. Dropout randomness is `fold_in(seed, step)`: a step's result depends only on the state and batch.

Batch (global arrays, clips on the leading axis, sharded over (data, fsdp)):
    audio [B, N] float32 waveform, audio_lens [B] int32, input_ids / attention_mask [B, C, L] int32
    (C captions per clip: 1 in stage 1, 2 in stage 2, 3 in stage 3 with the hard negative last),
    caption_mask [B, C] bool (optional), negative_valid [B] bool (stage 3). With a frozen text encoder the
    captions may come as text_states [B, C, H] float32 instead of tokens (`clsp_jax.train.text_cache`).

No gradient accumulation: contrastive losses need every negative of the global batch in one step, and
accumulating micro-batches would shrink the negatives (GradCache would be needed); scale the mesh instead,
and trade FLOPs for activation memory with the model's per-layer remat (`model.remat`, see
`clsp_jax.models.remat`). `clsp_jax.sharding.init_sharded_state` builds the state in its shardings and
`clsp_jax.sharding.jit_train_step` jits the step over a mesh with the state donated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clsp_jax import losses, optim
from clsp_jax.features import fbank
from clsp_jax.models.clsp import CLSPNet


def _clip(a, t, scale, batch, cfg, axis_name):
    return losses.clip_loss(a, t[:, 0], scale, axis_name=axis_name)


def _multi_positive(a, t, scale, batch, cfg, axis_name):
    return losses.multi_positive_loss(a, t, scale, batch.get("caption_mask"), axis_name=axis_name)


def _hard_negative(a, t, scale, batch, cfg, axis_name):
    return losses.hard_negative_loss(a, t[:, :-1], t[:, -1], scale, cfg.get("hard_negative_weight", 0.2),
                                     tuple(cfg.get("hard_negative_positives", (0,))), batch.get("negative_valid"),
                                     axis_name=axis_name)


# objective name -> (loss(audio [B,D], text [B,C,D], scale, batch, cfg, axis_name), captions per clip C)
OBJECTIVES: dict[str, tuple[Callable, int]] = {
    "clip": (_clip, 1),
    "multi_positive": (_multi_positive, 2),
    "hard_negative": (_hard_negative, 3),
}
STAGE_OBJECTIVE = {1: "clip", 2: "multi_positive", 3: "hard_negative"}


def captions_per_clip(objective: str) -> int:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective][1]


def init_state(net: CLSPNet, tx: optax.GradientTransformation, ema: bool = False) -> dict:
    """The train state of `net`; params are a plain nested dict (what Orbax saves and nnx.merge takes)."""
    return state_from_params(nnx.to_pure_dict(nnx.state(net, nnx.Param)), tx, ema)


def state_from_params(params, tx: optax.GradientTransformation, ema: bool = False) -> dict:
    """The train state at step 0 around `params` (a nested dict of arrays): fresh optimizer state and EMA."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": optim.ema_init(params) if ema else None,
        "nonfinite_streak": jnp.zeros((), jnp.int32),
    }


def embed_batch(net: CLSPNet, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """audio + captions of a batch -> (audio_emb [B, D], text_emb [B, C, D]), float32 unit vectors.

    With `rngs` dropout is on (training); without, the forward is deterministic (evaluation).
    """
    feats, feat_lens = fbank(batch["audio"], batch["audio_lens"])
    deterministic = rngs is None
    audio_emb = net.embed_features(feats, feat_lens, deterministic=deterministic, rngs=rngs)
    if "text_states" in batch:  # cached [CLS] states of a frozen text encoder (clsp_jax.train.text_cache)
        b, c, h = batch["text_states"].shape
        text_emb = net.embed_cls_states(batch["text_states"].reshape(b * c, h), deterministic=deterministic, rngs=rngs)
        return audio_emb, text_emb.reshape(b, c, -1)
    b, c, l = batch["input_ids"].shape
    text_emb = net.embed_tokens(batch["input_ids"].reshape(b * c, l), batch["attention_mask"].reshape(b * c, l),
                                deterministic=deterministic, rngs=rngs)
    return audio_emb, text_emb.reshape(b, c, -1)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule, cfg: Mapping,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Returns the (unjitted) step `(state, batch) -> (state, metrics)`.

    Args:
      graphdef, rest: from `nnx.split(net, nnx.Param, ...)`; `rest` holds the non-param state (rng streams).
      tx, schedule: from `clsp_jax.optim.make_optimizer`.
      cfg: train config keys: objective, seed, ema_decay, hard_negative_weight, hard_negative_positives,
        frozen (the optimizer's frozen-parameter regexes: their backward pass is skipped).
      mesh: when given, the loss runs in shard_map over its batch axes (all-gathered features).
    """
    objective = cfg.get("objective", "clip")
    captions_per_clip(objective)  # validates the name
    loss_fn = OBJECTIVES[objective][0]
    seed = int(cfg.get("seed", 0))
    ema_decay = cfg.get("ema_decay")

    frozen = list(cfg.get("frozen", ()))

    def compute_loss(params, batch, step):
        net = nnx.merge(graphdef, optim.stop_frozen_gradients(frozen, params), rest)
        rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(seed), step))
        audio_emb, text_emb = embed_batch(net, batch, rngs)
        scale = net.scale()
        extra = {k: batch[k] for k in ("caption_mask", "negative_valid") if k in batch}

        def objective_fn(a, t, s, extra, axis_name=None):
            return loss_fn(a, t, s, extra, cfg, axis_name)

        fn = objective_fn if mesh is None else losses.sharded(objective_fn, mesh)
        return fn(audio_emb, text_emb, scale, extra)

    def step_fn(state, batch):
        step = state["step"]
        (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"], batch, step)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optim.clamp_logit_scale(optax.apply_updates(state["params"], updates))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite loss or gradient skips the update (the trainer counts the streak and stops on too many).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "step": step + 1,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "ema": (keep(optim.ema_update(state["ema"], params, ema_decay), state["ema"])
                    if state["ema"] is not None else None),
            "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
        }
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(step),
                   "nonfinite": (~finite).astype(jnp.int32)}
        return new_state, metrics

    return step_fn
