"""Loading PyTorch checkpoints into a `CLSPNet`: the whole CLSP, or one tower.

- CLSP (icefall `spear_roberta` CLAP names, optionally under `model.` as in the Hugging Face release).
- Text tower alone: a plain Hugging Face RobertaModel / BertModel state dict (names optionally under
  `roberta.` / `bert.`).
- Speech tower alone: a SPEAR checkpoint (`encoder_embed.*`, `encoder.*`).

Each load is strict: every tensor consumed, every parameter filled, or a ValueError naming them.
"""

from __future__ import annotations

from clsp_jax import convert
from clsp_jax.models.clsp import TORCH_MOUNTS, CLSPNet

# Hugging Face buffers that are not parameters.
_HF_BUFFERS = ("position_ids", "token_type_ids")


def _state_dict(source, prefixes=("model.",)):
    state_dict = convert.read_state_dict(source)
    for prefix in prefixes:
        state_dict = convert.strip_prefix(state_dict, prefix)
    return state_dict


def load_clsp(net: CLSPNet, source) -> None:
    """Fills all of `net` from an authors' CLSP checkpoint (mapping, .safetensors or .pt)."""
    convert.load_torch_state(net, _state_dict(source), ignore=_HF_BUFFERS, mounts=TORCH_MOUNTS)


def load_text_tower(net: CLSPNet, source) -> None:
    """Fills `net.text_encoder` from a Hugging Face RoBERTa/BERT checkpoint."""
    state_dict = _state_dict(source, ("model.", "text_encoder.", "roberta.", "bert."))
    convert.load_torch_state(net.text_encoder, state_dict, ignore=_HF_BUFFERS)


def load_speech_tower(net: CLSPNet, source) -> None:
    """Fills `net.speech` (Conv2dSubsampling + Zipformer2) from a SPEAR checkpoint."""
    convert.load_torch_state(net.speech, _state_dict(source))
