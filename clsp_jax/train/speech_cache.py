"""Cached pooled features of a frozen speech tower, so training runs it once per clip, not once per epoch.

When every speech-tower parameter is frozen, the frame average that feeds the audio head, computed in eval
mode, is a fixed function of the clip. `SpeechStateCache` computes it the first time a clip comes in a batch
(the whole batch at once, so each audio bucket compiles once) and the trainer sends `speech_states` [B, C] to
the step in place of the waveforms. After the first epoch the step runs only the heads, the text side and the
loss (the demo's figures are in BENCHMARKS.md §1).

Eval mode, as in locked-tower tuning and as `clsp_jax.train.text_cache` runs the frozen text encoder: the
tower's training-time noise (dropout, the positional-embedding dropout, feature masks, layer skipping) does
not reach the cached features.

Each process caches the clips of its own batches with its own copy of the tower: no collective is involved,
so processes may compute different numbers of clips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsp_jax.features import fbank
from clsp_jax.models.clsp import masked_mean
from clsp_jax.optim import training_paths


def check_cacheable(param_paths: Sequence[str], frozen: Sequence[str]) -> None:
    """Raises ValueError unless every speech-tower parameter is frozen (`optim.frozen`)."""
    speech = [p for p in param_paths if p.startswith("speech/")]
    training = training_paths(speech, frozen)
    if not speech or training:
        raise ValueError("caching speech states needs the whole speech tower frozen (optim.frozen); "
                         f"these train: {training[:3] or 'no speech parameters found'}")


def _key(audio: np.ndarray, length: int) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(audio[:length], np.float32).tobytes(), digest_size=16).digest()


class SpeechStateCache:
    """clip samples -> the frozen speech tower's frame average [C] float32 (what `CLSPNet.pooled_audio` gives).

    Keys are digests of the unpadded samples, so a clip padded to any bucket length finds its row.
    """

    def __init__(self, speech):
        """speech: the network's speech tower (`CLSPNet.speech`) with this process's arrays (host or one
        local device: no sharding across processes)."""
        self.speech = speech
        self.rows: dict[bytes, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, audio: np.ndarray, audio_lens: np.ndarray) -> np.ndarray:
        """audio [B, N] float32, audio_lens [B] -> states [B, C] float32; clips not seen before are computed
        (the whole batch in one call, so each batch shape compiles once) and kept."""
        keys = [_key(a, int(n)) for a, n in zip(audio, audio_lens)]
        if any(k not in self.rows for k in keys):
            states = np.asarray(_pooled(self.speech, audio, audio_lens))
            for k, state in zip(keys, states):
                self.rows.setdefault(k, state)
        return np.stack([self.rows[k] for k in keys])


@nnx.jit
def _pooled(speech, audio, audio_lens):
    feats, feat_lens = fbank(audio, audio_lens)
    return masked_mean(*speech(feats, feat_lens)).astype(jnp.float32)
