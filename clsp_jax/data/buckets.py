"""Duration buckets and the batch plan: which clips form global batch ``step`` (no audio read).

Bucket k pads audio to ``boundaries_s[k]`` seconds and holds clips longer than the previous
boundary; its global batch size is the number of such padded clips that fit the audio budget,
rounded down to a multiple of the data-parallel size (the authors: 800 s per GPU, batch =
800 // boundary). Clips longer than the last boundary, or shorter than the minimum duration, are left out
(counted).

An epoch plan is a pure function of (seed, source, epoch): shuffle the clips, walk the shuffled
stream and emit a bucket's batch whenever it fills (greedy bucketing, computed vectorised:
batches sorted by the stream position of their last clip); partial batches at the end of the
epoch are dropped. The number of batches per epoch, sum_k floor(n_k / size_k), does not depend on
the shuffle, so ``step -> (epoch, batch)`` is O(1): any step can be produced directly, which makes
the iterator state a single index and keeps every host on the same bucket at every step.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import grain
import numpy as np


def bucket_lengths(boundaries_s: Sequence[float], sample_rate: int) -> np.ndarray:
    """int64 [num_buckets] padded sample lengths (ascending)."""
    lengths = np.asarray([round(b * sample_rate) for b in boundaries_s], dtype=np.int64)
    if lengths.size == 0 or np.any(np.diff(lengths) <= 0) or lengths[0] <= 0:
        raise ValueError(f"bucket boundaries must be positive and strictly increasing, got {boundaries_s}")
    return lengths


def bucket_batch_sizes(boundaries_s: Sequence[float], max_audio_seconds: float, multiple: int) -> list[int]:
    """Global batch size per bucket: floor(max_audio_seconds / boundary) rounded down to a multiple
    of ``multiple`` (at least ``multiple``)."""
    if multiple < 1 or max_audio_seconds <= 0:
        raise ValueError(f"need multiple >= 1 and max_audio_seconds > 0, got {multiple}, {max_audio_seconds}")
    return [max(multiple, math.floor(max_audio_seconds / b + 1e-9) // multiple * multiple) for b in boundaries_s]


def assign_buckets(num_samples: np.ndarray, lengths: np.ndarray, min_samples: int = 0) -> np.ndarray:
    """int32 [n] bucket of each clip (smallest length >= num_samples), -1 if longer than all or shorter than
    ``min_samples``."""
    ids = np.searchsorted(lengths, num_samples, side="left").astype(np.int32)
    ids[(ids == len(lengths)) | (np.asarray(num_samples) < min_samples)] = -1
    return ids


def estimate_duration_bins(durations_s: np.ndarray, num_bins: int, max_s: float) -> tuple[float, ...]:
    """Bucket boundaries (seconds, ascending) holding about equal total audio each, as Lhotse's
    ``estimate_duration_buckets`` picks them (what the CLSP authors' sampler uses), ending at ``max_s``.

    Walking the sorted durations, a bin closes at the first clip that arrives once the bin holds more than
    1/num_bins of the total; that clip's duration is the next bin's lower edge, so the boundary of bin k
    (the padded length of its batches) is bin k+1's first duration, and the last boundary is ``max_s``.
    Durations are rounded up to 10 ms (a fbank frame), so boundaries are whole frames. Returns at most
    ``num_bins`` boundaries (fewer when few distinct durations exist).
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    durations = np.sort(np.asarray(durations_s, np.float64))
    durations = durations[durations <= max_s]
    if durations.size == 0:
        raise ValueError(f"no clip of at most {max_s} s to estimate duration bins from")
    # The walk, one bin per search over the running sums (tens of bins over millions of clips): a bin that
    # starts at clip s closes at the first clip j with sum(durations[s:j]) > per_bin.
    cumulative = np.concatenate([[0.0], np.cumsum(durations)])
    per_bin, start, edges = cumulative[-1] / num_bins, 0, []
    while (start := int(np.searchsorted(cumulative, cumulative[start] + per_bin, side="right"))) < durations.size:
        edges.append(durations[start])
    edges = np.ceil(np.asarray(edges) * 100.0 - 1e-6) / 100.0
    return tuple(float(e) for e in np.unique(edges) if e < max_s) + (float(max_s),)


def plan_epoch(bucket_ids: np.ndarray, batch_sizes: Sequence[int], rng: np.random.Generator):
    """One epoch of batches in emission order.

    Returns (batch_bucket int32 [M], members: list over buckets of int64 [n_batches_k, size_k]
    record indices, batch_row int64 [M] row of each batch in its bucket's ``members``).
    """
    valid = np.flatnonzero(bucket_ids >= 0)
    stream = valid[rng.permutation(valid.size)]
    stream_bucket = bucket_ids[stream]
    members, keys, buckets, rows = [], [], [], []
    for k, size in enumerate(batch_sizes):
        positions = np.flatnonzero(stream_bucket == k)
        positions = positions[: positions.size // size * size].reshape(-1, size)
        members.append(stream[positions])
        keys.append(positions[:, -1])
        buckets.append(np.full(len(positions), k, np.int32))
        rows.append(np.arange(len(positions)))
    order = np.argsort(np.concatenate(keys), kind="stable")
    return np.concatenate(buckets)[order], members, np.concatenate(rows)[order]


def batches_per_epoch(bucket_ids: np.ndarray, batch_sizes: Sequence[int]) -> int:
    counts = np.bincount(bucket_ids[bucket_ids >= 0], minlength=len(batch_sizes))
    return int(sum(int(c) // s for c, s in zip(counts, batch_sizes)))


class BatchPlanDataset(grain.MapDataset):
    """MapDataset of this host's share of each global batch of one source.

    Element ``i``: {"source": int, "bucket": int, "records": int64 [size_k / process_count] record
    indices of this host, "rows": int64 [same] their rows in the global batch}.
    Length: num_epochs * batches_per_epoch, or sys.maxsize when num_epochs < 0 (repeat forever).
    """

    def __init__(
        self,
        num_samples: np.ndarray,
        *,
        source: int,
        lengths: np.ndarray,
        batch_sizes: Sequence[int],
        seed: int,
        num_epochs: int,
        shard: grain.sharding.ShardOptions,
        min_samples: int = 0,
    ):
        super().__init__()
        self._bucket_ids = assign_buckets(np.asarray(num_samples), lengths, min_samples)
        self._batch_sizes = tuple(int(b) for b in batch_sizes)
        for size in self._batch_sizes:
            if size % shard.shard_count:
                raise ValueError(f"batch size {size} is not divisible by process_count {shard.shard_count}")
        self._source, self._seed, self._shard = source, seed, shard
        self.num_too_long = int(np.sum(np.asarray(num_samples) > lengths[-1]))
        self.num_too_short = int(np.sum(np.asarray(num_samples) < min_samples))
        self.batches_per_epoch = batches_per_epoch(self._bucket_ids, self._batch_sizes)
        if self.batches_per_epoch == 0:
            counts = np.bincount(self._bucket_ids[self._bucket_ids >= 0], minlength=len(self._batch_sizes))
            raise ValueError(
                f"source {source}: no bucket fills a batch (clips per bucket {counts.tolist()}, "
                f"batch sizes {list(self._batch_sizes)}); lower max_audio_seconds_per_batch or add data"
            )
        self._length = sys.maxsize if num_epochs < 0 else num_epochs * self.batches_per_epoch
        self._cache = (None, None)  # (epoch, plan), one tuple so reader threads never see a mix

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):  # the epoch cache is rebuilt where the dataset is unpickled
        state = dict(self.__dict__)
        state["_cache"] = (None, None)
        return state

    def _plan(self, epoch: int):
        cached_epoch, plan = self._cache
        if cached_epoch != epoch:
            rng = np.random.default_rng([self._seed, self._source, epoch])
            plan = plan_epoch(self._bucket_ids, self._batch_sizes, rng)
            self._cache = (epoch, plan)
        return plan

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(index)
        epoch, j = divmod(index, self.batches_per_epoch)
        batch_bucket, members, batch_row = self._plan(epoch)
        k = int(batch_bucket[j])
        records = members[k][batch_row[j]]
        per_host = len(records) // self._shard.shard_count
        rows = np.arange(self._shard.shard_index * per_host, (self._shard.shard_index + 1) * per_host)
        return {"source": self._source, "bucket": k, "records": records[rows], "rows": rows}
