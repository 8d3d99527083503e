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


class SelfAttention(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        h, std = cfg["hidden_size"], cfg["initializer_range"]
        self.num_heads = cfg["num_attention_heads"]
        self.query = _linear(h, h, dtype, param_dtype, rngs, std)
        self.key = _linear(h, h, dtype, param_dtype, rngs, std)
        self.value = _linear(h, h, dtype, param_dtype, rngs, std)
        self.attn_dropout = nnx.Dropout(cfg["attention_probs_dropout_prob"])

    def __call__(self, x, mask, deterministic, rngs):
        """x [B, L, H], mask [B, L] bool (True = token) -> [B, L, H]."""
        b, l, h = x.shape
        split = lambda y: y.reshape(b, l, self.num_heads, h // self.num_heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if deterministic or self.attn_dropout.rate == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        else:  # attention-probability dropout needs the explicit weights
            scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
            probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1), deterministic=False, rngs=rngs)
            out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        return out.reshape(b, l, h)


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

    def __call__(self, x, mask, deterministic, rngs):
        return self.output(self.self(x, mask, deterministic, rngs), x, deterministic, rngs)


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

    def __call__(self, x, mask, deterministic, rngs):
        x = self.attention(x, mask, deterministic, rngs)
        return self.output(self.intermediate(x), x, deterministic, rngs)


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype, remat="none"):
        self.layer = nnx.List([Layer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                               for _ in range(cfg["num_hidden_layers"])])
        self.remat = check_remat(remat)

    def __call__(self, x, mask, deterministic, rngs):
        call = remat_layer_call(lambda layer, x, mask, rngs: layer(x, mask, deterministic, rngs), self.remat)
        for layer in self.layer:
            x = call(layer, x, mask, rngs)
        return x


class Pooler(nnx.Module):
    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        h = cfg["hidden_size"]
        self.dense = _linear(h, h, dtype, param_dtype, rngs, cfg["initializer_range"])

    def __call__(self, x):
        return jnp.tanh(self.dense(x[:, 0]))


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

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rngs=None):
        """input_ids, attention_mask [B, L] int -> last hidden states [B, L, hidden_size].

        Training (`deterministic=False`) needs `rngs` with a "dropout" (or default) stream.
        """
        if not deterministic and rngs is None:
            raise ValueError("deterministic=False needs rngs for dropout, e.g. rngs=nnx.Rngs(dropout=key)")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids, mask, token_type_ids, deterministic, rngs)
        return self.encoder(x, mask, deterministic, rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rngs=None):
        """input_ids, attention_mask [B, L] int -> pooler output [B, hidden_size]."""
        return self.pooler(self.hidden_states(input_ids, attention_mask, token_type_ids,
                                              deterministic=deterministic, rngs=rngs))
