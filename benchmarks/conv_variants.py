"""Conv2dSubsampling layer by layer: the model's forms of its convolutions (`clsp_jax.models.convs`) against
XLA's convolution, forward and forward+backward, at the shapes the tower sees.

    python -m benchmarks.conv_variants --config configs/tiny.py [--batch-clips 4 --clip-seconds 5 --iters 3]
        [--json OUT]

Variants (each checked against the first one of its layer: outputs and gradients agree to 1e-4 relative):
  "lax"            XLA's convolution (`lax.conv_general_dilated`, what `nnx.Conv` runs by default; grouped for
                   the depthwise conv)
  "model"          `convs.conv_general_dilated`, what the model runs: im2col + one matmul for the 3x3 convs,
                   a matmul for the 1x1s, shifted products with a hand-written backward for the depthwise conv
  "taps_autodiff"  depthwise only: the same shifted products with JAX's autodiff backward
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from clsp_jax import perf
from clsp_jax.features import num_frames
from clsp_jax.models import convs
from clsp_jax.models.zipformer import Conv2dSubsampling, ZipformerConfig


def conv_lax(x, w, b, strides, padding, groups=1):
    """Channels-last XLA convolution: x [B, T, F, Cin], w [kt, kf, Cin/groups, Cout] -> [B, T', F', Cout]."""
    y = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups)
    return y + b


def conv_model(x, w, b, strides, padding, groups=1):
    """The same convolution as the model computes it."""
    return convs.conv_general_dilated(x, w, strides, padding, feature_group_count=groups) + b


# ----------------------------------------------------------------------------------------- timing


def time_variant(fn: Callable, args: Sequence[jax.Array], grad_argnums: Sequence[int], warmup: int, iters: int):
    """(fwd summary, fwd+bwd summary, output, grads) of fn(*args) with a ones cotangent."""
    fwd = jax.jit(fn)

    def fwd_bwd(*args):
        out, vjp = jax.vjp(lambda *d: fn(*[d[grad_argnums.index(i)] if i in grad_argnums else a
                                           for i, a in enumerate(args)]),
                           *[args[i] for i in grad_argnums])
        return out, vjp(jnp.ones_like(out))

    fwd_bwd = jax.jit(fwd_bwd)
    t_fwd = common.summary(perf.time_calls(lambda: fwd(*args), warmup, iters))
    t_fb = common.summary(perf.time_calls(lambda: fwd_bwd(*args), warmup, iters))
    out, grads = fwd_bwd(*args)
    return t_fwd, t_fb, out, grads


def _close(a, b) -> float:
    """max |a - b| / max |b| (relative to the reference's scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run(args, config) -> dict:
    speech = ZipformerConfig.from_mapping(config.model.speech.to_dict())
    embed = Conv2dSubsampling(speech.feature_dim, speech.encoder_dim[0], rngs=nnx.Rngs(0))
    frames = num_frames(round(args.clip_seconds * config.data.sample_rate))
    rng = np.random.default_rng(0)
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = normal((args.batch_clips, frames, speech.feature_dim, 1))
    print(f"machine: {common.machine()}")
    print(f"Conv2dSubsampling of {args.batch_clips} clips x {args.clip_seconds} s ({frames} frames)", flush=True)

    cases = []  # (layer, {variant: fn}, args, grad_argnums)
    for key, strides, padding in (("0", (1, 1), ((0, 0), (1, 1))), ("4", (2, 2), ((0, 0), (0, 0))),
                                  ("7", (1, 2), ((0, 0), (0, 0)))):
        conv = embed.conv[key]
        w, b = conv.kernel[...], conv.bias[...]
        cases.append((f"conv{key} {tuple(x.shape)}", {
            variant: lambda x, w, b, f=f, s=strides, p=padding: f(x, w, b, s, p)
            for variant, f in (("lax", conv_lax), ("model", conv_model))
        }, [x, w, b], [1, 2] if key == "0" else [0, 1, 2]))
        x = normal(jax.eval_shape(conv, x).shape)
    dw = embed.convnext.depthwise_conv
    w, b = dw.kernel[...], dw.bias[...]
    same = ((3, 3), (3, 3))
    cases.append((f"depthwise7x7 {tuple(x.shape)}", {
        "lax": lambda x, w, b: conv_lax(x, w, b, (1, 1), same, groups=x.shape[-1]),
        "model": lambda x, w, b: conv_model(x, w, b, (1, 1), same, groups=x.shape[-1]),
        "taps_autodiff": lambda x, w, b: convs._taps(x, w[:, :, 0], same) + b,
    }, [x, w, b], [0, 1, 2]))
    for name, pw, inp in (("pointwise1", embed.convnext.pointwise_conv1, x),
                          ("pointwise2", embed.convnext.pointwise_conv2,
                           normal(x.shape[:-1] + (embed.convnext.pointwise_conv1.out_features,)))):
        w, b = pw.kernel[...], pw.bias[...]
        cases.append((f"{name} {tuple(inp.shape)}", {
            variant: lambda x, w, b, f=f: f(x, w, b, (1, 1), ((0, 0), (0, 0)))
            for variant, f in (("lax", conv_lax), ("model", conv_model))
        }, [inp, w, b], [0, 1, 2]))

    rows = []
    print(f"{'layer':40s} {'variant':13s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'max rel err':>12s}", flush=True)
    for layer, variants, inputs, grad_argnums in cases:
        reference = None
        for variant, fn in variants.items():
            t_fwd, t_fb, out, grads = time_variant(fn, inputs, grad_argnums, args.warmup, args.iters)
            if reference is None:
                reference, err = (out, grads), 0.0
            else:
                err = max(_close(a, r) for a, r in zip(jax.tree.leaves((out, grads)), jax.tree.leaves(reference)))
            rows.append({"layer": layer, "variant": variant, "fwd": t_fwd, "fwd_bwd": t_fb, "max_rel_err": err})
            print(f"{layer:40s} {variant:13s} {t_fwd['median_s']:8.3f} {t_fb['median_s']:10.3f} {err:12.2e}", flush=True)
            if err > 1e-4:
                raise AssertionError(f"{layer} {variant} disagrees with {next(iter(variants))}: {err:.2e}")
    return {"benchmark": "conv_variants", "machine": common.machine(), "batch_clips": args.batch_clips,
            "clip_seconds": args.clip_seconds, "rows": rows}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-clips", type=int, default=4)
    p.add_argument("--clip-seconds", type=float, default=5.0)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    args, rest = p.parse_known_args(argv)
    config = common.load_config(rest)
    common.write_json(args.json, run(args, config))


if __name__ == "__main__":
    main()
