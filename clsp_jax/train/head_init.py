"""Data-dependent initialisation of the audio head (`train.audio_head_init_batches`).

A speech tower trained from scratch starts with pooled outputs that are mostly one shared vector (most of
their energy is the mean over clips, and the clips' audio embeddings are nearly parallel: measured in
BENCHMARKS.md §7). The head's first bias then needs hundreds of steps to cancel that offset before clips can
be told apart. This folds the per-channel mean and standard deviation of the pooled features of the first
training batches into `audio_projection/0` (`clsp_jax.models.clsp.fold_input_standardization`), so the
head starts on standardised inputs. Nothing is added to the network: checkpoints and the PyTorch export
are unchanged. Use it for a speech tower trained from scratch, not for a pretrained one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from clsp_jax.features import fbank
from clsp_jax.models.clsp import CLSPNet, fold_input_standardization

log = logging.getLogger(__name__)


@nnx.jit
def _pooled_moments(net: CLSPNet, audio, audio_lens):
    """-> (sum [C], sum of squares [C]) over the batch of the pooled speech features (eval mode)."""
    feats, feat_lens = fbank(audio, audio_lens)
    pooled = net.pooled_audio(feats, feat_lens)
    return jnp.sum(pooled, 0), jnp.sum(pooled * pooled, 0)


def standardize_audio_head(net: CLSPNet, batches: Iterator[Mapping[str, np.ndarray]], num_batches: int,
                           min_std: float = 1e-3) -> dict[str, np.ndarray]:
    """Folds the mean / std of pooled speech features over `num_batches` batches into the audio head.

    batches: this process's host batches with "audio" [B, N] float32 and "audio_lens" [B] (the pipeline's
      train batches); `net` lives on this process alone (e.g. built on the host CPU). Only batches of the
      first batch's shape are used (at most 4 x num_batches are drawn), so the statistics cost one
      compilation. With several processes the sums are added over all of them (every process draws the same
      bucket sequence), so every process folds the same statistics into its identical copy of the net.
    min_std: floor on each channel's std, relative to the largest, so a dead channel is not blown up.
    Returns {"mean", "std"} [C] as folded.
    """
    start = time.time()
    total, total_sq, clips, used, shape = 0.0, 0.0, 0, 0, None
    for _ in range(4 * num_batches):
        batch = next(batches)
        shape = shape or batch["audio"].shape
        if batch["audio"].shape != shape:
            continue
        s, sq = _pooled_moments(net, jnp.asarray(batch["audio"]), jnp.asarray(batch["audio_lens"]))
        total, total_sq, clips, used = total + np.asarray(s), total_sq + np.asarray(sq), clips + shape[0], used + 1
        if used == num_batches:
            break
    if jax.process_count() > 1:
        sums = multihost_utils.process_allgather(np.concatenate([total, total_sq, [clips]]).astype(np.float32))
        total, total_sq, clips = np.split(np.sum(sums, axis=0), [len(total), 2 * len(total)])
        clips = float(clips[0])
    mean = total / clips
    std = np.sqrt(np.maximum(total_sq / clips - mean * mean, 0.0))
    std = np.maximum(std, min_std * std.max())
    fold_input_standardization(net.audio_projection["0"], mean, std)
    log.info("audio head initialised on %d clips (%d batches of %s): pooled features had |mean|^2 / E|x|^2 = "
             "%.3f, in %.1f s", clips, used, shape, float(np.sum(mean ** 2) / np.sum(total_sq / clips)),
             time.time() - start)
    return {"mean": mean, "std": std}
