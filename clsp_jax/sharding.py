"""Device mesh, logical axis rules, parameter shardings, the jitted sharded step and global batches.

The mesh has axes (data, fsdp, tensor). The batch is split over (data, fsdp); parameters are sharded over
fsdp (ZeRO-3 style: each weight's "embed" dimension) and tensor (the "mlp"/"heads"/"vocab" dimension).
Which dimension of a weight is which logical axis follows from its path, by `LOGICAL_RULES` below. The
rules match the end of a path, so optimizer moments ("opt_state/.../mu/<param path>") and the EMA
("ema/<param path>") are sharded like their parameters: `param_shardings` takes the whole train state.

Typical use (see `clsp_jax.train.trainer`; the train state itself is `clsp_jax.train.state`):

    state, shardings = init_sharded_state(make_net, tx, mesh)
    step = JittedTrainStep(make_train_step(...), shardings, mesh)
    state, metrics = step(state, global_batch(host_batch, mesh))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. A dimension whose size the mesh axis does not divide stays replicated.
LOGICAL_TO_MESH = {"embed": "fsdp", "mlp": "tensor", "vocab": "tensor"}

# (path regex, logical axes of the NNX-layout array), first match wins; paths are "/"-joined NNX paths.
# Linear kernels are [in, out]: projections into a wider space are ("embed", "mlp"), projections back
# ("mlp", "embed"). Convolution kernels are [*k, in/groups, out]. The 512-d heads and the pooler (< 1M
# elements each) stay replicated: their activations are [B, 512], so sharding their weights would make XLA
# reshard activations instead of gathering weights ("involuntary full rematerialization").
LOGICAL_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embeddings/word_embeddings/embedding$", ("vocab", "embed")),
    (r"embeddings/\w+_embeddings/embedding$", (None, "embed")),
    (r"(in_proj|query|key|value|intermediate/dense|linear_pos)/kernel$", ("embed", "mlp")),
    (r"(out_proj|output/dense)/kernel$", ("mlp", "embed")),
    (r"(in_proj|query|key|value|intermediate/dense)/bias$", ("mlp",)),
    (r"encoder_embed/out/kernel$", (None, "embed")),
    (r"depthwise_conv/kernel$", (None, None, "embed")),
)


def parse_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 meaning "the remaining devices"."""
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(f"mesh shape {shape} does not divide the {num_devices} devices")
    shape = [num_devices // known if s == -1 else s for s in shape]
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} uses {math.prod(shape)} devices, but {num_devices} are present")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (Explicit axes reject our sharded contractions)."""
    devices = jax.devices() if devices is None else devices
    shape = parse_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_axes(path: str, ndim: int) -> tuple:
    for pattern, axes in LOGICAL_RULES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def param_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of one parameter; logical axes whose mesh axis does not divide the dim stay replicated."""
    spec = []
    for dim, axis in zip(shape, logical_axes(path, len(shape))):
        mesh_axis = LOGICAL_TO_MESH.get(axis)
        ok = mesh_axis is not None and mesh.shape[mesh_axis] > 1 and dim % mesh.shape[mesh_axis] == 0
        spec.append(mesh_axis if ok else None)
    return P(*spec)


def path_str(path) -> str:
    """A jax key path as "a/0/b" (the trailing `.value` of an nnx.Variable leaf dropped)."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_shardings(params, mesh: Mesh):
    """NamedSharding pytree for a pytree of arrays / ShapeDtypeStructs: parameters (nested dict or
    `nnx.state(model)`), or a whole train state (optimizer moments and EMA follow their parameter's rule;
    scalars and unmatched arrays are replicated)."""
    def one(path, x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(path_str(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def replicated_report(params, shardings, top: int = 5) -> list[tuple[str, int]]:
    """The `top` largest fully replicated arrays as (path, number of elements), largest first."""
    rows = []

    def visit(path, x, sharding):
        if all(s is None for s in sharding.spec):
            rows.append((path_str(path), int(np.prod(x.shape))))

    jax.tree_util.tree_map_with_path(visit, params, shardings)
    return sorted(rows, key=lambda r: -r[1])[:top]


def check_no_large_replicated(params, shardings, mesh: Mesh, max_elements: int = 1 << 20) -> None:
    """Raises if a weight over `max_elements` is replicated while the mesh could shard it."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return
    big = [(p, n) for p, n in replicated_report(params, shardings, top=1 << 30) if n > max_elements]
    if big:
        raise ValueError(f"large weights left replicated on mesh {dict(mesh.shape)}: {big[:5]}")


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dimension over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over (data, fsdp) (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in host_batch.items()}


def place(tree, shardings):
    """Arrays identical on every process (e.g. an eager init or a loaded checkpoint) -> global arrays in
    `shardings`. Each process copies only the shards of its own devices (multi-host safe)."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


class JittedTrainStep:
    """A `clsp_jax.train.step.TrainStep` jitted over a mesh as two programs, `gradients` then `update`:
    `step(state, batch) -> (state, metrics)`.

    The state enters and leaves in `shardings`; `update` donates it (its buffers are reused for the new
    state; the caller's old state is invalid afterwards). Every batch array is split on its leading (clip)
    axis over (data, fsdp); the gradients come out sharded like the parameters, metrics replicated.

    Two programs rather than one: XLA compiles the optimizer's per-tensor update on its own, so no single
    compilation holds the forward, backward and update at once. On a CPU that compilation is the run's
    peak host memory (BENCHMARKS.md §9); the step's own buffers are the same either way (the gradients
    are materialised whole in both).
    """

    def __init__(self, step, shardings, mesh: Mesh):
        replicated = NamedSharding(mesh, P())
        self.gradients = jax.jit(step.gradients, in_shardings=(shardings, batch_sharding(mesh)),
                                 out_shardings=(shardings["params"], replicated))
        self.update = jax.jit(step.update, in_shardings=(shardings, shardings["params"], replicated),
                              out_shardings=(shardings, replicated), donate_argnums=0)

    def __call__(self, state, batch):
        grads, metrics = self.gradients(state, batch)
        return self.update(state, grads, metrics)

    def compile(self, state, batch) -> tuple:
        """(gradients, update): the two programs compiled for this state and batch (arrays or
        ShapeDtypeStructs); a jitted call with the same shapes then finds them cached."""
        gradients = self.gradients.lower(state, batch).compile()
        grads, metrics = jax.eval_shape(self.gradients, state, batch)
        return gradients, self.update.lower(state, grads, metrics).compile()
