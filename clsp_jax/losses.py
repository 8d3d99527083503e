"""Contrastive objectives of CLSP (docs/design.md §2): the losses, their sharded forms and the registry of
objectives the train step picks from.

Layout: every batch array has the clips on its leading axis, so one sharding rule (leading axis over the
batch mesh axes) fits all of them:

    audio_emb  [B, D]      one embedding per clip
    text_emb   [B, D]      one caption per clip (stage 1, SigLIP)
               [B, K, D]   K captions per clip (stages 2-3): text_emb[i, k] is caption k of clip i
    neg_emb    [B, D]      one attribute-perturbed caption per clip (stage 3)
    text_mask, weights  [B, K]

The multi-positive similarity matrix is S = [B, K*B] with its columns k-major: column k*B + j is caption k
of clip j, i.e. the captions as `jnp.swapaxes(text_emb, 0, 1).reshape(K * B, D)`, which is the authors'
single-device order (all first captions, then all second ones). The losses do not depend on the column
order; it only fixes what "row k*B+i" in docs/design.md §2 means here.

`logit_scale` is the already-exponentiated temperature, a scalar. Logits are float32 at full matmul
precision whatever the embedding dtype: with scales up to 100 a bf16 matmul would move logits by ~0.4.

Every loss returns `(loss, metrics)`, float32 scalars. Called as is, a loss is the dense single-device
reference. Called with `axis_name` inside `jax.shard_map`, it gets the local clips of one device, gathers
the other side's features over `axis_name`, computes the loss rows of its own clips and captions and psums
the sums, so the value is the dense global loss and the gradient reaches every device's features through
the all_gather transpose (a reduce-scatter). `sharded(loss_fn, mesh)` does that wrapping.

Directions: s2t = speech->text (a clip's row against the captions), t2s = text->speech (a caption's row
against the clips), as in the evaluators' reports.

Objectives: `OBJECTIVES` maps a name to an `Objective`, the loss in the train step's calling convention plus
what it needs from the batch (captions per clip) and the network (a learnable logit bias). A config's
`loss.objective` picks one; None takes the default of its data stage (`resolve_objective`). Adding an
objective means writing its loss and one `OBJECTIVES` entry here, nothing else.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from clsp_jax.sharding import BATCH_AXES

AxisName = str | tuple[str, ...] | None
Metrics = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------------------
# Collectives that reduce to the identity in the dense case (axis_name=None).


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Rows of all devices [B, ...] from this device's rows [B_local, ...], in mesh order."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _psum(tree, axis_name: AxisName):
    if axis_name is None:
        return tree
    return jax.lax.psum(tree, axis_name)


def _first_clip(n_local: int, axis_name: AxisName) -> jax.Array:
    """Global index of this device's first clip (device blocks are contiguous, in mesh order)."""
    if axis_name is None:
        return jnp.asarray(0, jnp.int32)
    return jax.lax.axis_index(axis_name) * n_local


def _logits(x: jax.Array, y: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """scale * x @ y.T in float32: x [N, D], y [M, D] -> [N, M]."""
    xy = jnp.einsum(
        "nd,md->nm", x.astype(jnp.float32), y.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return jnp.asarray(logit_scale, jnp.float32) * xy


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 when nothing was counted (e.g. every caption masked)."""
    return num / jnp.maximum(den, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Shape checks (clear errors before any tracing surprise).


def _check_batch(audio_emb, name: str, x, layout: str):
    """audio_emb must be [B, D]; x must have the rank of `layout` ("[B, K, D]", ...) and audio's B and D."""
    if jnp.ndim(audio_emb) != 2:
        raise ValueError(f"audio_emb must be [B, D], got shape {jnp.shape(audio_emb)}")
    ndim = layout.count(",") + 1
    if jnp.ndim(x) != ndim or x.shape[0] != audio_emb.shape[0] or x.shape[-1] != audio_emb.shape[-1]:
        raise ValueError(
            f"{name} must be {layout} with audio_emb's B and D {audio_emb.shape}, got shape {jnp.shape(x)}"
        )


# ---------------------------------------------------------------------------------------------------------
# Softmax losses: stage 1 (infonce_loss), stage 2 (multi_positive_loss), stage 3 (hard_negative_loss).


def _cross_entropy_rows(logits, positive, target, col_valid, row_valid):
    """Sums over the valid rows of soft-target cross-entropy and of argmax hits.

    logits [N, M] float32; positive [N, M] bool, the row's own items (its captions, or its clip);
    target [N, M] float32, zero off the valid positives, each valid row summing to 1;
    col_valid [M] bool, columns taking part in the softmax; row_valid [N] bool.
    Returns (sum of CE over valid rows, number of valid rows, valid rows whose argmax is a positive).
    """
    col_valid = jnp.broadcast_to(col_valid, logits.shape)
    lse = jax.nn.logsumexp(jnp.where(col_valid, logits, -jnp.inf), axis=1)
    ce = lse - jnp.sum(target * logits, axis=1)
    best_pos = jnp.max(jnp.where(positive & col_valid, logits, -jnp.inf), axis=1)
    best_neg = jnp.max(jnp.where(~positive & col_valid, logits, -jnp.inf), axis=1)
    hits = row_valid & (best_pos > best_neg)
    return (
        jnp.sum(jnp.where(row_valid, ce, 0.0)),
        jnp.sum(row_valid.astype(jnp.float32)),
        jnp.sum(hits.astype(jnp.float32)),
    )


def multi_positive_loss(
    audio_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    text_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    *,
    axis_name: AxisName = None,
) -> tuple[jax.Array, Metrics]:
    """Stage-2 multi-positive InfoNCE over S = [B, K*B] (docs/design.md §2).

    Speech->text (s2t): clip i's soft target spreads over its K captions, 1/K each, or `weights[i]` normalised
    over its valid captions. Text->speech (t2s): each caption's target is one-hot on its clip. The loss is the
    mean of the two cross-entropies, each averaged over its rows; with K=2 and no mask this is the authors'
    ClipLoss(multi_positive=True).

    audio_emb [B, D]; text_emb [B, K, D]; logit_scale scalar (exponentiated).
    text_mask [B, K] bool: False marks a padded caption, dropped as a column of speech->text and as a row of
    text->speech; a clip with no valid caption drops out of speech->text (it stays a negative clip).
    weights [B, K] >= 0: relative weight of each positive in the speech->text target.
    axis_name: batch mesh axes when called per device inside shard_map (see `sharded`); None = dense.
    Metrics: loss_s2t, loss_t2s, acc_s2t (argmax is one of the clip's captions), acc_t2s, pos_logit /
    neg_logit (mean logit over positive / negative pairs among valid captions), logit_scale.
    """
    _check_batch(audio_emb, "text_emb", text_emb, "[B, K, D]")
    n_local, k, d = text_emb.shape
    valid = jnp.ones((n_local, k), bool)
    if text_mask is not None:
        if jnp.shape(text_mask) != (n_local, k):
            raise ValueError(f"text_mask must be [B, K] = {(n_local, k)}, got {jnp.shape(text_mask)}")
        valid = jnp.asarray(text_mask, bool)
    w = jnp.ones((n_local, k), jnp.float32)
    if weights is not None:
        if jnp.shape(weights) != (n_local, k):
            raise ValueError(f"weights must be [B, K] = {(n_local, k)}, got {jnp.shape(weights)}")
        w = jnp.asarray(weights, jnp.float32)
    w = jnp.where(valid, w, 0.0)
    w_total = jnp.sum(w, axis=1, keepdims=True)
    w = w / jnp.where(w_total > 0, w_total, 1.0)

    all_audio = _gather(audio_emb, axis_name)
    all_text = _gather(text_emb, axis_name)
    all_valid = _gather(valid, axis_name)
    n = all_audio.shape[0]
    clip = _first_clip(n_local, axis_name) + jnp.arange(n_local)

    # Speech->text rows of the local clips against every caption, columns k-major.
    s_s2t = _logits(audio_emb, jnp.swapaxes(all_text, 0, 1).reshape(k * n, d), logit_scale)
    col_clip = jnp.tile(jnp.arange(n), k)
    col_k = jnp.repeat(jnp.arange(k), n)
    col_valid = jnp.swapaxes(all_valid, 0, 1).reshape(k * n)
    own = col_clip[None, :] == clip[:, None]
    target = jnp.where(own, w[:, col_k], 0.0)
    s2t = _cross_entropy_rows(s_s2t, own, target, col_valid, w_total[:, 0] > 0)

    # Text->speech rows of the local captions (clip-major i*K + k) against every clip.
    s_t2s = _logits(text_emb.reshape(n_local * k, d), all_audio, logit_scale)
    own_clip = jnp.arange(n)[None, :] == jnp.repeat(clip, k)[:, None]
    t2s = _cross_entropy_rows(s_t2s, own_clip, own_clip.astype(jnp.float32), True, valid.reshape(-1))

    pair = jax.lax.stop_gradient(s_s2t)
    pos = own & col_valid
    neg = ~own & col_valid
    sums = _psum(
        (
            s2t,
            t2s,
            jnp.sum(jnp.where(pos, pair, 0.0)),
            jnp.sum(pos.astype(jnp.float32)),
            jnp.sum(jnp.where(neg, pair, 0.0)),
            jnp.sum(neg.astype(jnp.float32)),
        ),
        axis_name,
    )
    (ce_s2t, rows_s2t, hits_s2t), (ce_t2s, rows_t2s, hits_t2s), pos_sum, pos_n, neg_sum, neg_n = sums
    loss_s2t = _ratio(ce_s2t, rows_s2t)
    loss_t2s = _ratio(ce_t2s, rows_t2s)
    metrics = {
        "loss_s2t": loss_s2t,
        "loss_t2s": loss_t2s,
        "acc_s2t": _ratio(hits_s2t, rows_s2t),
        "acc_t2s": _ratio(hits_t2s, rows_t2s),
        "pos_logit": _ratio(pos_sum, pos_n),
        "neg_logit": _ratio(neg_sum, neg_n),
        "logit_scale": jnp.asarray(logit_scale, jnp.float32),
    }
    return 0.5 * (loss_s2t + loss_t2s), metrics


def infonce_loss(
    audio_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *, axis_name: AxisName = None
) -> tuple[jax.Array, Metrics]:
    """Stage-1 symmetric InfoNCE: mean of the speech->text and text->speech cross-entropies, labels on the
    diagonal of S = scale * audio @ text.T [B, B] (the authors' ClipLoss). It is the K=1 multi-positive loss.

    audio_emb [B, D]; text_emb [B, D]; logit_scale scalar (exponentiated). Metrics as multi_positive_loss.
    """
    _check_batch(audio_emb, "text_emb", text_emb, "[B, D]")
    return multi_positive_loss(audio_emb, text_emb[:, None, :], logit_scale, axis_name=axis_name)


def hard_negative_loss(
    audio_emb: jax.Array,
    text_emb: jax.Array,
    neg_emb: jax.Array,
    logit_scale: jax.Array,
    local_weight: float = 0.2,
    local_positives: Sequence[int] = (0,),
    neg_mask: jax.Array | None = None,
    *,
    axis_name: AxisName = None,
) -> tuple[jax.Array, Metrics]:
    """Stage 3: multi-positive loss over the captions + local_weight x a per-clip hard-negative term.

    The per-clip term is -log(sum_p e^{s_p} / (sum_p e^{s_p} + e^{s_neg})) over the clip's captions
    `local_positives` and its perturbed caption, averaged over clips. The perturbed captions are not
    negatives of the global term. The authors' finetune_stage3.py uses local_positives=(0,), the global
    caption the negative was perturbed from (a 2-way softmax); (0, 1) gives the 3-way variant.
    `neg_mask` [B] bool drops clips whose perturbation failed from the local term (None: all valid).

    audio_emb [B, D]; text_emb [B, K, D] (K=2: global, fine-grained); neg_emb [B, D]; logit_scale scalar.
    Metrics: those of multi_positive_loss, global_loss, local_loss, acc_hard_neg (a positive beats the
    perturbed caption), hard_neg_logit (its mean logit).
    """
    _check_batch(audio_emb, "text_emb", text_emb, "[B, K, D]")
    _check_batch(audio_emb, "neg_emb", neg_emb, "[B, D]")
    local_positives = tuple(local_positives)
    k = text_emb.shape[1]
    if not local_positives or len(set(local_positives)) != len(local_positives):
        raise ValueError(f"local_positives must be distinct caption indices, got {local_positives}")
    if not all(0 <= p < k for p in local_positives):
        raise ValueError(f"local_positives {local_positives} out of range for K={k} captions")

    global_loss, metrics = multi_positive_loss(audio_emb, text_emb, logit_scale, axis_name=axis_name)

    scale = jnp.asarray(logit_scale, jnp.float32)
    audio = audio_emb.astype(jnp.float32)
    precision = jax.lax.Precision.HIGHEST
    pos = scale * jnp.einsum(
        "nd,npd->np", audio, text_emb[:, np.array(local_positives)].astype(jnp.float32), precision=precision
    )
    neg = scale * jnp.einsum("nd,nd->n", audio, neg_emb.astype(jnp.float32), precision=precision)
    lse_pos = jax.nn.logsumexp(pos, axis=1)
    per_clip = jnp.logaddexp(lse_pos, neg) - lse_pos
    hits = jnp.max(pos, axis=1) > neg
    valid = jnp.ones(audio_emb.shape[0], bool) if neg_mask is None else neg_mask.astype(bool)
    total, hit_n, neg_sum, n = _psum(
        (
            jnp.sum(jnp.where(valid, per_clip, 0.0)),
            jnp.sum(jnp.where(valid, hits, False).astype(jnp.float32)),
            jnp.sum(jnp.where(valid, jax.lax.stop_gradient(neg), 0.0)),
            jnp.sum(valid.astype(jnp.float32)),
        ),
        axis_name,
    )
    n = jnp.maximum(n, 1.0)
    local_loss = total / n
    metrics = {
        **metrics,
        "global_loss": global_loss,
        "local_loss": local_loss,
        "acc_hard_neg": hit_n / n,
        "hard_neg_logit": neg_sum / n,
    }
    return global_loss + local_weight * local_loss, metrics


# ---------------------------------------------------------------------------------------------------------
# SigLIP.


def sigmoid_loss(
    audio_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    axis_name: AxisName = None,
) -> tuple[jax.Array, Metrics]:
    """SigLIP pairwise sigmoid loss: -sum_{i,j} log sigmoid(l_ij * (scale * a_i.t_j + bias)) / B with
    l_ij = +1 on matching pairs and -1 elsewhere (the SigLIP paper's normalisation).

    Sharded, the text blocks travel round the devices with ppermute: each device only ever holds
    [B_local, B_local] logits, and a rematerialised scan keeps the backward pass at one text block per step.

    audio_emb [B, D]; text_emb [B, D]; logit_scale, logit_bias scalars (scale exponentiated).
    Metrics: pos_logit, neg_logit (mean logits incl. bias), acc_s2t, acc_t2s (argmax accuracy),
    logit_scale, logit_bias.
    """
    _check_batch(audio_emb, "text_emb", text_emb, "[B, D]")
    n_local = audio_emb.shape[0]
    n_dev = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    bias = jnp.asarray(logit_bias, jnp.float32)

    def block_logits(text_block):
        return _logits(audio_emb, text_block, logit_scale) + bias

    # Step 0: the device's own text block, the only one holding positives (on its diagonal).
    z = block_logits(text_emb)
    eye = jnp.eye(n_local, dtype=bool)
    loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(eye, z, -z)))
    zs = jax.lax.stop_gradient(z)
    pos = jnp.diagonal(zs)
    off = jnp.where(eye, -jnp.inf, zs)
    neg_sum = jnp.sum(jnp.where(eye, 0.0, zs))
    row_max_neg = jnp.max(off, axis=1)
    # What travels with a text block: the block, its positive logits, its best negative logit so far.
    travel = (text_emb, pos, jnp.max(off, axis=0))

    def step(carry, _):
        (block, block_pos, col_max_neg), loss, neg_sum, row_max_neg = carry
        perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]
        block, block_pos, col_max_neg = jax.lax.ppermute((block, block_pos, col_max_neg), axis_name, perm)
        z = block_logits(block)
        zs = jax.lax.stop_gradient(z)
        carry = (
            (block, block_pos, jnp.maximum(col_max_neg, jnp.max(zs, axis=0))),
            loss - jnp.sum(jax.nn.log_sigmoid(-z)),
            neg_sum + jnp.sum(zs),
            jnp.maximum(row_max_neg, jnp.max(zs, axis=1)),
        )
        return carry, None

    carry = (travel, loss, neg_sum, row_max_neg)
    if n_dev > 1:
        carry, _ = jax.lax.scan(jax.checkpoint(step), carry, length=n_dev - 1)
    (_, block_pos, col_max_neg), loss, neg_sum, row_max_neg = carry

    # Each device ends holding one text block whose column maxima have seen every clip.
    loss, neg_sum, pos_sum, hits_s2t, hits_t2s = _psum(
        (
            loss,
            neg_sum,
            jnp.sum(pos),
            jnp.sum((pos > row_max_neg).astype(jnp.float32)),
            jnp.sum((block_pos > col_max_neg).astype(jnp.float32)),
        ),
        axis_name,
    )
    n = n_local * n_dev
    metrics = {
        "pos_logit": pos_sum / n,
        "neg_logit": neg_sum / max(n * (n - 1), 1),
        "acc_s2t": hits_s2t / n,
        "acc_t2s": hits_t2s / n,
        "logit_scale": jnp.asarray(logit_scale, jnp.float32),
        "logit_bias": bias,
    }
    return loss / n, metrics


# ---------------------------------------------------------------------------------------------------------
# Sharding.


def sharded(loss_fn: Callable, mesh: jax.sharding.Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> Callable:
    """`loss_fn` (any loss above) over global arrays whose leading (clip) axis is sharded over `batch_axes`.

    The returned function has loss_fn's signature. Array arguments of rank >= 1 enter shard_map split on
    their leading axis over `batch_axes` (so B must divide by the product of their sizes); scalar arrays
    (logit_scale, logit_bias) enter replicated; anything else (Python numbers, tuples) is static. Mesh axes
    outside `batch_axes` stay automatic. The loss and metrics come back replicated. Usable eagerly or
    inside jit, under grad.
    """
    batch_axes = tuple(batch_axes)
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch axes {missing} are not axes of the mesh {mesh.axis_names}")
    n_dev = math.prod(mesh.shape[a] for a in batch_axes)

    @functools.wraps(loss_fn)
    def call(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]
        arrays = [x for x, a in zip(leaves, is_array) if a]
        for x in arrays:
            if x.ndim and x.shape[0] % n_dev:
                raise ValueError(
                    f"leading (batch) size {x.shape[0]} of an input {x.shape} does not divide over "
                    f"{n_dev} devices of mesh axes {batch_axes}"
                )
        specs = tuple(P(batch_axes) if x.ndim else P() for x in arrays)

        def per_device(*local_arrays):
            it = iter(local_arrays)
            local_args, local_kwargs = jax.tree.unflatten(
                treedef, [next(it) if a else x for x, a in zip(leaves, is_array)]
            )
            return loss_fn(*local_args, **local_kwargs, axis_name=batch_axes)

        return jax.shard_map(
            per_device, mesh=mesh, in_specs=specs, out_specs=P(), axis_names=frozenset(batch_axes)
        )(*arrays)

    return call


# ---------------------------------------------------------------------------------------------------------
# The registry of objectives: what the train step calls.
#
# An objective's loss takes (audio_emb [B, D], text_emb [B, C, D], logit_scale, logit_bias, extras, cfg,
# axis_name) -> (loss, metrics):
#   text_emb   the batch's C captions per clip (C = Objective.captions); for stage 3 the hard negative last.
#   logit_bias the network's learnable scalar bias, or None when the network has none.
#   extras     the batch's optional per-clip arrays: caption_mask [B, C] bool, negative_valid [B] bool.
#   cfg        the `loss` config section (objective, hard_negative_weight, hard_negative_positives, ...).
#   axis_name  the batch mesh axes inside `sharded`, None for the dense loss.


@dataclasses.dataclass(frozen=True)
class Objective:
    """A trainable objective.

    loss: (audio_emb [B, D], text_emb [B, C, D], logit_scale, logit_bias | None, extras, cfg, axis_name)
      -> (loss, metrics), see above.
    captions: captions per clip C the batch must carry; it is the data stage the objective trains on.
    logit_bias: whether the loss needs the network's learnable logit_bias (model config `logit_bias_init`).
    """

    loss: Callable
    captions: int
    logit_bias: bool = False


def _infonce(a, t, scale, bias, extras, cfg, axis_name):
    return infonce_loss(a, t[:, 0], scale, axis_name=axis_name)


def _multi_positive(a, t, scale, bias, extras, cfg, axis_name):
    return multi_positive_loss(a, t, scale, extras.get("caption_mask"), axis_name=axis_name)


def _hard_negative(a, t, scale, bias, extras, cfg, axis_name):
    return hard_negative_loss(
        a,
        t[:, :-1],
        t[:, -1],
        scale,
        float(cfg.get("hard_negative_weight", 0.2)),
        tuple(cfg.get("hard_negative_positives", (0,))),
        extras.get("negative_valid"),
        axis_name=axis_name,
    )


def _siglip(a, t, scale, bias, extras, cfg, axis_name):
    if bias is None:
        raise ValueError("the siglip objective needs a network with a logit_bias (set model.logit_bias_init)")
    return sigmoid_loss(a, t[:, 0], scale, bias, axis_name=axis_name)


OBJECTIVES: dict[str, Objective] = {
    "infonce": Objective(_infonce, captions=1),
    "multi_positive": Objective(_multi_positive, captions=2),
    "hard_negative": Objective(_hard_negative, captions=3),
    "siglip": Objective(_siglip, captions=1, logit_bias=True),
}
# The objective a data stage trains with unless the config names another.
STAGE_OBJECTIVES = {1: "infonce", 2: "multi_positive", 3: "hard_negative"}


def resolve_objective(name: str | None, stage: int) -> str:
    """The objective trained on `stage` data: `name`, or the stage's default when None.

    Raises ValueError for an unknown stage or name, or an objective whose captions per clip differ from the
    stage's (e.g. siglip needs stage 1).
    """
    if stage not in STAGE_OBJECTIVES:
        raise ValueError(f"data.stage {stage!r}: choose from {sorted(STAGE_OBJECTIVES)}")
    if name is None:
        return STAGE_OBJECTIVES[stage]
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    captions = OBJECTIVES[name].captions
    if captions != stage:
        raise ValueError(
            f"objective {name!r} trains on data.stage={captions} ({captions} caption(s) per clip), "
            f"got data.stage={stage}"
        )
    return name
