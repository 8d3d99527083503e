"""Text tower: the Hugging Face RoBERTa / BERT encoder, returning the pooler output.

Module and attribute names mirror `transformers.RobertaModel` / `BertModel`, so their state dicts load by
the rule in `clsp_jax.convert`. `cfg` is a Hugging Face config dict (`RobertaConfig` / `BertConfig` names).
The two families differ only in position ids: RoBERTa counts positions from `pad_token_id + 1` over
non-pad tokens; BERT uses 0..L-1.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from clsp_jax.models.remat import check_remat, remat_layer_call

# Defaults of Hugging Face's RobertaConfig / BertConfig, for keys a config dict leaves out.
_DEFAULTS = {
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12,
    "type_vocab_size": 2,
    "position_embedding_type": "absolute",
    "initializer_range": 0.02,
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")


def text_config(cfg: Mapping) -> dict:
    """Hugging Face config dict with defaults filled and validated."""
    cfg = dict(cfg)
    cfg.setdefault("model_type", "roberta")
    cfg = {**_DEFAULTS, "pad_token_id": 1 if cfg["model_type"] != "bert" else 0, **cfg}
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"text config lacks {missing}")
    if cfg["model_type"] not in ("roberta", "bert", "xlm-roberta"):
        raise ValueError(f"text model_type {cfg['model_type']!r}: only roberta/bert families are supported")
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: only exact 'gelu' is supported")
    if cfg["position_embedding_type"] != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    return cfg


def _is_roberta(cfg) -> bool:
    return cfg["model_type"] in ("roberta", "xlm-roberta")


def max_text_tokens(cfg: Mapping) -> int:
    """Longest token sequence the position table allows (512 for roberta-base: 514 minus the pad offset)."""
    cfg = text_config(cfg)
    return cfg["max_position_embeddings"] - (cfg["pad_token_id"] + 1 if _is_roberta(cfg) else 0)


def position_ids(input_ids: jax.Array, attention_mask: jax.Array, cfg: Mapping) -> jax.Array:
    """[B, L] position ids: RoBERTa's padding-offset positions, or BERT's 0..L-1."""
    if not _is_roberta(cfg):
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    pad = cfg["pad_token_id"]
    mask = (input_ids != pad).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + pad


def _linear(din, dout, dtype, param_dtype, rngs, std):
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(std))


class Embeddings(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        h, std = cfg["hidden_size"], cfg["initializer_range"]
        emb = lambda n: nnx.Embed(n, h, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(std))
        self.word_embeddings = emb(cfg["vocab_size"])
        self.position_embeddings = emb(cfg["max_position_embeddings"])
        self.token_type_embeddings = emb(cfg["type_vocab_size"])
        self.LayerNorm = nnx.LayerNorm(h, epsilon=cfg["layer_norm_eps"], dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        self.dropout = nnx.Dropout(cfg["hidden_dropout_prob"])
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask, token_type_ids, deterministic, rngs):
        pos = position_ids(input_ids, attention_mask, self.cfg)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x), deterministic=deterministic, rngs=rngs)


def attend(q, k, v, mask, dropout=None):
    """Scaled dot-product attention over the unmasked keys.

    q [B, Q, N, D], k and v [B, L, N, D] (N heads of D), mask [B, L] bool (True = token) -> [B, Q, N, D].
    The softmax runs in float32. `dropout`, if given, is applied to the attention probabilities.

    Written out rather than `jax.nn.dot_product_attention` because on XLA:CPU this form runs the layer's
    attention in about half the time (BENCHMARKS.md §9): heads-major operands, and without dropout the
    softmax's division comes after the product with v, on [.., Q, D] instead of [.., Q, L].
    """
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # [B, N, *, D]
    scores = jnp.einsum("bnqd,bnkd->bnqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - scores.max(-1, keepdims=True))
    total = weights.sum(-1, keepdims=True)
    if dropout is None:
        out = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(v.dtype), v) / total.astype(v.dtype)
    else:
        out = jnp.einsum("bnqk,bnkd->bnqd", dropout(weights / total).astype(v.dtype), v)
    return out.swapaxes(1, 2)


class SelfAttention(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        h, std = cfg["hidden_size"], cfg["initializer_range"]
        self.num_heads = cfg["num_attention_heads"]
        self.query = _linear(h, h, dtype, param_dtype, rngs, std)
        self.key = _linear(h, h, dtype, param_dtype, rngs, std)
        self.value = _linear(h, h, dtype, param_dtype, rngs, std)
        self.attn_dropout = nnx.Dropout(cfg["attention_probs_dropout_prob"])

    def __call__(self, x, mask, deterministic, rngs, queries=None):
        """x [B, L, H], mask [B, L] bool (True = token) -> [B, Q, H] for the Q positions of `queries`
        ([B, Q, H], default x itself: Q = L)."""
        queries = x if queries is None else queries
        split = lambda y: y.reshape(*y.shape[:2], self.num_heads, -1)
        q, k, v = split(self.query(queries)), split(self.key(x)), split(self.value(x))
        dropout = None
        if not deterministic and self.attn_dropout.rate > 0.0:
            dropout = lambda p: self.attn_dropout(p, deterministic=False, rngs=rngs)
        out = attend(q, k, v, mask, dropout)
        return out.reshape(*queries.shape)


class DenseLayerNorm(nnx.Module):
    """`dense` -> dropout -> residual add -> `LayerNorm` (HF's *SelfOutput / *Output)."""

    def __init__(self, din, cfg, *, rngs, dtype, param_dtype):
        h = cfg["hidden_size"]
        self.dense = _linear(din, h, dtype, param_dtype, rngs, cfg["initializer_range"])
        self.LayerNorm = nnx.LayerNorm(h, epsilon=cfg["layer_norm_eps"], dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        self.dropout = nnx.Dropout(cfg["hidden_dropout_prob"])

    def __call__(self, x, residual, deterministic, rngs):
        return self.LayerNorm(self.dropout(self.dense(x), deterministic=deterministic, rngs=rngs) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        # `self.self` is Hugging Face's name for the attention proper (checkpoint names depend on it).
        self.self = SelfAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.output = DenseLayerNorm(cfg["hidden_size"], cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, mask, deterministic, rngs, first_only=False):
        queries = x[:, :1] if first_only else x
        return self.output(self.self(x, mask, deterministic, rngs, queries), queries, deterministic, rngs)


class Intermediate(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        self.dense = _linear(cfg["hidden_size"], cfg["intermediate_size"], dtype, param_dtype, rngs,
                             cfg["initializer_range"])

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x), approximate=False)


class Layer(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention = Attention(cfg, **kw)
        self.intermediate = Intermediate(cfg, **kw)
        self.output = DenseLayerNorm(cfg["intermediate_size"], cfg, **kw)

    def __call__(self, x, mask, deterministic, rngs, first_only=False):
        """x [B, L, H] -> [B, L, H], or [B, 1, H] (the first position's output only) if `first_only`."""
        x = self.attention(x, mask, deterministic, rngs, first_only)
        return self.output(self.intermediate(x), x, deterministic, rngs)


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype, remat="none"):
        self.layer = nnx.List([Layer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                               for _ in range(cfg["num_hidden_layers"])])
        self.remat = check_remat(remat)

    def __call__(self, x, mask, deterministic, rngs, first_only=False):
        """x [B, L, H] -> the last layer's states [B, L, H], or only its first position's [B, 1, H] if
        `first_only` (the last layer then computes its queries, attention output and feed-forward for that
        position alone)."""
        def call(first):
            return remat_layer_call(lambda layer, x, mask, rngs: layer(x, mask, deterministic, rngs, first),
                                    self.remat)

        *below, last = self.layer
        for layer in below:
            x = call(False)(layer, x, mask, rngs)
        return call(first_only)(last, x, mask, rngs)


class Pooler(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        h = cfg["hidden_size"]
        self.dense = _linear(h, h, dtype, param_dtype, rngs, cfg["initializer_range"])

    def __call__(self, cls_state):
        """cls_state [B, H] (the first token's last hidden state) -> tanh(W cls_state + b) [B, H]."""
        return jnp.tanh(self.dense(cls_state))


class TextEncoder(nnx.Module):
    """RoBERTa/BERT encoder; `__call__` returns the pooler output tanh(W h[CLS] + b) [B, hidden_size].

    `remat`: rematerialisation of each layer in the backward pass (`clsp_jax.models.remat`).
    """

    def __init__(self, cfg: Mapping, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        cfg = text_config(cfg)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = Embeddings(cfg, **kw)
        self.encoder = Encoder(cfg, **kw, remat=remat)
        self.pooler = Pooler(cfg, **kw)
        self.output_dim = cfg["hidden_size"]

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rngs=None,
                      first_only=False):
        """input_ids, attention_mask [B, L] int -> last hidden states [B, L, hidden_size] ([B, 1, hidden_size]
        of the first token, computed without the other positions' last-layer work, if `first_only`).

        Training (`deterministic=False`) needs `rngs` with a "dropout" (or default) stream.
        """
        if not deterministic and rngs is None:
            raise ValueError("deterministic=False needs rngs for dropout, e.g. rngs=nnx.Rngs(dropout=key)")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids, mask, token_type_ids, deterministic, rngs)
        return self.encoder(x, mask, deterministic, rngs, first_only)

    def cls_state(self, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rngs=None):
        """input_ids, attention_mask [B, L] int -> the first token's last hidden state [B, hidden_size]."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                                  rngs=rngs, first_only=True)[:, 0]

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rngs=None):
        """input_ids, attention_mask [B, L] int -> pooler output [B, hidden_size]."""
        return self.pooler(self.cls_state(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                                          rngs=rngs))
