"""Per-layer rematerialisation (gradient checkpointing) of the towers' layer stacks.

A policy name says what the backward pass may reuse from the forward pass of each layer (one Zipformer2
layer, one RoBERTa/BERT layer); everything else is recomputed from the layer's input:

  "none"             keep every activation (fastest, most memory).
  "layer"            keep only the layer inputs; the backward pass reruns each layer's forward.
  "layer_save_dots"  also keep the outputs of matmuls without batch dimensions (the weight projections),
                     recompute the attention scores/weights (the [B, H, T, T] tensors that dominate long
                     clips) and the elementwise work.

Remat changes memory and FLOPs only: values and gradients are those of "none" (same ops, same dropout keys).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "layer": jax.checkpoint_policies.nothing_saveable,
    "layer_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat {name!r}: choose from {sorted(REMAT_POLICIES)}")
    return name


def remat_layer_call(call: Callable, name: str) -> Callable:
    """`call(layer, *args)` wrapped in `nnx.remat` with the policy `name` ("none": returned as is).

    `call` must take the layer module and every array (and `nnx.Rngs`) as arguments, not close over them:
    the checkpointed function sees its inputs only through its arguments.
    """
    if check_remat(name) == "none":
        return call
    return nnx.remat(call, policy=REMAT_POLICIES[name])
