"""The sharded CLSP train step: fbank -> both towers -> objective (`clsp_jax.losses.OBJECTIVES`) -> optax update.

State: the plain pytree of `clsp_jax.train.state` (step, params, opt_state, ema, nonfinite_streak, and the
running average when model averaging is on).

The network runs with `dtype` = the compute dtype (bf16 by default on accelerators) over float32 master
weights. Dropout randomness is `fold_in(seed, step)`: a step's result depends only on the state and batch.

Batch (global arrays, clips on the leading axis, sharded over (data, fsdp)):
    audio [B, N] float32 waveform, audio_lens [B] int32, input_ids / attention_mask [B, C, L] int32
    (C captions per clip: 1 in stage 1, 2 in stage 2, 3 in stage 3 with the hard negative last),
    caption_mask [B, C] bool (optional), negative_valid [B] bool (stage 3). With a frozen text encoder the
    captions may come as text_states [B, C, H] float32 instead of tokens (`clsp_jax.train.text_cache`), and
    with a frozen speech tower the clips as speech_states [B, C'] float32 (their frames' average, in eval
    mode) instead of audio / audio_lens (`clsp_jax.train.speech_cache`).

No gradient accumulation: contrastive losses need every negative of the global batch in one step, and
accumulating micro-batches would shrink the negatives (GradCache would be needed); scale the mesh instead,
and trade FLOPs for activation memory with the model's per-layer remat (`model.remat`, see
`clsp_jax.models.remat`). `clsp_jax.train.state` builds the state in its shardings and
`clsp_jax.sharding.JittedTrainStep` jits its two halves (`TrainStep`) over a mesh with the state donated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clsp_jax import averaging, losses, optim
from clsp_jax.features import fbank
from clsp_jax.models.clsp import CLSPNet


def embed_batch(net: CLSPNet, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """audio + captions of a batch -> (audio_emb [B, D], text_emb [B, C, D]), float32 unit vectors.

    With `rngs` dropout is on (training); without, the forward is deterministic (evaluation).
    """
    deterministic = rngs is None
    if "speech_states" in batch:  # cached frame averages of a frozen speech tower (clsp_jax.train.speech_cache)
        audio_emb = net.embed_pooled_audio(batch["speech_states"], deterministic=deterministic, rngs=rngs)
    else:
        feats, feat_lens = fbank(batch["audio"], batch["audio_lens"])
        audio_emb = net.embed_features(feats, feat_lens, deterministic=deterministic, rngs=rngs)
    if "text_states" in batch:  # cached [CLS] states of a frozen text encoder (clsp_jax.train.text_cache)
        b, c, h = batch["text_states"].shape
        text_emb = net.embed_cls_states(batch["text_states"].reshape(b * c, h), deterministic=deterministic, rngs=rngs)
        return audio_emb, text_emb.reshape(b, c, -1)
    b, c, l = batch["input_ids"].shape
    text_emb = net.embed_tokens(batch["input_ids"].reshape(b * c, l), batch["attention_mask"].reshape(b * c, l),
                                deterministic=deterministic, rngs=rngs)
    return audio_emb, text_emb.reshape(b, c, -1)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule, *, objective: str,
                    loss_cfg: Mapping, seed: int = 0, ema_decay: float | None = None, frozen: Sequence[str] = (),
                    mesh: jax.sharding.Mesh | None = None, average_period: int | None = None) -> TrainStep:
    """Returns the (unjitted) step `(state, batch) -> (state, metrics)` in its two halves.

    Args:
      graphdef, rest: from `nnx.split(net, nnx.Param, ...)`; `rest` holds the non-param state (rng streams).
      tx, schedule: from `clsp_jax.optim.make_optimizer`.
      objective: a name in `clsp_jax.losses.OBJECTIVES` (`losses.resolve_objective` picks it from the config);
        the batch must carry its `captions` per clip. An objective with `logit_bias` needs a network built
        with `logit_bias_init` (a ValueError when the step is first traced otherwise).
      loss_cfg: the `loss` config section, handed to the objective (e.g. hard_negative_weight).
      seed: dropout randomness is fold_in(key(seed), step).
      ema_decay: decay of the state's EMA weights (used when the state has an EMA).
      average_period: the state's running average (when it has one) folds in the weights as they stand after
        every step that is a multiple of this (`clsp_jax.averaging`); after a skipped (non-finite) step those
        are the unchanged weights, as icefall's batch count also advances on such steps.
      frozen: the optimizer's frozen-parameter regexes: their backward pass is skipped.
      mesh: when given, the loss runs in shard_map over its batch axes (all-gathered features), and the
        forward and backward trace under it (`jax.sharding.use_abstract_mesh`).
    """
    if objective not in losses.OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(losses.OBJECTIVES)}")
    spec = losses.OBJECTIVES[objective]
    loss_cfg = dict(loss_cfg)
    frozen = list(frozen)

    def compute_loss(params, batch, step):
        net = nnx.merge(graphdef, optim.stop_frozen_gradients(frozen, params), rest)
        bias = net.bias()
        if spec.logit_bias and bias is None:
            raise ValueError(f"objective {objective!r} needs a network with a logit_bias: build it with "
                             "model.logit_bias_init set (SigLIP uses -10)")
        rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(seed), step))
        audio_emb, text_emb = embed_batch(net, batch, rngs)
        if text_emb.shape[1] != spec.captions:
            raise ValueError(f"objective {objective!r} needs {spec.captions} caption(s) per clip, the batch has "
                             f"{text_emb.shape[1]}")
        extras = {k: batch[k] for k in ("caption_mask", "negative_valid") if k in batch}

        def objective_fn(a, t, scale, bias, extras, axis_name=None):
            return spec.loss(a, t, scale, bias, extras, loss_cfg, axis_name)

        fn = objective_fn if mesh is None else losses.sharded(objective_fn, mesh)
        return fn(audio_emb, text_emb, net.scale(), bias, extras)

    def gradients(state, batch):
        step = state["step"]
        # Under the mesh, layers can see how the batch is split (the convolutions' kernel gradients sum each
        # batch shard on its own devices, `clsp_jax.models.convs`).
        with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"], batch, step)
        return grads, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    def update(state, grads, metrics):
        step = state["step"]
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

        def apply(params, opt_state, ema):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optim.clamp_logit_scale(optax.apply_updates(params, updates))
            return params, opt_state, (optim.ema_update(ema, params, ema_decay) if ema is not None else None)

        # A non-finite loss or gradient skips the update (the trainer counts the streak and stops on too many).
        # A cond, not a select of new and old values: the select reads the old moments after their in-place
        # update, so XLA copied every moment (twice the parameter bytes; BENCHMARKS.md §9).
        params, opt_state, ema = jax.lax.cond(finite, apply, lambda *old: old,
                                              state["params"], state["opt_state"], state["ema"])
        new_state = {
            "step": step + 1,
            "params": params,
            "opt_state": opt_state,
            "ema": ema,
            "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
        }
        if "average" in state:
            if not average_period:
                raise ValueError("the train state has a running average but the step has no average_period")
            new_state["average"] = averaging.average_update(state["average"], new_state["params"], step + 1,
                                                            average_period)
        metrics = {**metrics, "learning_rate": schedule(step), "nonfinite": (~finite).astype(jnp.int32),
                   "nonfinite_streak": new_state["nonfinite_streak"]}
        return new_state, metrics

    return TrainStep(gradients, update)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The train step `(state, batch) -> (state, metrics)` in its two halves, as the recipe reads:
    `gradients(state, batch) -> (grads, metrics)` (forward and backward: grads like state["params"]; metrics
    the objective's, loss and grad_norm) and `update(state, grads, metrics) -> (state, metrics)` (the
    optimizer, EMA and running average; a non-finite loss or gradient leaves the weights as they were).

    Calling it runs both, so `jax.jit(step)` is the whole step as one program.
    `clsp_jax.sharding.JittedTrainStep` compiles the halves as two programs: XLA:CPU then never holds
    the whole step in one compilation, the run's peak memory (BENCHMARKS.md §9).
    """

    gradients: Callable
    update: Callable

    def __call__(self, state, batch):
        grads, metrics = self.gradients(state, batch)
        return self.update(state, grads, metrics)
