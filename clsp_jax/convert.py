"""PyTorch state dicts <-> NNX parameters, and loading PyTorch checkpoints into a `CLSPNet`.

Our module trees mirror the PyTorch module trees (see `torch_name`), so one rule maps every parameter and
no per-model name tables exist. Supported sources: a mapping name -> array, a `.safetensors` file, or a torch
`.pt`/`.pth`/`.bin` file read with `weights_only=True` (never unpickling arbitrary objects).

Into a `CLSPNet` (`load_clsp`, `load_text_tower`, `load_speech_tower`):
- CLSP (icefall `spear_roberta` CLAP names, optionally under `model.` as in the Hugging Face release).
- Text tower alone: a plain Hugging Face RobertaModel / BertModel state dict (names optionally under
  `roberta.` / `bert.`).
- Speech tower alone: a SPEAR checkpoint (`encoder_embed.*`, `encoder.*`).

Each load is strict: every tensor consumed, every parameter filled, or a ValueError naming them. A network
with a logit bias (model config `logit_bias_init`) reads and writes it as the tensor `logit_bias` beside
`logit_scale`; one without has exactly the authors' names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsp_jax.models.clsp import TORCH_MOUNTS, CLSPNet

# The last path element of an NNX param -> the PyTorch parameter name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(path: tuple, mounts: Mapping[str, str] | None = None) -> str:
    """PyTorch state-dict name of the NNX param at `path`, e.g. ('a', 0, 'kernel') -> 'a.0.weight'.

    `mounts` renames a first path element whose submodule sits elsewhere in the PyTorch tree, e.g.
    {"speech": ""} maps ('speech', 'encoder', ...) to 'encoder....'.
    """
    *head, leaf = (str(p) for p in path)
    if mounts and head and head[0] in mounts:
        head = ([mounts[head[0]]] if mounts[head[0]] else []) + head[1:]
    return ".".join([*head, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_nnx_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of the NNX param at `path`.

    Linear weights are [out, in] in PyTorch and [in, out] here; conv weights are [out, in/groups, *k] in
    PyTorch and [*k, in/groups, out] here.
    """
    if str(path[-1]) != "kernel":
        return value
    if value.ndim == 2:
        return value.T
    return np.transpose(value, (*range(2, value.ndim), 1, 0))


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """Inverse of `to_nnx_layout`."""
    if str(path[-1]) != "kernel":
        return value
    if value.ndim == 2:
        return value.T
    n = value.ndim
    return np.transpose(value, (n - 1, n - 2, *range(n - 2)))


def read_state_dict(source) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict as float32/int numpy arrays.

    Args:
      source: a mapping name -> array-like (numpy, torch tensor, jax array), or a path to a `.safetensors`
        file or a torch checkpoint (`.pt`, `.pth`, `.bin`, `.ckpt`). Torch files are loaded with
        `weights_only=True`; a dict holding the weights under "model" or "state_dict" is unwrapped.
    """
    if isinstance(source, Mapping):
        return {k: _as_numpy(v) for k, v in source.items()}
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch: pip install -e '.[parity]', or convert it to .safetensors"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {k: _as_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, possibly bf16 which numpy lacks
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    value = np.asarray(value)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drops `prefix` from every name that has it (e.g. the `model.` of the Hugging Face release)."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_torch_state(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    prefix: str = "",
    ignore: tuple[str, ...] = (),
    mounts: Mapping[str, str] | None = None,
) -> None:
    """Fills every `nnx.Param` of `module` in place from `state_dict[prefix + torch_name(path)]`.

    Every tensor under `prefix` must be consumed and every parameter filled, with matching shapes;
    otherwise a ValueError lists the offending names. Names ending in any of `ignore` are dropped first
    (non-learned buffers such as Hugging Face's `position_ids`). `mounts`: see `torch_name`.
    """
    wanted = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and not k.endswith(ignore)}
    params = nnx.to_flat_state(nnx.state(module, nnx.Param))
    missing, mismatched, new = [], [], []
    for path, var in params:
        name = torch_name(path, mounts)
        if name not in wanted:
            missing.append(prefix + name)
            continue
        value = np.asarray(wanted.pop(name))
        expected = to_torch_layout(path, np.broadcast_to(np.zeros((), np.float32), var.shape)).shape
        if value.size == 1 and math.prod(expected) == 1:  # scalars saved as [1] by some writers
            value = value.reshape(expected)
        if value.shape != expected:
            mismatched.append(f"{prefix + name}: checkpoint {value.shape} vs model {expected}")
            continue
        value = to_nnx_layout(path, value)
        new.append((var, jnp.asarray(value, dtype=var.dtype)))
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the checkpoint: {', '.join(missing)}")
    if wanted:
        problems.append(
            f"{len(wanted)} unexpected tensor(s) in the checkpoint: {', '.join(prefix + k for k in sorted(wanted))}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    if problems:
        raise ValueError("cannot load PyTorch weights: " + " | ".join(problems))
    # nnx.state holds references to the module's own Variables: assigning fills the module in place.
    for var, value in new:
        var.set_value(value)


def torch_state_dict(module: nnx.Module, prefix: str = "", mounts: Mapping[str, str] | None = None
                     ) -> dict[str, np.ndarray]:
    """All `nnx.Param`s of `module` as a PyTorch-named, PyTorch-layout float32 state dict."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        # np.array (not ascontiguousarray, which turns scalars into [1]) for C-contiguous copies.
        out[prefix + torch_name(path, mounts)] = np.array(to_torch_layout(path, np.asarray(var[...], np.float32)),
                                                          order="C")
    return out


# ---------------------------------------------------------------------------------------------------------
# PyTorch checkpoints into a CLSPNet.

# Hugging Face buffers that are not parameters.
_HF_BUFFERS = ("position_ids", "token_type_ids")


def _clsp_state_dict(source, prefixes=("model.",)) -> dict[str, np.ndarray]:
    state_dict = read_state_dict(source)
    for prefix in prefixes:
        state_dict = strip_prefix(state_dict, prefix)
    return state_dict


def load_clsp(net: CLSPNet, source) -> None:
    """Fills all of `net` from an authors' CLSP checkpoint (mapping, .safetensors or .pt)."""
    load_torch_state(net, _clsp_state_dict(source), ignore=_HF_BUFFERS, mounts=TORCH_MOUNTS)


def load_text_tower(net: CLSPNet, source) -> None:
    """Fills `net.text_encoder` from a Hugging Face RoBERTa/BERT checkpoint."""
    state_dict = _clsp_state_dict(source, ("model.", "text_encoder.", "roberta.", "bert."))
    load_torch_state(net.text_encoder, state_dict, ignore=_HF_BUFFERS)


def load_speech_tower(net: CLSPNet, source) -> None:
    """Fills `net.speech` (Conv2dSubsampling + Zipformer2) from a SPEAR checkpoint."""
    load_torch_state(net.speech, _clsp_state_dict(source))
