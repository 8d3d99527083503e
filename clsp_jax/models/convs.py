"""The Zipformer's convolutions in forms that XLA:CPU runs fast; each equals `jax.lax.conv_general_dilated`.

`nnx.Conv` calls `conv_general_dilated(lhs, rhs, window_strides, padding, ...)`; `conv_general_dilated` below
takes the same arguments (channels-last: lhs [B, *S, Cin], rhs [*K, Cin/groups, Cout]) and picks, for the
three kinds of convolution the speech tower has:

- 1x1 (the ConvNeXt pointwise convs): the matmul it is.
- depthwise (ConvNeXt's 7x7, the conv modules' 1-D kernels): a sum of shifted products with a hand-written
  backward. XLA's grouped convolution is slower on CPU, and jax 0.10's SPMD partitioner returns its kernel
  gradient multiplied by the replication factor when the batch is sharded over only some mesh axes; the
  autodiff transpose of the shifted products materialises one padded copy of the input per tap.
- dense (Conv2dSubsampling's 3x3 convs, strided or not): im2col, the kernel's windows stacked on channels and
  one matmul. A stride becomes a reshape (a dim of length s*n -> [n, s]), so every window is a plain slice
  and its transpose a pad: XLA:CPU's own backward of a strided convolution is several times slower.

Each has a hand-written VJP that saves only the convolution's input, as the convolution would: no stacked
windows or per-tap copies stay alive between the forward and backward passes.

The speed of each form against XLA's convolution is in BENCHMARKS.md §3;
tests/test_convs.py checks values and gradients against `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from clsp_jax.sharding import BATCH_AXES

# Input elements per step of the depthwise kernel gradient's scan (whole frames, at least one): measured on
# the 7x7 ConvNeXt conv, one frame per step ran fastest (fewer, larger steps were slower).
_KERNEL_GRAD_BLOCK_ELEMENTS = 1 << 13


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, out_sharding=None):
    """`lax.conv_general_dilated` for channels-last inputs without dilation: lhs [B, *S, Cin],
    rhs [*K, Cin/groups, Cout], padding "VALID" | "SAME" | ((lo, hi), ...) -> [B, *S', Cout] in lhs's dtype.

    Depthwise (groups = Cin = Cout), 1x1 and dense (groups = 1) convolutions; anything else raises.
    `dimension_numbers` are ignored: `nnx.Conv` always passes channels-last ones.
    """
    del dimension_numbers
    n = lhs.ndim - 2
    kernel = tuple(rhs.shape[:n])
    strides = tuple(window_strides)
    dilated = any(v != 1 for v in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if dilated or out_sharding is not None:
        raise ValueError(f"conv_general_dilated: dilation and out_sharding are not supported (lhs {lhs.shape}, "
                         f"rhs {rhs.shape})")
    pads = _explicit_padding(padding, lhs.shape[1:-1], kernel, strides)
    cin, cout = lhs.shape[-1], rhs.shape[-1]
    if feature_group_count == cin == cout and rhs.shape[-2] == 1 and feature_group_count > 1:
        if any(s != 1 for s in strides):
            raise ValueError(f"depthwise convolution with strides {strides} is not supported")
        return depthwise(lhs, rhs[..., 0, :], pads)
    if feature_group_count != 1:
        raise ValueError(f"grouped convolution ({feature_group_count} groups, lhs {lhs.shape}, rhs {rhs.shape}) "
                         f"is not supported")
    if kernel == (1,) * n and strides == (1,) * n and all(p == (0, 0) for p in pads):
        return jnp.einsum("...c,cd->...d", lhs, rhs.reshape(cin, cout), precision=precision)
    return dense(lhs, rhs, pads, strides)


def _explicit_padding(padding, spatial, kernel, strides) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding not in ("VALID", "SAME"):
            raise ValueError(f"padding {padding!r}: expected 'VALID', 'SAME' or ((lo, hi), ...)")
        return tuple(jax.lax.padtype_to_pads(spatial, kernel, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


# ------------------------------------------------------------------------------------------------ depthwise


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise(x, w, pads):
    """Depthwise correlation, stride 1: x [B, *S, C], w [*K, C], pads ((lo, hi), ...) per spatial dim ->
    [B, *S'] x C with S' = S + lo + hi - K + 1, accumulated in float32, returned in x's dtype."""
    return _taps(x, w, pads)


def _taps(x, w, pads):
    n = w.ndim - 1
    xp = jnp.pad(x.astype(jnp.float32), [(0, 0), *pads, (0, 0)])
    w = w.astype(jnp.float32)
    out_size = [xp.shape[1 + d] - w.shape[d] + 1 for d in range(n)]
    out = None
    for tap in np.ndindex(*w.shape[:n]):
        term = xp[(slice(None), *(slice(t, t + o) for t, o in zip(tap, out_size)))] * w[tap]
        out = term if out is None else out + term
    return out.astype(x.dtype)


def _depthwise_fwd(x, w, pads):
    return _taps(x, w, pads), (x, w)


def _depthwise_bwd(pads, res, g):
    x, w = res
    kernel = w.shape[:-1]
    # The input gradient is the correlation of g with the flipped kernel, padded so its size is x's.
    flipped = w[tuple(slice(None, None, -1) for _ in kernel)]
    back = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel, pads))
    dx = _taps(g, flipped, back).astype(x.dtype)
    return dx, _depthwise_kernel_grad(x, g, kernel, pads).astype(w.dtype)


def _depthwise_kernel_grad(x, g, kernel, pads):
    """dw[k, c] = sum over b and output positions s of xpad[b, s + k, c] g[b, s, c]: [*K, C] float32.

    A scan over blocks of the first spatial axis. Each step adds, for every tap, the block's products summed
    over frames and over the batch within each batch shard, into a [taps, shards, *other spatial, C]
    accumulator that stays in cache; the shards and the other spatial axes are summed once at the end.
    XLA:CPU runs reductions over all but the channel axis, or one reduction per tap over the whole input,
    several times slower. Summing over a sharded batch inside the loop would cost one all-reduce per step.
    """
    t = g.shape[1]
    shards = _batch_shards(g.shape[0])
    per_frame = math.prod(g.shape) // t // shards
    block = max(1, min(t, _KERNEL_GRAD_BLOCK_ELEMENTS // per_frame))
    steps = -(-t // block)
    extra = steps * block - t  # frames of zeros that fill the last block
    g = jnp.pad(g.astype(jnp.float32), [(0, 0), (0, extra)] + [(0, 0)] * (g.ndim - 2))
    (lo, hi), *other_pads = pads
    xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (lo, hi + extra), *other_pads, (0, 0)])
    # [B, ...] -> [shards, B / shards, ...]: each shard's rows stay on its devices.
    g = g.reshape(shards, -1, *g.shape[1:])
    xp = xp.reshape(shards, -1, *xp.shape[1:])
    rest = g.shape[3:-1]

    def body(acc, i):
        xs = jax.lax.dynamic_slice_in_dim(xp, i * block, block + kernel[0] - 1, axis=2)
        gs = jax.lax.dynamic_slice_in_dim(g, i * block, block, axis=2)
        sums = [jnp.sum(xs[(slice(None), slice(None), slice(tap[0], tap[0] + block),
                            *(slice(k, k + r) for k, r in zip(tap[1:], rest)))] * gs, axis=(1, 2))
                for tap in np.ndindex(*kernel)]
        return acc + jnp.stack(sums), None

    acc = jnp.zeros((math.prod(kernel), shards, *rest, g.shape[-1]), jnp.float32)
    acc, _ = jax.lax.scan(body, acc, jnp.arange(steps))
    return acc.sum(axis=tuple(range(1, 2 + len(rest)))).reshape(*kernel, g.shape[-1])


def _batch_shards(batch: int) -> int:
    """How many ways the batch is split over the devices of the mesh being traced under (1 without one, or
    when that does not divide `batch`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    shards = math.prod(size for name, size in mesh.shape.items() if name in BATCH_AXES)
    return shards if batch % shards == 0 else 1


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


# ---------------------------------------------------------------------------------------------------- dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x, w, pads, strides):
    """Dense convolution as im2col + one matmul: x [B, *S, Cin], w [*K, Cin, Cout] -> [B, *S', Cout],
    S' = (S + lo + hi - K) // stride + 1."""
    return _im2col_matmul(x, w, pads, strides)


def _windows(x, kernel, pads, strides):
    """[B, *S', prod(K) * Cin]: the kernel's windows in w.reshape(-1, Cout)'s order (taps, then channels).

    Each strided axis of length s*m is viewed as [m, s], so the window of tap k is the slice k // s .. of
    the m axis at phase k % s: plain slices, whose transposes are pads.
    """
    n = len(kernel)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(x.shape[1 + d] - kernel[d]) // strides[d] + 1 for d in range(n)]
    shape = [x.shape[0]]
    for d in range(n):
        blocks = out[d] + (kernel[d] - 1) // strides[d]
        size = blocks * strides[d]
        have = x.shape[1 + d]
        if size > have:  # never read by a window; only makes the reshape possible
            x = jnp.pad(x, [(0, 0)] * (1 + d) + [(0, size - have)] + [(0, 0)] * (n - d))
        elif size < have:
            x = jax.lax.slice_in_dim(x, 0, size, axis=1 + d)
        shape += [blocks, strides[d]]
    x = x.reshape(*shape, x.shape[-1])
    windows = []
    for tap in np.ndindex(*kernel):
        index = [slice(None)]
        for d, k in enumerate(tap):
            index += [slice(k // strides[d], k // strides[d] + out[d]), k % strides[d]]
        windows.append(x[tuple(index)])
    return jnp.concatenate(windows, axis=-1)


def _im2col_matmul(x, w, pads, strides):
    patches = _windows(x, w.shape[:-2], pads, strides)
    return jnp.einsum("...k,kd->...d", patches, w.reshape(-1, w.shape[-1])).astype(x.dtype)


def _dense_fwd(x, w, pads, strides):
    return _im2col_matmul(x, w, pads, strides), (x, w)


def _dense_bwd(pads, strides, res, g):
    x, w = res
    kernel = w.shape[:-2]
    patches, windows_vjp = jax.vjp(lambda x: _windows(x, kernel, pads, strides), x)
    w2 = w.reshape(-1, w.shape[-1])
    dw = jnp.einsum("...k,...d->kd", patches, g.astype(patches.dtype)).reshape(w.shape)
    (dx,) = windows_vjp(jnp.einsum("...d,kd->...k", g.astype(w2.dtype), w2).astype(patches.dtype))
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
