"""Conv2dSubsampling layer by layer: the tower's convolutions against equivalent formulations, forward and
forward+backward, at the shapes the tower sees. Evidence for making the speech front end cheaper on CPU.

    python -m benchmarks.conv_variants --config configs/tiny.py [--batch-clips 4 --clip-seconds 5 --iters 3]
        [--json OUT]

Variants (each checked against the first one of its layer: outputs and gradients agree to 1e-4 relative):
  3x3 convs (conv0/4/7)  "lax" = XLA convolution (what nnx.Conv runs) | "im2col" = the 9 shifted windows
                          concatenated on channels, one matmul
  7x7 depthwise          "taps" = the model's sum of 49 shifted products, autodiff backward |
                          "taps_vjp" = same forward, hand-written backward (input gradient = taps of the
                          cotangent with the flipped kernel; kernel gradient = the 49 tap reductions done
                          together on 2 frames at a time in a scan, in cache) |
                          "lax" = grouped XLA convolution
  1x1 convs (pointwise)  "lax" = XLA convolution | "dot" = einsum over the channel axis (what the model
                          now runs, `pointwise_conv_general_dilated`)
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from clsp_jax import perf
from clsp_jax.features import num_frames
from clsp_jax.models.zipformer import Conv2dSubsampling, ZipformerConfig, depthwise_conv_general_dilated


# ----------------------------------------------------------------------------------- formulations


def conv_lax(x, w, b, strides, padding, groups=1):
    """Channels-last XLA convolution: x [B, T, F, Cin], w [kt, kf, Cin/groups, Cout] -> [B, T', F', Cout]."""
    y = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups)
    return y + b


def conv_im2col(x, w, b, strides, padding):
    """The same convolution as one matmul over the kt*kf shifted (strided) windows stacked on channels."""
    kt, kf, cin, cout = w.shape
    x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    st, sf = strides
    t_out = (x.shape[1] - kt) // st + 1
    f_out = (x.shape[2] - kf) // sf + 1
    windows = [x[:, i: i + st * (t_out - 1) + 1: st, j: j + sf * (f_out - 1) + 1: sf, :]
               for i in range(kt) for j in range(kf)]
    patches = jnp.concatenate(windows, axis=-1)  # [B, T', F', kt*kf*Cin], (i, j, c) order as w.reshape
    return jnp.einsum("btfk,ko->btfo", patches, w.reshape(kt * kf * cin, cout)) + b


def _taps(x, w, pad):
    """The model's depthwise 'same' correlation (sum of shifted products): x [B, T, F, C], w [kt, kf, C]."""
    return depthwise_conv_general_dilated(x, w[:, :, None, :], (1, 1), ((pad, pad), (pad, pad)), lhs_dilation=(1, 1),
                                          rhs_dilation=(1, 1), dimension_numbers=None,
                                          feature_group_count=x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_taps_vjp(x, w, pad):
    """_taps with a hand-written backward: no pad-of-slice chains in the autodiff transpose."""
    return _taps(x, w, pad)


def _taps_fwd(x, w, pad):
    return _taps(x, w, pad), (x, w)


def _taps_bwd(pad, res, g):
    x, w = res
    dx = _taps(g, w[::-1, ::-1], pad)  # 'same' correlation transposes to the flipped kernel
    return dx, _taps_kernel_grad(x, g, w.shape[:2], pad)


def _taps_kernel_grad(x, g, kernel: tuple[int, int], pad: int, chunk: int = 2):
    """dw[i, j, c] = sum_{b,t,f} xpad[b, t+i, f+j, c] g[b, t, f, c]: [kt, kf, C].

    As 49 separate reductions XLA:CPU streams x and g from memory 49 times (~3 GB/s here); a scan over
    `chunk` frames at a time does all taps on a chunk while it is in cache (2 frames: 3-5x faster than 41).
    """
    kt, kf = kernel
    b, t, f, c = g.shape
    steps = -(-t // chunk)
    gp = jnp.pad(g, [(0, 0), (0, steps * chunk - t), (0, 0), (0, 0)])
    xp = jnp.pad(x, [(0, 0), (pad, pad + steps * chunk - t), (pad, pad), (0, 0)])

    def body(acc, k):
        xs = jax.lax.dynamic_slice_in_dim(xp, k * chunk, chunk + kt - 1, axis=1)
        gs = jax.lax.dynamic_slice_in_dim(gp, k * chunk, chunk, axis=1)
        taps = jnp.stack([xs[:, i: i + chunk, j: j + f] for i in range(kt) for j in range(kf)], axis=3)
        return acc + jnp.sum(taps * gs[:, :, :, None, :], axis=(0, 1, 2)), None

    acc, _ = jax.lax.scan(body, jnp.zeros((kt * kf, c), g.dtype), jnp.arange(steps))
    return acc.reshape(kt, kf, c)


depthwise_taps_vjp.defvjp(_taps_fwd, _taps_bwd)


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
            "lax": lambda x, w, b, s=strides, p=padding: conv_lax(x, w, b, s, p),
            "im2col": lambda x, w, b, s=strides, p=padding: conv_im2col(x, w, b, s, p),
        }, [x, w, b], [1, 2] if key == "0" else [0, 1, 2]))
        x = normal(jax.eval_shape(conv, x).shape)
    dw = embed.convnext.depthwise_conv
    w, b = dw.kernel[...], dw.bias[...]
    cases.append((f"depthwise7x7 {tuple(x.shape)}", {
        "taps": lambda x, w, b: _taps(x, w[:, :, 0], 3) + b,
        "taps_vjp": lambda x, w, b: depthwise_taps_vjp(x, w[:, :, 0], 3) + b,
        "lax": lambda x, w, b: conv_lax(x, w, b, (1, 1), ((3, 3), (3, 3)), groups=x.shape[-1]),
    }, [x, w, b], [0, 1, 2]))
    for name, pw, inp in (("pointwise1", embed.convnext.pointwise_conv1, x),
                          ("pointwise2", embed.convnext.pointwise_conv2,
                           normal(x.shape[:-1] + (embed.convnext.pointwise_conv1.out_features,)))):
        w, b = pw.kernel[...], pw.bias[...]
        cases.append((f"{name} {tuple(inp.shape)}", {
            "lax": lambda x, w, b: conv_lax(x, w, b, (1, 1), ((0, 0), (0, 0))),
            "dot": lambda x, w, b: jnp.einsum("btfc,cd->btfd", x, w[0, 0]) + b,
        }, [inp, w, b], [0, 1, 2]))

    rows = []
    print(f"{'layer':40s} {'variant':9s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'max rel err':>12s}", flush=True)
    for layer, variants, inputs, grad_argnums in cases:
        reference = None
        for variant, fn in variants.items():
            t_fwd, t_fb, out, grads = time_variant(fn, inputs, grad_argnums, args.warmup, args.iters)
            if reference is None:
                reference, err = (out, grads), 0.0
            else:
                err = max(_close(a, r) for a, r in zip(jax.tree.leaves((out, grads)), jax.tree.leaves(reference)))
            rows.append({"layer": layer, "variant": variant, "fwd": t_fwd, "fwd_bwd": t_fb, "max_rel_err": err})
            print(f"{layer:40s} {variant:9s} {t_fwd['median_s']:8.3f} {t_fb['median_s']:10.3f} {err:12.2e}", flush=True)
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
