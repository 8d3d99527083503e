"""Analytic FLOP count of one CLSP train step: the matmuls and convolutions of both towers, the heads and
the contrastive logits (2 FLOPs per multiply-add). Elementwise work (activations, norms, softmax, the
optimizer update) and the FFT of the fbank are left out, so XLA's `cost_analysis()["flops"]`, which counts
every elementwise op too, comes out somewhat higher.

Backward, layer by layer along each tower (its heads last): a weight gradient (= forward FLOPs) if the
layer's parameters train, plus an input gradient (= forward FLOPs) if any layer before it in the tower
trains. So the first convolution gets no input gradient (its input is the fbank), and frozen layers
(`optim.frozen` regexes; the step applies `stop_gradient`) at the start of a tower get no backward at all.
`remat` adds one more forward pass of every rematerialised layer stack that has a backward pass
("recompute"); model FLOPs (the MFU convention) exclude it.

With `text_states` (the trainer's `train.cache_text_states`) the step gets the frozen text encoder's cached
last-layer [CLS] states instead of tokens: its embeddings and layers do not run in the step (a zero
"text.layers (cached)" row), and the text side starts at the pooler, with no input gradient. Building the
cache runs the encoder forward once per distinct caption before training: `text_cache_per_caption`, not
in the totals.

    count = step_flops(config.model, frozen, batch=20, samples=80000, captions=2, text_length=112)
    count.total_model, count.rows  # FLOPs per step; per-component (name, fwd, bwd, recompute)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from clsp_jax.features import num_frames
from clsp_jax.models.clsp import model_config
from clsp_jax.models.text import text_config
from clsp_jax.models.zipformer import ZipformerConfig

FFT_SIZE, NUM_MEL_BINS = 512, 128
# Parameter paths (as the train state names them) that the `frozen` regexes are tested against.
EMBED_PATHS = {
    "conv0": "speech/encoder_embed/conv/0/kernel",
    "conv4": "speech/encoder_embed/conv/4/kernel",
    "conv7": "speech/encoder_embed/conv/7/kernel",
    "convnext.depthwise": "speech/encoder_embed/convnext/depthwise_conv/kernel",
    "convnext.pointwise1": "speech/encoder_embed/convnext/pointwise_conv1/kernel",
    "convnext.pointwise2": "speech/encoder_embed/convnext/pointwise_conv2/kernel",
    "out": "speech/encoder_embed/out/kernel",
}
ZIPFORMER_PATH = "speech/encoder/encoders/0/layers/0/feed_forward1/in_proj/kernel"
TEXT_EMBED_PATH = "text_encoder/embeddings/word_embeddings/embedding"
TEXT_LAYER_PATH = "text_encoder/encoder/layer/0/attention/self/query/kernel"
TEXT_POOLER_PATH = "text_encoder/pooler/dense/kernel"
AUDIO_HEAD_PATH, TEXT_HEAD_PATH = "audio_projection/0/kernel", "text_projection/0/kernel"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    fwd: float
    bwd: float
    recompute: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepFlops:
    rows: tuple[Row, ...]
    # Forward FLOPs per distinct caption of building the text-state cache (once, before training; not in
    # the totals), at the step's text length (the cache pads each caption to at most that); 0 without it.
    text_cache_per_caption: float = 0.0

    @property
    def total_model(self) -> float:
        """fwd + bwd FLOPs per step, without remat recompute (what MFU counts)."""
        return sum(r.fwd + r.bwd for r in self.rows)

    @property
    def total_executed(self) -> float:
        """fwd + bwd + remat recompute FLOPs per step (what the hardware runs)."""
        return self.total_model + sum(r.recompute for r in self.rows)

    def component(self, prefix: str) -> tuple[float, float]:
        """(fwd, fwd + bwd) summed over rows whose name starts with `prefix`."""
        rows = [r for r in self.rows if r.name.startswith(prefix)]
        return sum(r.fwd for r in rows), sum(r.fwd + r.bwd for r in rows)


def _mm(m: float, k: float, n: float) -> float:
    """FLOPs of an [m, k] x [k, n] matmul."""
    return 2.0 * m * k * n


def fbank_flops(batch: int, samples: int) -> float:
    """The mel filterbank matmul (power spectrum [frames, 257] x banks [257, 128]); the FFT is left out."""
    return _mm(batch * num_frames(samples), FFT_SIZE // 2 + 1, NUM_MEL_BINS)


def conv2d_subsampling_flops(batch: int, frames: int, feature_dim: int, out_dim: int,
                             channels: Sequence[int] = (8, 32, 128), hidden_ratio: int = 3) -> dict[str, float]:
    """Forward FLOPs per sub-layer of Conv2dSubsampling on fbank [batch, frames, feature_dim]."""
    c1, c2, c3 = channels
    t0, f0 = frames - 2, feature_dim  # 3x3, time unpadded, freq padded 1
    t1, f1 = (t0 - 3) // 2 + 1, (f0 - 3) // 2 + 1  # 3x3 stride 2, valid
    t2, f2 = t1 - 2, (f1 - 3) // 2 + 1  # 3x3 stride (1, 2), valid
    pixels = batch * t2 * f2
    return {
        "conv0": _mm(batch * t0 * f0, 9 * 1, c1),
        "conv4": _mm(batch * t1 * f1, 9 * c1, c2),
        "conv7": _mm(pixels, 9 * c2, c3),
        "convnext.depthwise": 2.0 * pixels * c3 * 49,
        "convnext.pointwise1": _mm(pixels, c3, c3 * hidden_ratio),
        "convnext.pointwise2": _mm(pixels, c3 * hidden_ratio, c3),
        "out": _mm(batch * t2, f2 * c3, out_dim),
    }


def zipformer_layer_flops(batch: int, t: int, c: int, heads: int, dq: int, dp: int, dv: int, ff: int,
                          kernel: int, pos_dim: int) -> float:
    """Forward FLOPs of one Zipformer2EncoderLayer on [batch, t, c]."""
    bt = batch * t
    attn_weights = (_mm(bt, c, (2 * dq + dp) * heads) + batch * heads * _mm(t, dq, t)
                    + batch * heads * _mm(t, dp, 2 * t - 1) + _mm(2 * t - 1, pos_dim, heads * dp))
    feed_forward = sum(2 * _mm(bt, c, hidden) for hidden in (ff * 3 // 4, ff, ff * 5 // 4))
    h3 = 3 * c // 4
    nonlin = _mm(bt, c, 3 * h3) + batch * _mm(t, t, h3) + _mm(bt, h3, c)
    self_attn = _mm(bt, c, heads * dv) + batch * heads * _mm(t, t, dv) + _mm(bt, heads * dv, c)
    conv = _mm(bt, c, 2 * c) + 2.0 * bt * c * kernel + _mm(bt, c, c)
    return attn_weights + feed_forward + nonlin + 2 * self_attn + 2 * conv


def zipformer_flops(cfg: ZipformerConfig, batch: int, frames: int) -> float:
    """Forward FLOPs of Zipformer2 on [batch, frames, encoder_dim[0]] (frames at ~50 Hz)."""
    total = 0.0
    for i in range(cfg.num_stacks):
        t = -(-frames // cfg.downsampling_factor[i])
        layer = zipformer_layer_flops(batch, t, cfg.encoder_dim[i], cfg.num_heads[i], cfg.query_head_dim[i],
                                      cfg.pos_head_dim[i], cfg.value_head_dim[i], cfg.feedforward_dim[i],
                                      cfg.cnn_module_kernel[i], cfg.pos_dim)
        total += cfg.num_encoder_layers[i] * layer
    return total


def text_layer_flops(cfg: Mapping, sequences: int, length: int) -> float:
    """Forward FLOPs of one BERT/RoBERTa layer on [sequences, length] tokens."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    tokens = sequences * length
    return _mm(tokens, h, 4 * h) + 2 * sequences * _mm(length, h, length) + 2 * _mm(tokens, h, i)


def _head_flops(din: int, joint: int, rows: int) -> float:
    """projection (din -> joint -> joint) + transform (joint -> joint -> joint) on `rows` vectors."""
    return _mm(rows, din, joint) + 3 * _mm(rows, joint, joint)


def is_frozen(frozen: Sequence[str], path: str) -> bool:
    return any(re.search(p, path) for p in frozen)


def step_flops(model: Mapping, frozen: Sequence[str], *, batch: int, samples: int, captions: int,
               text_length: int, text_states: bool = False, remat: str | None = None) -> StepFlops:
    """FLOPs of one train step on `batch` clips of `samples` samples with `captions` captions each.

    Args:
      model: the config's `model` section (speech, text, joint_dim, remat).
      frozen: `optim.frozen` regexes (parameter paths).
      text_states: the step gets cached [CLS] states [B, C, hidden_size] instead of tokens (see the module doc).
      remat: overrides model["remat"] ("none" | "layer" | "layer_save_dots"); a remat'd layer with a
        backward pass is counted as forward once more under "recompute" (upper bound for layer_save_dots).
    """
    model = model_config(model)
    speech, text = ZipformerConfig.from_mapping(model["speech"]), text_config(model["text"])
    joint = model["joint_dim"]
    remat = model["remat"] if remat is None else remat
    recompute = 0.0 if remat == "none" else 1.0
    frames = num_frames(samples)
    enc_frames = (frames - 7) // 2

    trains = lambda path: not is_frozen(frozen, path)

    def chain(layers):
        """Rows of one tower's (name, fwd FLOPs, param path, is a layer stack) in order, backward as in the
        module doc. Inside a trainable stack every layer but the first needs its input gradient: counted as
        all of them (the first layer's share, 1/num_layers, is ignored). Only stacks are rematerialised."""
        out, upstream = [], False
        for name, fwd, path, stack in layers:
            weight = trains(path)
            bwd = fwd * weight + fwd * (upstream or (stack and weight))
            out.append(Row(name, fwd, bwd, recompute * fwd * stack * (bwd > 0)))
            upstream = upstream or weight
        return out

    embed = conv2d_subsampling_flops(batch, frames, speech.feature_dim, speech.encoder_dim[0])
    rows = [Row("fbank", fbank_flops(batch, samples), 0.0)]
    rows += chain([(f"encoder_embed.{n}", f, EMBED_PATHS[n], False) for n, f in embed.items()]
                  + [("zipformer", zipformer_flops(speech, batch, enc_frames), ZIPFORMER_PATH, True),
                     ("audio_heads", _head_flops(max(speech.encoder_dim), joint, batch), AUDIO_HEAD_PATH, False)])

    sequences, hidden = batch * captions, text["hidden_size"]
    layers_per_caption = text["num_hidden_layers"] * text_layer_flops(text, 1, text_length)
    top = [("text.pooler", _mm(sequences, hidden, hidden), TEXT_POOLER_PATH, False),
           ("text.heads", _head_flops(hidden, joint, sequences), TEXT_HEAD_PATH, False)]
    if text_states:
        rows += [Row("text.layers (cached)", 0.0, 0.0)] + chain(top)
    else:
        rows += chain([("text.embeddings", 0.0, TEXT_EMBED_PATH, False),
                       ("text.layers", sequences * layers_per_caption, TEXT_LAYER_PATH, True)] + top)[1:]

    logits = 2 * _mm(batch, joint, captions * batch)  # speech->text and text->speech
    rows.append(Row("loss", logits, 2 * logits))
    return StepFlops(tuple(rows), layers_per_caption if text_states else 0.0)


def describe(count: StepFlops) -> str:
    """A text table of the rows in GFLOP."""
    lines = [f"{'component':34s} {'fwd GF':>10s} {'bwd GF':>10s} {'recomp GF':>10s}"]
    for r in count.rows:
        lines.append(f"{r.name:34s} {r.fwd / 1e9:10.2f} {r.bwd / 1e9:10.2f} {r.recompute / 1e9:10.2f}")
    lines.append(f"{'total (model)':34s} {count.total_model / 1e9:10.2f}   executed {count.total_executed / 1e9:.2f}")
    if count.text_cache_per_caption:
        lines.append(f"text states cached: building the cache, once before training, costs "
                     f"{count.text_cache_per_caption / 1e9:.3f} GF forward per distinct caption (not in the totals)")
    return "\n".join(lines)


if __name__ == "__main__":  # quick look: python -m benchmarks.flops
    from configs import tiny

    cfg = tiny.get_config()
    print(describe(step_flops(cfg.model.to_dict(), list(cfg.optim.frozen), batch=20, samples=80000, captions=2,
                              text_length=112, text_states=cfg.train.cache_text_states)))
