"""The CLSP dual encoder: Zipformer2 speech tower + RoBERTa/BERT text tower + 512-d heads + temperature
(+ an optional logit bias for the siglip objective).

Attribute names mirror the authors' PyTorch `CLAP` module (icefall spear_roberta/model.py), so its state
dict loads by the rule in `clsp_jax.convert`, with the speech tower mounted at the root
(`encoder_embed.*`, `encoder.*`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from clsp_jax.models.remat import check_remat
from clsp_jax.models.text import TextEncoder
from clsp_jax.models.zipformer import SpeechEncoder

# NNX path prefix -> PyTorch name prefix, for `clsp_jax.convert`.
TORCH_MOUNTS = {"speech": ""}
LOGIT_SCALE_MAX = math.log(100.0)


def model_config(config: Mapping) -> dict:
    """Normalises `{"speech": {...}, "text": {...}, "joint_dim"?: int, "head_dropout"?: float, "remat"?: str,
    "logit_bias_init"?: float | None}` (the fixture format, plus optional keys).

    `joint_dim` may sit at the top level or inside `speech` (as in the reference fixtures); default 512.
    `remat` ("none" | "layer" | "layer_save_dots", see `clsp_jax.models.remat`) applies to every layer of
    both towers; default "none".
    `head_init`: "torch" (default; PyTorch nn.Linear's init, as the authors' heads start) or "lecun" (flax's
    lecun-normal kernels, zero biases; the CPU demo learns faster from it, see configs/tiny.py).
    `logit_bias_init`: None (default) = no logit bias, the authors' parameter set; a number adds a learnable
    scalar `logit_bias` starting there (SigLIP starts at -10), which the siglip objective needs.
    """
    config = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(config).items()}
    for key in ("speech", "text"):
        if not isinstance(config.get(key), Mapping):
            raise ValueError(f"model config needs a {key!r} dict, got keys {sorted(config)}")
    joint = config.get("joint_dim", config["speech"].get("joint_dim", 512))
    if not isinstance(joint, int) or joint <= 0:
        raise ValueError(f"joint_dim must be a positive int, got {joint!r}")
    config["joint_dim"] = joint
    config.setdefault("head_dropout", 0.1)
    if config.setdefault("head_init", "torch") not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {config['head_init']!r}")
    check_remat(config.setdefault("remat", "none"))
    bias = config.setdefault("logit_bias_init", None)
    if bias is not None:
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"logit_bias_init must be a finite number or None, got {bias!r}")
        config["logit_bias_init"] = float(bias)
    return config


HEAD_INITS = ("torch", "lecun")


def _linear(din, dout, init, dtype, param_dtype, rngs):
    """nnx.Linear [din -> dout]. init "torch": as PyTorch's nn.Linear, so a new head starts as the authors' does:
    kernel and bias ~ U(-1/sqrt(din), 1/sqrt(din)) (the bound of its kaiming_uniform_(a=sqrt(5)) kernel);
    "lecun": flax's default (lecun-normal kernel, zero bias)."""
    if init == "lecun":
        return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bound = 1.0 / math.sqrt(din)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(din, dout, kernel_init=uniform, bias_init=uniform, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)


class Transform(nnx.Module):
    """Linear-ReLU-Dropout-Linear (the authors' MLPLayers([d, d, d]); not residual)."""

    def __init__(self, dim, dropout, *, rngs, dtype, param_dtype, init="torch"):
        # Keys are the PyTorch nn.Sequential indices: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear.
        self.sequential = nnx.Dict({"0": _linear(dim, dim, init, dtype, param_dtype, rngs),
                                    "3": _linear(dim, dim, init, dtype, param_dtype, rngs)})
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, deterministic, rngs):
        x = self.dropout(jax.nn.relu(self.sequential["0"](x)), deterministic=deterministic, rngs=rngs)
        return self.sequential["3"](x)


def projection(din, dim, *, rngs, dtype, param_dtype, init="torch") -> nnx.Dict:
    """Linear(din->dim)-ReLU-Linear(dim->dim), keyed by the PyTorch nn.Sequential indices 0 and 2."""
    return nnx.Dict({"0": _linear(din, dim, init, dtype, param_dtype, rngs),
                     "2": _linear(dim, dim, init, dtype, param_dtype, rngs)})


def _project(proj: nnx.Dict, x):
    return proj["2"](jax.nn.relu(proj["0"](x)))


def fold_input_standardization(linear: nnx.Linear, mean, std) -> None:
    """Makes `linear` compute what it computed on (x - mean) / std: kernel / std, bias - (mean / std) @ kernel.

    mean, std [din]. A data-dependent initialisation: the layer's function of standardised inputs is
    unchanged, no module is added, so checkpoints keep the authors' names and shapes.
    """
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    kernel = linear.kernel[...] / std[:, None].astype(linear.kernel.dtype)
    linear.kernel[...] = kernel
    linear.bias[...] = linear.bias[...] - mean @ kernel


def l2_normalize(x, eps=1e-12):
    """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def masked_mean(frames, lens):
    """frames [B, T, C], lens [B] -> mean over the first lens[b] frames [B, C] (float32)."""
    valid = jnp.arange(frames.shape[1])[None, :] < lens[:, None]
    total = jnp.sum(jnp.where(valid[..., None], frames.astype(jnp.float32), 0.0), axis=1)
    return total / jnp.maximum(lens, 1)[:, None].astype(jnp.float32)


class CLSPNet(nnx.Module):
    """The network. Embeddings are float32 and unit-norm; similarity is a plain dot product."""

    def __init__(self, config: Mapping, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        config = model_config(config)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        joint, p = config["joint_dim"], config["head_dropout"]
        self.speech = SpeechEncoder(config["speech"], **kw, remat=config["remat"])
        head = dict(kw, init=config["head_init"])
        self.audio_projection = projection(self.speech.output_dim, joint, **head)
        self.audio_transform = Transform(joint, p, **head)
        self.text_encoder = TextEncoder(config["text"], **kw, remat=config["remat"])
        self.text_projection = projection(self.text_encoder.output_dim, joint, **head)
        self.text_transform = Transform(joint, p, **head)
        self.logit_scale = nnx.Param(jnp.full((), math.log(1 / 0.07), param_dtype))
        # Only when configured, so a network without it has exactly the authors' parameters (and state dict).
        # float32 whatever param_dtype: the bias sits near -10 and moves by small steps.
        bias = config["logit_bias_init"]
        self.logit_bias = None if bias is None else nnx.Param(jnp.full((), bias, jnp.float32))

    def encode_features(self, features, feature_lens, *, deterministic=True, rngs=None):
        """features [B, T, F] fbank, feature_lens [B] -> (frames [B, T', C], frame_lens [B]) at ~25 Hz."""
        return self.speech(features, feature_lens, deterministic=deterministic, rngs=rngs)

    def embed_features(self, features, feature_lens, *, deterministic=True, rngs=None):
        """features [B, T, F], feature_lens [B] -> unit-norm audio embeddings [B, joint_dim] float32.

        Training (`deterministic=False`) needs `rngs` (e.g. `nnx.Rngs(dropout=key)`) for dropout.
        """
        frames, lens = self.encode_features(features, feature_lens, deterministic=deterministic, rngs=rngs)
        return self.embed_pooled_audio(masked_mean(frames, lens).astype(frames.dtype), deterministic=deterministic,
                                       rngs=rngs)

    def embed_pooled_audio(self, pooled, *, deterministic=True, rngs=None):
        """pooled [B, C] (the speech frames' average, `pooled_audio`; e.g. cached from a frozen tower) ->
        unit-norm audio embeddings [B, joint_dim] float32: the heads of `embed_features`."""
        return l2_normalize(self.audio_transform(_project(self.audio_projection, pooled), deterministic, rngs))

    def pooled_audio(self, features, feature_lens):
        """features [B, T, F], feature_lens [B] -> the audio head's input [B, C]: frames averaged (eval mode)."""
        frames, lens = self.encode_features(features, feature_lens)
        return masked_mean(frames, lens)

    def embed_tokens(self, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rngs=None):
        """input_ids, attention_mask [B, L] -> unit-norm text embeddings [B, joint_dim] float32."""
        pooled = self.text_encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic, rngs=rngs)
        return l2_normalize(self.text_transform(_project(self.text_projection, pooled), deterministic, rngs))

    def embed_cls_states(self, cls_states, *, deterministic=True, rngs=None):
        """cls_states [B, H] (the text encoder's last-layer [CLS] states, e.g. cached from a frozen encoder)
        -> unit-norm text embeddings [B, joint_dim] float32: the pooler and the heads of `embed_tokens`."""
        pooled = self.text_encoder.pooler(cls_states)
        return l2_normalize(self.text_transform(_project(self.text_projection, pooled), deterministic, rngs))

    def scale(self):
        """exp(logit_scale), the multiplier of the cosine similarities: a float32 scalar."""
        return jnp.exp(self.logit_scale[...].astype(jnp.float32))

    def bias(self):
        """The learnable logit bias (added to the scaled similarities), a float32 scalar; None without one."""
        return None if self.logit_bias is None else self.logit_bias[...].astype(jnp.float32)
