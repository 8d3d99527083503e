"""Speech tower: icefall `Conv2dSubsampling` + non-streaming `Zipformer2`, in Flax NNX.

Reproduces the eval-mode forward of the CLSP authors' PyTorch speech tower (icefall
`egs/emilia/CLAP/spear_roberta`: `get_encoder_embed` + `get_encoder_model`, causal=False, no post-encoder
downsample). Module and attribute names mirror the PyTorch modules, so `clsp_jax.convert.load_torch_state`
maps the `encoder_embed.*` / `encoder.*` tensors of a CLSP or SPEAR checkpoint with no tables.

Layout: batch-major `[B, T, C]` everywhere (PyTorch Zipformer2 is time-major); channels-last convolutions.
Shapes are static; padding is handled with masks built from lengths, so everything jits.

Precision (mirrors the authors' torch autocast training): `dtype` is the compute dtype of matmuls, convs and
attention products; the residual stream, BiasNorm, bypasses, downsampling, softmax and the Swoosh
activations' arithmetic stay float32, so the encoder output is float32. Casting the residual stream
to bf16 as well would roughly double the error against float32 (tests/test_zipformer.py pins the bf16
tolerance).

Kept for training, inactive when `deterministic=True`: dropout (config `dropout`, the recipe's final value
0.1) in the feed-forward modules and after Conv2dSubsampling (masks shared over time, as icefall does),
dropout 0.15 on the positional embeddings, and the per-sequence feature masks that zero channels above
`encoder_unmasked_dim` on 12.5% / ~23% of sequences.

With config `regularisers=True` (default False), training also applies icefall's regularisers at the sites
and with the constants the authors' Zipformer2 uses (`clsp_jax.models.regularisers`): per-sequence layer
skipping (a layer's output replaced by its input on a random 0.035 * sqrt(downsampling) of the sequences),
ConvNeXt layerdrop (1.5% of sequences), Balancer, Whiten, ScaleGrad (0.2 on the first subsampling conv),
limit_param_value (bypass scales in [0.2, 1], BiasNorm log-scales in [-1.5, 1.5]) and
penalize_abs_values_gt (attention scores beyond +-25). The constants are the final values of icefall's
ScheduledFloat schedules: the authors' fine-tuning recipes offset the batch count by 1e5, which puts every
schedule at its end from step 0. The schedules whose final value is 0 (attention, conv, ff2/ff3 and
pos-emb skip rates) and const_attention_rate (which icefall only tests in eval mode, where it is 0) have
no counterpart. Everything except the skipping is the identity in the forward pass.

Randomness for training comes in at call time (`rngs=nnx.Rngs(dropout=key)`); the constructor's `rngs` only
initialise parameters. So a module's state is its parameters alone, and a checkpoint loads without a random
init: `model = nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0)))` then
`clsp_jax.convert.load_torch_state(model, state_dict)`. Inside the tower `rngs=None` means eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsp_jax.models import convs
from clsp_jax.models.regularisers import (Balancer, Draws, Whiten, limit_param_value, penalize_abs_values_gt,
                                          scale_grad)
from clsp_jax.models.remat import check_remat, remat_layer_call

# Per-stack settings: one value per stack, or one value shared by every stack.
_PER_STACK = (
    "num_encoder_layers",
    "encoder_dim",
    "encoder_unmasked_dim",
    "query_head_dim",
    "pos_head_dim",
    "value_head_dim",
    "num_heads",
    "feedforward_dim",
    "cnn_module_kernel",
)
_MASK_VALUE = -1000.0  # icefall's fill for masked attention scores (exp(-1000) underflows to exactly 0)
_FEATURE_MASK_PROB = 0.125  # icefall Zipformer2.get_feature_masks

# Training regularisers (config `regularisers`): icefall's arguments at each site, at the end of their
# schedules. Balancer(min_positive, max_positive, min_abs, max_abs), Whiten(whitening_limit, grad_scale).
_SUBSAMPLING_SCALE_GRAD = 0.2  # on the first conv's output
_SUBSAMPLING_BALANCERS = {"0": Balancer(max_abs=1.0), "4": Balancer(max_abs=4.0), "7": Balancer(max_abs=4.0)}
_SUBSAMPLING_OUT_WHITEN = Whiten(8.0, 0.02)
_CONVNEXT_LAYERDROP = 0.015
_CONVNEXT_HIDDEN_BALANCER = Balancer(0.3, 1.0, 0.75, 5.0)
_CONVNEXT_OUT_BALANCER = Balancer(0.4, 0.6, 1.0, 6.0)
_CONVNEXT_OUT_WHITEN = Whiten(5.0, 0.01)
_LIMIT_PROB = 0.6  # limit_param_value's probability of acting on a forward call
_BYPASS_SCALE_RANGE = (0.2, 1.0)
_BIASNORM_LOG_SCALE_RANGE = (-1.5, 1.5)
_KEYS_BALANCER = Balancer(0.4, 0.6, 0.0, 100.0, prob=0.025)
_KEYS_WHITEN_LIMIT, _KEYS_WHITEN_GRAD_SCALE = 6.0, 0.025  # grouped by head
_ATTN_SCORE_LIMIT, _ATTN_SCORE_PENALTY, _ATTN_SCORE_PROB = 25.0, 1e-4, 0.1
_SELF_ATTN_WHITEN = Whiten(22.5, 0.01)
_FF_HIDDEN_BALANCER = Balancer(0.3, 1.0, 0.75, 5.0)
_FF_OUT_WHITEN = Whiten(15.0, 0.01)
_NONLIN_GATE_BALANCER = Balancer(0.05, 0.95, 0.5, 5.0)
_NONLIN_VALUE_WHITEN = Whiten(10.0, 0.01)
_NONLIN_OUT_WHITEN = Whiten(15.0, 0.01)
_CONV_GATE_BALANCER = Balancer(0.025, 1.0, 1.5, 10.0)
_CONV_DEPTHWISE_BALANCER = Balancer(0.05, 1.0, 0.5, 10.0)
_CONV_WHITEN = Whiten(15.0, 0.01)
_LAYER_NONLIN_BALANCER = Balancer(0.3, 0.7, 0.02, 100.0, prob=0.05)
_LAYER_FF2_BALANCER = Balancer(0.3, 0.7, 0.1, 2.0, prob=0.05)
_LAYER_FF3_BALANCER = Balancer(0.3, 0.7, 0.2, 4.0, prob=0.05)
_LAYER_PRENORM_BALANCER = Balancer(0.45, 0.55, 0.2, 4.0)
_LAYER_OUT_BALANCER = Balancer(0.45, 0.55, 0.1, 4.0)
_LAYER_OUT_WHITEN = Whiten(12.0, 0.01)


def layer_skip_rate(downsampling: int) -> float:
    """Fraction of sequences on which a layer of a stack at this downsampling is skipped (icefall's final
    layerdrop rate): 0.035 * sqrt(downsampling)."""
    return 0.035 * math.sqrt(downsampling)


# ----------------------------------------------------------------------------------------------------------
# Config


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"speech config {name!r}: expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"speech config {name!r}: expected an integer, got {value!r}") from None


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    """An int, a sequence of ints, or icefall's comma-separated string "1,2,4" -> tuple of ints."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
        try:
            value = [int(v) for v in value]
        except ValueError:
            raise ValueError(f"speech config {name!r}: cannot parse {value!r} as integers") from None
    if not isinstance(value, Sequence):
        value = [value]
    out = tuple(_as_int(name, v) for v in value)
    if not out:
        raise ValueError(f"speech config {name!r} is empty")
    return out


@dataclasses.dataclass(frozen=True)
class ZipformerConfig:
    """Validated speech-tower config; per-stack fields hold one value per stack."""

    feature_dim: int
    downsampling_factor: tuple[int, ...]
    num_encoder_layers: tuple[int, ...]
    encoder_dim: tuple[int, ...]
    encoder_unmasked_dim: tuple[int, ...]
    query_head_dim: tuple[int, ...]
    pos_head_dim: tuple[int, ...]
    value_head_dim: tuple[int, ...]
    num_heads: tuple[int, ...]
    feedforward_dim: tuple[int, ...]
    cnn_module_kernel: tuple[int, ...]
    pos_dim: int
    output_downsampling_factor: int
    dropout: float = 0.1
    # Conv2dSubsampling's three conv widths (layer1/2/3_channels in icefall; the last is the ConvNeXt width).
    subsampling_channels: tuple[int, int, int] = (8, 32, 128)
    # icefall's training regularisers (module doc); no effect in eval mode.
    regularisers: bool = False

    @property
    def num_stacks(self) -> int:
        return len(self.downsampling_factor)

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "ZipformerConfig":
        """Parses the fixture-format "speech" dict (icefall argument names); unknown keys are ignored."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"speech config must be a mapping, got {type(cfg).__name__}")
        required = ("feature_dim", "downsampling_factor", "pos_dim", "output_downsampling_factor", *_PER_STACK)
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"speech config is missing {', '.join(missing)}")
        ds = _as_int_tuple("downsampling_factor", cfg["downsampling_factor"])
        n = len(ds)
        stacks = {}
        for name in _PER_STACK:
            values = _as_int_tuple(name, cfg[name])
            if len(values) not in (1, n):
                raise ValueError(
                    f"speech config {name!r} has {len(values)} values; expected 1 or {n} "
                    f"(one per stack, as in downsampling_factor)"
                )
            stacks[name] = values * n if len(values) == 1 else values
        dropout = cfg.get("dropout", 0.1)
        dropout = 0.1 if dropout is None else float(dropout)
        regularisers = cfg.get("regularisers", False)
        if not isinstance(regularisers, (bool, np.bool_)):
            raise ValueError(f"speech config 'regularisers' must be true or false, got {regularisers!r}")
        channels = _as_int_tuple("subsampling_channels", cfg.get("subsampling_channels", (8, 32, 128)))
        if len(channels) != 3:
            raise ValueError(f"speech config 'subsampling_channels' needs 3 widths, got {list(channels)}")
        out = cls(
            feature_dim=_as_int("feature_dim", cfg["feature_dim"]),
            downsampling_factor=ds,
            pos_dim=_as_int("pos_dim", cfg["pos_dim"]),
            output_downsampling_factor=_as_int("output_downsampling_factor", cfg["output_downsampling_factor"]),
            dropout=dropout,
            subsampling_channels=channels,
            regularisers=bool(regularisers),
            **stacks,
        )
        out._validate()
        return out

    def _validate(self) -> None:
        def positive(name, values):
            bad = [v for v in values if v < 1]
            if bad:
                raise ValueError(f"speech config {name!r} must be >= 1, got {list(values)}")

        positive("downsampling_factor", self.downsampling_factor)
        positive("subsampling_channels", self.subsampling_channels)
        for name in _PER_STACK:
            positive(name, getattr(self, name))
        if self.feature_dim < 7:
            raise ValueError(f"speech config 'feature_dim' must be >= 7 (Conv2dSubsampling), got {self.feature_dim}")
        if self.pos_dim < 2 or self.pos_dim % 2:
            raise ValueError(f"speech config 'pos_dim' must be even and >= 2, got {self.pos_dim}")
        if self.output_downsampling_factor not in (1, 2):
            raise ValueError(
                f"speech config 'output_downsampling_factor' must be 1 or 2, got {self.output_downsampling_factor}"
            )
        for i, (u, d) in enumerate(zip(self.encoder_unmasked_dim, self.encoder_dim)):
            if u > d:
                raise ValueError(f"speech config stack {i}: encoder_unmasked_dim {u} > encoder_dim {d}")
        for i, k in enumerate(self.cnn_module_kernel):
            if k % 2 == 0:
                raise ValueError(f"speech config stack {i}: cnn_module_kernel must be odd, got {k}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"speech config 'dropout' must be in [0, 1), got {self.dropout}")


# ----------------------------------------------------------------------------------------------------------
# Pure functions


# Swoosh activations are evaluated in float32 whatever the input dtype (as icefall does): near x = 0 the
# output is a small difference of two ~0.3 terms, which bf16 would swamp (the error compounds over the convolution modules).


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _swoosh(x: jax.Array, shift: float, offset: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (jax.nn.softplus(x32 - shift) - 0.08 * x32 - offset).astype(x.dtype)


@_swoosh.defjvp
def _swoosh_jvp(shift, offset, primals, tangents):
    # The derivative written out, sigmoid(x - shift) - 0.08: the backward then keeps that one array per
    # activation, where autodiff of softplus kept the matmul output, its biased sum and the activation.
    (x,), (t,) = primals, tangents
    slope = jax.nn.sigmoid(x.astype(jnp.float32) - shift) - 0.08
    return _swoosh(x, shift, offset), (slope * t.astype(jnp.float32)).astype(t.dtype)


def swoosh_l(x: jax.Array) -> jax.Array:
    """SwooshL(x) = log(1 + exp(x - 4)) - 0.08 x - 0.035, in x's dtype."""
    return _swoosh(x, 4.0, 0.035)


def swoosh_r(x: jax.Array) -> jax.Array:
    """SwooshR(x) = log(1 + exp(x - 1)) - 0.08 x - 0.313261687, in x's dtype."""
    return _swoosh(x, 1.0, 0.313261687)


def compact_rel_pos_emb(seq_len: int, dim: int) -> np.ndarray:
    """icefall CompactRelPositionalEncoding table for offsets -(T-1)..T-1: [2T-1, dim] float32.

    Offsets are log-compressed beyond ~sqrt(dim), squashed by atan and Fourier-expanded (length_factor 1);
    the last channel is a constant 1 (a bias term).
    """
    offsets = np.arange(-(seq_len - 1), seq_len, dtype=np.float64)[:, None]
    freqs = 1.0 + np.arange(dim // 2, dtype=np.float64)
    compression = dim**0.5
    compressed = compression * np.sign(offsets) * (np.log(np.abs(offsets) + compression) - math.log(compression))
    angle = np.arctan(compressed / (dim / (2.0 * math.pi))) * freqs
    pe = np.empty((2 * seq_len - 1, dim), np.float64)
    pe[:, 0::2] = np.cos(angle)
    pe[:, 1::2] = np.sin(angle)
    pe[:, -1] = 1.0
    return pe.astype(np.float32)


def rel_to_abs(scores: jax.Array) -> jax.Array:
    """[..., T, 2T-1] scores indexed by relative offset n -> [..., T, T] with out[i, j] = scores[i, T-1-i+j].

    Index n of the input stands for key-minus-query offset n - (T-1), so out[i, j] scores offset j - i (the
    reference's `as_strided`). Done by flattening, skipping T-1 entries and re-reading with row length 2T-2:
    no gather.
    """
    *lead, t, n = scores.shape
    if n != 2 * t - 1:
        raise ValueError(f"rel_to_abs expects [..., T, 2T-1], got {scores.shape}")
    if t == 1:
        return scores
    flat = scores.reshape(*lead, t * n)[..., t - 1 : t - 1 + t * (2 * t - 2)]
    return flat.reshape(*lead, t, 2 * t - 2)[..., :t]


def convert_num_channels(x: jax.Array, num_channels: int) -> jax.Array:
    """Truncates or zero-pads the channel (last) axis to `num_channels`."""
    c = x.shape[-1]
    if num_channels <= c:
        return x[..., :num_channels]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, num_channels - c)])


def simple_upsample(x: jax.Array, factor: int, length: int) -> jax.Array:
    """icefall SimpleUpsample (repeat each frame `factor` times), trimmed to `length` frames: [B, T, C]."""
    return jnp.repeat(x, factor, axis=1)[:, :length]


def length_mask(lengths: jax.Array, max_len: int) -> jax.Array:
    """[B] lengths -> [B, max_len] bool, True on valid frames."""
    return jnp.arange(max_len)[None, :] < lengths[:, None]


def _full_dim_output(outputs: Sequence[jax.Array], dims: Sequence[int]) -> jax.Array:
    """Channels 0..max(dims): each channel range taken from the latest stack that has it."""
    pieces, cur = [outputs[-1]], dims[-1]
    for out, d in zip(outputs[-2::-1], dims[-2::-1]):
        if d > cur:
            pieces.append(out[..., cur:d])
            cur = d
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


# ----------------------------------------------------------------------------------------------------------
# Layers with PyTorch-like initialisation


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(in_features, out_features, *, rngs, dtype, param_dtype, scale=None, use_bias=True) -> nnx.Linear:
    """nnx.Linear initialised like torch nn.Linear, or like icefall ScaledLinear(initial_scale=scale)."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=_uniform(bound if scale is None else bound * scale),
        bias_init=_uniform(bound if scale is None else 0.1 * scale),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _conv(in_features, out_features, kernel_size, *, rngs, dtype, param_dtype, scale=None, groups=1, **kw):
    """nnx.Conv initialised like torch nn.ConvNd, or like icefall ScaledConv(initial_scale=scale), computed by
    `convs.conv_general_dilated` (forms of each kind of convolution that XLA:CPU runs fast)."""
    bound = 1.0 / math.sqrt(in_features // groups * math.prod(kernel_size))
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size,
        conv_general_dilated=convs.conv_general_dilated,
        feature_group_count=groups,
        kernel_init=_uniform(bound if scale is None else bound * scale),
        bias_init=_uniform(bound if scale is None else 0.1 * scale),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **kw,
    )


class BiasNorm(nnx.Module):
    """icefall BiasNorm over the last axis: x * exp(log_scale) / rms(x - bias).

    Computed and returned in float32 whatever `dtype` is: it feeds the float32 residual stream.
    """

    def __init__(self, num_channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        del dtype  # always float32, see above
        self.log_scale = nnx.Param(jnp.asarray(1.0, param_dtype))
        self.bias = nnx.Param(1e-4 * jax.random.normal(rngs.params(), (num_channels,), param_dtype))

    def __call__(self, x: jax.Array, reg: Draws | None = None) -> jax.Array:
        """x [..., C]; `reg` (training regularisers, None = off) keeps log_scale in [-1.5, 1.5]."""
        x32 = x.astype(jnp.float32)
        log_scale = self.log_scale[...].astype(jnp.float32)
        if reg is not None:
            log_scale = limit_param_value(log_scale, reg.coin(_LIMIT_PROB), *_BIASNORM_LOG_SCALE_RANGE)
        ms = jnp.mean(jnp.square(x32 - self.bias[...].astype(jnp.float32)), axis=-1, keepdims=True)
        return x32 * (jax.lax.rsqrt(ms) * jnp.exp(log_scale))


class BypassModule(nnx.Module):
    """Learned per-channel interpolation src_orig + (src - src_orig) * bypass_scale (float32 stream).

    With training regularisers (`reg`), bypass_scale is kept in [0.2, 1] (limit_param_value) and, on a random
    `skip_rate` of the sequences, the scale is 0: the output is src_orig (per-sequence layer skipping).
    """

    def __init__(self, embed_dim: int, *, skip_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32):
        del dtype  # the residual stream is float32
        self.bypass_scale = nnx.Param(jnp.full((embed_dim,), 0.5, param_dtype))
        self.skip_rate = skip_rate

    def __call__(self, src_orig: jax.Array, src: jax.Array, reg: Draws | None = None) -> jax.Array:
        """src_orig, src [B, T, C] -> [B, T, C]; `reg` None = eval (no limit, no skipping)."""
        scale = self.bypass_scale[...].astype(jnp.float32)
        if reg is not None:
            scale = limit_param_value(scale, reg.coin(_LIMIT_PROB), *_BYPASS_SCALE_RANGE)
            if self.skip_rate:
                keep = jax.random.uniform(reg.rngs["dropout"](), (src.shape[0], 1, 1)) >= self.skip_rate
                scale = scale * keep
        return src_orig + (src - src_orig) * scale


# ----------------------------------------------------------------------------------------------------------
# Conv2dSubsampling


class ConvNeXt(nnx.Module):
    """Residual depthwise 7x7 -> 1x1 (x3 channels) -> SwooshL -> 1x1 block on [B, T, F, C]."""

    def __init__(self, channels: int, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, hidden_ratio=3):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        hidden = channels * hidden_ratio
        self.depthwise_conv = _conv(channels, channels, (7, 7), groups=channels, padding=((3, 3), (3, 3)), **kw)
        self.pointwise_conv1 = _conv(channels, hidden, (1, 1), **kw)
        self.pointwise_conv2 = _conv(hidden, channels, (1, 1), scale=0.01, **kw)

    def __call__(self, x: jax.Array, reg: Draws | None = None) -> jax.Array:
        """x [B, T, F, C]; `reg` (training regularisers) adds layerdrop: the block is the identity on a
        random 1.5% of the sequences."""
        h = _CONVNEXT_HIDDEN_BALANCER(self.pointwise_conv1(self.depthwise_conv(x)), reg)
        y = self.pointwise_conv2(swoosh_l(h))
        if reg is not None:
            y = y * (jax.random.uniform(reg.rngs["dropout"](), (x.shape[0], 1, 1, 1)) >= _CONVNEXT_LAYERDROP)
        return _CONVNEXT_OUT_WHITEN(_CONVNEXT_OUT_BALANCER(x + y, reg), reg)


class Conv2dSubsampling(nnx.Module):
    """Features [B, T, F] -> [B, (T-7)//2, out_channels] (~50 Hz for 10 ms frames), then BiasNorm.

    Three 3x3 convs (time x freq; the second strides 2 in both, the third 2 in freq) with SwooshR, one
    ConvNeXt block, a Linear over (channel, freq) and BiasNorm. Like the reference, padded input frames are
    not masked here (the convs see whatever the padding holds: `clsp_jax.features.fbank` pads with Lhotse's
    LOG_EPSILON, as the authors' batches are padded).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dropout: float = 0.1,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        layer1_channels: int = 8,
        layer2_channels: int = 32,
        layer3_channels: int = 128,
        regularisers: bool = False,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.regularisers = regularisers
        # nn.Sequential indices of the reference (activations and balancers sit in the gaps).
        self.conv = nnx.Dict(
            {
                "0": _conv(1, layer1_channels, (3, 3), padding=((0, 0), (1, 1)), **kw),
                "4": _conv(layer1_channels, layer2_channels, (3, 3), strides=(2, 2), padding="VALID", **kw),
                "7": _conv(layer2_channels, layer3_channels, (3, 3), strides=(1, 2), padding="VALID", **kw),
            }
        )
        self.convnext = ConvNeXt(layer3_channels, **kw)
        self.out_width = (((in_channels - 1) // 2) - 1) // 2
        self.out = _linear(self.out_width * layer3_channels, out_channels, **kw)
        self.out_norm = BiasNorm(out_channels, **kw)
        # Dropout3(shared_dim=1): one mask per (sequence, channel), shared over time.
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1,))
        self.dtype = dtype

    def __call__(self, x: jax.Array, x_lens: jax.Array, *, rngs: nnx.Rngs | None = None):
        """x [B, T, F] float, x_lens [B] int -> (y [B, (T-7)//2, C], y_lens [B] = max((x_lens-7)//2, 0)).

        `rngs` (training) drives dropout, and the regularisers when the module has them.
        """
        reg = Draws(rngs) if self.regularisers and rngs is not None else None
        x = x.astype(self.dtype)[..., None]  # [B, T, F, 1]
        for name in ("0", "4", "7"):
            x = self.conv[name](x)
            if name == "0" and reg is not None:
                x = scale_grad(x, _SUBSAMPLING_SCALE_GRAD)
            x = swoosh_r(_SUBSAMPLING_BALANCERS[name](x, reg))
        x = self.convnext(x, reg)
        b, t, f, c = x.shape
        x = jnp.swapaxes(x, 2, 3).reshape(b, t, c * f)  # torch flattens (channel, freq), channel-major
        x = self.out_norm(_SUBSAMPLING_OUT_WHITEN(self.out(x), reg), reg)
        x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
        return x, jnp.maximum((x_lens - 7) // 2, 0)


# ----------------------------------------------------------------------------------------------------------
# Zipformer2 sub-modules


class CompactRelPositionalEncoding(nnx.Module):
    """Relative positional embeddings [2T-1, dim] (offsets -(T-1)..T-1), computed, not learned."""

    def __init__(self, embed_dim: int, *, dropout_rate: float = 0.15, dtype=jnp.float32):
        self.embed_dim = embed_dim
        self.dropout = nnx.Dropout(dropout_rate)
        self.dtype = dtype

    def __call__(self, seq_len: int, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        pe = jnp.asarray(compact_rel_pos_emb(seq_len, self.embed_dim), self.dtype)
        return self.dropout(pe, deterministic=rngs is None, rngs=rngs)


class RelPositionMultiheadAttentionWeights(nnx.Module):
    """Softmax attention weights from queries, keys and relative-position queries: [B, H, T, T].

    score(i, j) = q_i . k_j + p_i . W pos_emb(j - i); padded keys get -1000 before the softmax. The query/key
    scaling lives in the weights (icefall convention), none is applied here.
    """

    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        *,
        rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.query_head_dim, self.pos_head_dim = num_heads, query_head_dim, pos_head_dim
        in_proj_dim = (2 * query_head_dim + pos_head_dim) * num_heads
        self.in_proj = _linear(embed_dim, in_proj_dim, scale=query_head_dim**-0.25, **kw)
        self.linear_pos = _linear(pos_dim, num_heads * pos_head_dim, scale=0.05, use_bias=False, **kw)
        self.dtype = dtype

    def __call__(self, x: jax.Array, pos_emb: jax.Array, valid: jax.Array, reg: Draws | None = None):
        """x [B, T, C], pos_emb [2T-1, pos_dim], valid [B, T] bool -> weights [B, H, T, T] (rows sum to 1).

        `reg` (training regularisers): balancer and per-head whitening on the keys, and on 10% of calls a
        gradient penalty on scores beyond +-25.
        """
        b, t, _ = x.shape
        h, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        proj = self.in_proj(x)
        q = proj[..., : h * dq].reshape(b, t, h, dq)
        k = _KEYS_BALANCER(proj[..., h * dq : 2 * h * dq], reg)
        k = Whiten(_KEYS_WHITEN_LIMIT, _KEYS_WHITEN_GRAD_SCALE, num_groups=h)(k, reg).reshape(b, t, h, dq)
        p = proj[..., 2 * h * dq :].reshape(b, t, h, dp)
        scores = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32)
        pos = self.linear_pos(pos_emb).reshape(2 * t - 1, h, dp)
        pos_scores = jnp.einsum("bihd,nhd->bhin", p, pos, preferred_element_type=jnp.float32)
        scores = scores + rel_to_abs(pos_scores)
        if reg is not None:
            scores = penalize_abs_values_gt(scores, reg.coin(_ATTN_SCORE_PROB), _ATTN_SCORE_LIMIT,
                                            _ATTN_SCORE_PENALTY)
        scores = jnp.where(valid[:, None, None, :], scores, _MASK_VALUE)
        return jax.nn.softmax(scores, axis=-1).astype(self.dtype)


class SelfAttention(nnx.Module):
    """Values from x, mixed with precomputed attention weights, projected back: [B, T, C]."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = _linear(embed_dim, num_heads * value_head_dim, **kw)
        self.out_proj = _linear(num_heads * value_head_dim, embed_dim, scale=0.05, **kw)

    def __call__(self, x: jax.Array, attn_weights: jax.Array, reg: Draws | None = None) -> jax.Array:
        b, t, _ = x.shape
        v = self.in_proj(x).reshape(b, t, attn_weights.shape[1], -1)
        out = jnp.einsum("bhij,bjhd->bihd", attn_weights, v).reshape(b, t, -1)
        return _SELF_ATTN_WHITEN(self.out_proj(out), reg)


class FeedforwardModule(nnx.Module):
    """Linear -> SwooshL -> dropout (mask shared over time) -> Linear."""

    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: float, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = _linear(embed_dim, feedforward_dim, **kw)
        self.out_proj = _linear(feedforward_dim, embed_dim, scale=0.1, **kw)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1,))

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None, reg: Draws | None = None) -> jax.Array:
        """x [B, T, C]; `rngs` drives dropout, `reg` the training regularisers (None = off)."""
        h = swoosh_l(_FF_HIDDEN_BALANCER(self.in_proj(x), reg))
        return _FF_OUT_WHITEN(self.out_proj(self.dropout(h, deterministic=rngs is None, rngs=rngs)), reg)


class NonlinAttention(nnx.Module):
    """tanh-gated values mixed by one head's attention weights, times a second gate, projected: [B, T, C]."""

    def __init__(self, channels: int, hidden_channels: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = _linear(channels, 3 * hidden_channels, **kw)
        self.out_proj = _linear(hidden_channels, channels, scale=0.05, **kw)

    def __call__(self, x: jax.Array, attn_weights: jax.Array, reg: Draws | None = None) -> jax.Array:
        """x [B, T, C], attn_weights [B, T, T] (a single head)."""
        s, v, y = jnp.split(self.in_proj(x), 3, axis=-1)
        s = jnp.tanh(_NONLIN_GATE_BALANCER(s, reg))
        v = jnp.einsum("bij,bjc->bic", attn_weights, _NONLIN_VALUE_WHITEN(v, reg) * s)
        return _NONLIN_OUT_WHITEN(self.out_proj(v * y), reg)


class ConvolutionModule(nnx.Module):
    """GLU -> zero padded frames -> depthwise conv over time -> SwooshR -> Linear: [B, T, C]."""

    def __init__(self, channels: int, kernel_size: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = _linear(channels, 2 * channels, **kw)
        pad = kernel_size // 2
        self.depthwise_conv = _conv(channels, channels, (kernel_size,), groups=channels, padding=((pad, pad),), **kw)
        self.out_proj = _linear(channels, channels, scale=0.05, **kw)

    def __call__(self, x: jax.Array, valid: jax.Array, reg: Draws | None = None) -> jax.Array:
        """x [B, T, C], valid [B, T] bool; `reg` the training regularisers (None = off)."""
        x, gate = jnp.split(self.in_proj(x), 2, axis=-1)
        x = x * jax.nn.sigmoid(_CONV_GATE_BALANCER(gate, reg))
        x = jnp.where(valid[..., None], x, 0)  # padding must not leak into valid frames through the conv
        x = _CONV_WHITEN(_CONV_DEPTHWISE_BALANCER(self.depthwise_conv(x), reg), reg)
        return self.out_proj(swoosh_r(x))


class Zipformer2EncoderLayer(nnx.Module):
    """One Zipformer2 layer; the attention weights are computed once and used by three modules.

    Order: ff1, nonlin-attention (head 0), self-attn1, conv1, ff2, mid bypass, self-attn2, conv2, ff3,
    BiasNorm, bypass to the layer input.
    """

    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        value_head_dim: int,
        feedforward_dim: int,
        cnn_module_kernel: int,
        dropout: float,
        *,
        rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        regularisers: bool = False,
        skip_rate: float = 0.0,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.regularisers = regularisers
        # skip_rate: the fraction of sequences whose output is the layer input (training regularisers only).
        self.bypass = BypassModule(embed_dim, skip_rate=skip_rate, dtype=dtype, param_dtype=param_dtype)
        self.bypass_mid = BypassModule(embed_dim, dtype=dtype, param_dtype=param_dtype)
        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            embed_dim, pos_dim, num_heads, query_head_dim, pos_head_dim, **kw
        )
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim, **kw)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim, **kw)
        self.feed_forward1 = FeedforwardModule(embed_dim, feedforward_dim * 3 // 4, dropout, **kw)
        self.feed_forward2 = FeedforwardModule(embed_dim, feedforward_dim, dropout, **kw)
        self.feed_forward3 = FeedforwardModule(embed_dim, feedforward_dim * 5 // 4, dropout, **kw)
        self.nonlin_attention = NonlinAttention(embed_dim, 3 * embed_dim // 4, **kw)
        self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel, **kw)
        self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel, **kw)
        # Unused in the reference forward ("TODO: remove it" there) but part of its checkpoints.
        self.bypass_scale = nnx.Param(jnp.full((embed_dim,), 0.5, param_dtype))
        self.norm = BiasNorm(embed_dim, **kw)

    def __call__(self, src: jax.Array, pos_emb: jax.Array, valid: jax.Array, *, rngs: nnx.Rngs | None = None):
        """src [B, T, C], pos_emb [2T-1, pos_dim], valid [B, T] bool -> [B, T, C].

        `rngs` (training) drives dropout, and the regularisers when the layer has them.
        """
        reg = Draws(rngs) if self.regularisers and rngs is not None else None
        src_orig = src
        attn_weights = self.self_attn_weights(src, pos_emb, valid, reg)
        src = src + self.feed_forward1(src, rngs=rngs, reg=reg)
        src = src + _LAYER_NONLIN_BALANCER(self.nonlin_attention(src, attn_weights[:, 0], reg), reg)
        src = src + self.self_attn1(src, attn_weights, reg)
        src = src + self.conv_module1(src, valid, reg)
        src = src + _LAYER_FF2_BALANCER(self.feed_forward2(src, rngs=rngs, reg=reg), reg)
        src = self.bypass_mid(src_orig, src, reg)
        src = src + self.self_attn2(src, attn_weights, reg)
        src = src + self.conv_module2(src, valid, reg)
        src = src + _LAYER_FF3_BALANCER(self.feed_forward3(src, rngs=rngs, reg=reg), reg)
        src = self.norm(_LAYER_PRENORM_BALANCER(src, reg), reg)
        src = self.bypass(src_orig, src, reg)
        return _LAYER_OUT_WHITEN(_LAYER_OUT_BALANCER(src, reg), reg)


class Zipformer2Encoder(nnx.Module):
    """A stack of Zipformer2EncoderLayers at one frame rate, sharing one positional embedding."""

    def __init__(self, num_layers: int, pos_dim: int, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none", **layer):
        self.remat = check_remat(remat)
        self.encoder_pos = CompactRelPositionalEncoding(pos_dim, dtype=dtype)
        self.layers = nnx.List(
            [
                Zipformer2EncoderLayer(pos_dim=pos_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **layer)
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x, valid, *, feature_mask=None, rngs: nnx.Rngs | None = None):
        """x [B, T, C], valid [B, T] bool, feature_mask [B, 1, C] or None -> [B, T, C]."""
        pos_emb = self.encoder_pos(x.shape[1], rngs=rngs)
        if feature_mask is not None:
            x = x * feature_mask
        call = remat_layer_call(lambda layer, x, pos_emb, valid, rngs: layer(x, pos_emb, valid, rngs=rngs), self.remat)
        for layer in self.layers:
            x = call(layer, x, pos_emb, valid, rngs)
            if feature_mask is not None:
                x = x * feature_mask
        return x


class SimpleDownsample(nnx.Module):
    """[B, T, C] -> [B, ceil(T/ds), C]: softmax(bias)-weighted sum of each group of ds frames.

    The last group is completed by repeating the tensor's last frame (as the reference does).
    """

    def __init__(self, downsample: int, *, dtype=jnp.float32, param_dtype=jnp.float32):
        del dtype  # a weighted sum on the float32 residual stream
        self.bias = nnx.Param(jnp.zeros((downsample,), param_dtype))
        self.downsample = downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        ds = self.downsample
        d = -(-t // ds)
        pad = d * ds - t
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:, -1:], (b, pad, c))], axis=1)
        weights = jax.nn.softmax(self.bias[...].astype(jnp.float32))
        return jnp.einsum("bdsc,s->bdc", x.reshape(b, d, ds, c), weights)


class DownsampledZipformer2Encoder(nnx.Module):
    """Downsample by ds, run a Zipformer2Encoder, upsample by repetition, bypass-combine with the input."""

    def __init__(self, encoder: Zipformer2Encoder, dim: int, downsample: int, *, dtype, param_dtype,
                 regularisers: bool = False):
        self.regularisers = regularisers
        self.downsample_factor = downsample
        self.downsample = SimpleDownsample(downsample, dtype=dtype, param_dtype=param_dtype)
        self.encoder = encoder
        self.out_combiner = BypassModule(dim, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, valid, *, feature_mask=None, rngs: nnx.Rngs | None = None):
        """x [B, T, C]; valid [B, ceil(T/ds)] bool (the input mask taken every ds frames) -> [B, T, C]."""
        y = self.encoder(self.downsample(x), valid, feature_mask=feature_mask, rngs=rngs)
        reg = Draws(rngs, size=1) if self.regularisers and rngs is not None else None
        return self.out_combiner(x, simple_upsample(y, self.downsample_factor, x.shape[1]), reg)


class Zipformer2(nnx.Module):
    """Stacks at per-stack frame rates; output = channel-wise merge of stack outputs, downsampled by 2."""

    def __init__(self, config: ZipformerConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.config = config
        stacks = []
        for i in range(config.num_stacks):
            stack = Zipformer2Encoder(
                config.num_encoder_layers[i],
                config.pos_dim,
                embed_dim=config.encoder_dim[i],
                num_heads=config.num_heads[i],
                query_head_dim=config.query_head_dim[i],
                pos_head_dim=config.pos_head_dim[i],
                value_head_dim=config.value_head_dim[i],
                feedforward_dim=config.feedforward_dim[i],
                cnn_module_kernel=config.cnn_module_kernel[i],
                dropout=config.dropout,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
                remat=remat,
                regularisers=config.regularisers,
                skip_rate=layer_skip_rate(config.downsampling_factor[i]),
            )
            if config.downsampling_factor[i] != 1:
                stack = DownsampledZipformer2Encoder(
                    stack, config.encoder_dim[i], config.downsampling_factor[i], dtype=dtype, param_dtype=param_dtype,
                    regularisers=config.regularisers,
                )
            stacks.append(stack)
        self.encoders = nnx.List(stacks)
        if config.output_downsampling_factor >= 2:
            self.downsample_output = SimpleDownsample(
                config.output_downsampling_factor, dtype=dtype, param_dtype=param_dtype
            )
        else:
            self.downsample_output = None

    def _feature_masks(self, batch_size: int, rngs: nnx.Rngs) -> list[jax.Array]:
        """Per-stack [B, 1, C] 0/1 masks: channels above encoder_unmasked_dim dropped for whole sequences.

        The upper half of the masked range is dropped on a superset of the sequences that lose the lower
        half, so the masks agree across stacks.
        """
        k1, k2 = jax.random.split(rngs["dropout"]())
        keep1 = jax.random.uniform(k1, (batch_size, 1)) > _FEATURE_MASK_PROB
        keep2 = keep1 & (jax.random.uniform(k2, (batch_size, 1)) > _FEATURE_MASK_PROB)
        masks = []
        for c, u1 in zip(self.config.encoder_dim, self.config.encoder_unmasked_dim):
            u2 = u1 + (c - u1) // 2
            ch = jnp.arange(c)[None, :]
            keep = (ch < u1) | ((ch < u2) & keep1) | ((ch >= u2) & keep2)
            masks.append(keep[:, None, :].astype(jnp.float32))
        return masks

    def __call__(self, x: jax.Array, x_lens: jax.Array, *, rngs: nnx.Rngs | None = None):
        """x [B, T, encoder_dim[0]], x_lens [B] -> (y [B, ceil(T/2), max(encoder_dim)], y_lens [B]).

        Values of y past y_lens are not zeroed here. `rngs` (training) drives dropout and feature masks.
        """
        cfg = self.config
        valid = length_mask(x_lens, x.shape[1])
        masks = [None] * cfg.num_stacks if rngs is None else self._feature_masks(x.shape[0], rngs)
        outputs = []
        for module, dim, ds, mask in zip(self.encoders, cfg.encoder_dim, cfg.downsampling_factor, masks):
            x = convert_num_channels(x, dim)
            x = module(x, valid[:, ::ds], feature_mask=mask, rngs=rngs)
            outputs.append(x)
        x = _full_dim_output(outputs, cfg.encoder_dim)
        if self.downsample_output is not None:
            x = self.downsample_output(x)
            x_lens = (x_lens + 1) // 2
        return x, x_lens


# ----------------------------------------------------------------------------------------------------------
# Public entry point


def _training_rngs(deterministic: bool, rngs: nnx.Rngs | None) -> nnx.Rngs | None:
    """The rngs to use inside the tower: None in eval mode."""
    if deterministic:
        return None
    if rngs is None:
        raise ValueError("deterministic=False needs rngs for dropout, e.g. rngs=nnx.Rngs(dropout=key)")
    return rngs


class SpeechEncoder(nnx.Module):
    """CLSP speech tower: Conv2dSubsampling (`encoder_embed`) + Zipformer2 (`encoder`).

    Args:
      cfg: the "speech" config dict with icefall argument names (feature_dim, downsampling_factor,
        num_encoder_layers, encoder_dim, encoder_unmasked_dim, query_head_dim, pos_head_dim, value_head_dim,
        pos_dim, num_heads, feedforward_dim, cnn_module_kernel, output_downsampling_factor; optional dropout,
        default 0.1, subsampling_channels, default (8, 32, 128), and regularisers, default False: icefall's
        training regularisers, see the module doc). One-element lists apply to every stack; other keys are
        ignored.
      rngs: parameter initialisation only (training randomness is passed to `__call__`).
      dtype: compute dtype; param_dtype: parameter dtype.
      remat: rematerialisation of each Zipformer2 layer in the backward pass (`clsp_jax.models.remat`).
    """

    def __init__(self, cfg: Mapping, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.config = ZipformerConfig.from_mapping(cfg)
        self.encoder_embed = Conv2dSubsampling(
            self.config.feature_dim,
            self.config.encoder_dim[0],
            dropout=self.config.dropout,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            layer1_channels=self.config.subsampling_channels[0],
            layer2_channels=self.config.subsampling_channels[1],
            layer3_channels=self.config.subsampling_channels[2],
            regularisers=self.config.regularisers,
        )
        self.encoder = Zipformer2(self.config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)

    @property
    def output_dim(self) -> int:
        return max(self.config.encoder_dim)

    def embed(self, features, feature_lens, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        """features [B, T, feature_dim], feature_lens [B] -> (x [B, (T-7)//2, encoder_dim[0]], lens [B])."""
        rngs = _training_rngs(deterministic, rngs)
        features, feature_lens = jnp.asarray(features), jnp.asarray(feature_lens)
        if features.ndim != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features must be [B, T, {self.config.feature_dim}], got {features.shape}")
        if features.shape[1] < 9:
            raise ValueError(f"features need at least 9 frames (one output frame), got {features.shape[1]}")
        if feature_lens.shape != features.shape[:1]:
            raise ValueError(f"feature_lens must be [{features.shape[0]}], got {feature_lens.shape}")
        return self.encoder_embed(features, feature_lens, rngs=rngs)

    def __call__(self, features, feature_lens, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        """features [B, T, F] float, feature_lens [B] int -> (frames [B, T', output_dim], frame_lens [B]).

        T' = ceil(((T-7)//2) / 2) with output_downsampling_factor 2 (~25 Hz); frames past frame_lens are 0
        and frames are float32. Training (`deterministic=False`) needs `rngs` with a "dropout" (or default)
        stream, e.g. `nnx.Rngs(dropout=key)`.
        """
        rngs = _training_rngs(deterministic, rngs)
        x, lens = self.embed(features, feature_lens, deterministic=rngs is None, rngs=rngs)
        x, lens = self.encoder(x, lens, rngs=rngs)
        return jnp.where(length_mask(lens, x.shape[1])[..., None], x, 0), lens


def speech_param_count(cfg: Mapping) -> int:
    """Number of parameters of SpeechEncoder(cfg), computed abstractly (no memory allocated)."""
    model = nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
