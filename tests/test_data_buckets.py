"""Duration buckets and the batch plan (clsp_jax.data.buckets)."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from clsp_jax.data import buckets


def test_batch_sizes_fill_the_audio_budget_in_multiples_of_the_data_parallel_size():
    # The authors' rule per GPU: 800 s // boundary (30 s -> 26); here rounded down to multiples of 8.
    assert buckets.bucket_batch_sizes([5.0, 10.0, 30.0], 800.0, 1) == [160, 80, 26]
    assert buckets.bucket_batch_sizes([5.0, 10.0, 30.0], 800.0, 8) == [160, 80, 24]
    assert buckets.bucket_batch_sizes([3.0, 30.0], 100.0, 8) == [32, 8]  # at least one multiple
    np.testing.assert_array_equal(buckets.bucket_lengths([2.5, 30.0], 16000), [40000, 480000])
    with pytest.raises(ValueError, match="strictly increasing"):
        buckets.bucket_lengths([4.0, 4.0], 16000)


def test_assign_buckets_uses_the_smallest_bucket_that_holds_the_clip():
    ids = buckets.assign_buckets(np.array([1, 100, 101, 200, 201]), np.array([100, 200]))
    np.testing.assert_array_equal(ids, [0, 0, 1, 1, -1])
    ids = buckets.assign_buckets(np.array([1, 99, 100, 201]), np.array([100, 200]), min_samples=100)
    np.testing.assert_array_equal(ids, [-1, -1, 0, -1])
    ds = buckets.BatchPlanDataset(np.array([50, 150, 150, 300, 500]), source=0, lengths=np.array([200, 400]),
                                  batch_sizes=[2, 1], seed=0, num_epochs=1,
                                  shard=grain.sharding.ShardOptions(0, 1), min_samples=100)
    assert (ds.num_too_short, ds.num_too_long, ds.batches_per_epoch) == (1, 1, 2)


def test_duration_bins_hold_equal_audio_as_lhotse_estimates_them():
    # Hand-worked: 10 clips of 1 s and 2 of 5 s (20 s in all), 2 bins of 10 s each: after the ten 1 s clips
    # the first bin holds 10 s, not more, so the first 5 s clip joins it and the second opens bin 2: edge 5 s.
    durations = np.array([5.0, 1.0] + [1.0] * 9 + [5.0])
    assert buckets.estimate_duration_bins(durations, 2, 30.0) == (5.0, 30.0)
    # Lhotse's loop on 4-30 s clips, edges rounded up to 10 ms; the last boundary is the longest clip kept.
    rng = np.random.default_rng(0)
    durations = rng.uniform(4.0, 30.0, 5000)
    edges = []
    total, per_bin = 0.0, np.sort(durations).sum() / 30
    for d in np.sort(durations):
        if total > per_bin:
            edges.append(d)
            total = 0.0
        total += d
    got = buckets.estimate_duration_bins(np.append(durations, 31.0), 30, 30.0)
    assert len(got) == 30 and got[-1] == 30.0
    np.testing.assert_allclose(got[:-1], np.ceil(np.array(edges) * 100) / 100, atol=1e-9)
    with pytest.raises(ValueError, match="no clip"):
        buckets.estimate_duration_bins(np.array([40.0]), 3, 30.0)


def _greedy_reference(bucket_ids, batch_sizes, rng):
    """Straightforward greedy bucketing over the shuffled stream (what plan_epoch vectorises)."""
    valid = np.flatnonzero(bucket_ids >= 0)
    stream = valid[rng.permutation(valid.size)]
    pending = {k: [] for k in range(len(batch_sizes))}
    out = []
    for r in stream:
        k = int(bucket_ids[r])
        pending[k].append(int(r))
        if len(pending[k]) == batch_sizes[k]:
            out.append((k, pending[k]))
            pending[k] = []
    return out


def test_plan_epoch_equals_greedy_bucketing_of_the_shuffled_stream():
    bucket_ids = np.random.default_rng(0).integers(-1, 3, size=500).astype(np.int32)
    sizes = [7, 5, 3]
    batch_bucket, members, batch_row = buckets.plan_epoch(bucket_ids, sizes, np.random.default_rng(42))
    got = [(int(k), members[k][r].tolist()) for k, r in zip(batch_bucket, batch_row)]
    assert got == _greedy_reference(bucket_ids, sizes, np.random.default_rng(42))
    assert len(got) == buckets.batches_per_epoch(bucket_ids, sizes)
    flat = [r for _, rs in got for r in rs]
    assert len(flat) == len(set(flat))


def _plan_ds(num_samples, shard_index=0, shard_count=1, num_epochs=-1, seed=3):
    return buckets.BatchPlanDataset(
        num_samples, source=0, lengths=np.array([100, 200, 400]), batch_sizes=[8, 4, 2], seed=seed,
        num_epochs=num_epochs, shard=grain.sharding.ShardOptions(shard_index, shard_count),
    )


def test_plan_dataset_epochs_repeat_with_new_shuffles_and_hosts_share_each_batch():
    num_samples = np.random.default_rng(1).integers(1, 450, size=300)
    full = _plan_ds(num_samples)
    bpe = full.batches_per_epoch
    assert full.num_too_long == int(np.sum(num_samples > 400))
    epoch0 = [full[i]["records"].tolist() for i in range(bpe)]
    epoch1 = [full[i]["records"].tolist() for i in range(bpe, 2 * bpe)]
    assert epoch0 != epoch1
    valid = set(np.flatnonzero(num_samples <= 400).tolist())
    for epoch in (epoch0, epoch1):
        flat = sum(epoch, [])
        # each clip at most once; only the partial batches of the epoch's end are left out
        assert len(flat) == len(set(flat)) and set(flat) <= valid
        assert len(valid) - len(flat) <= (8 - 1) + (4 - 1) + (2 - 1)
    assert [_plan_ds(num_samples)[i]["records"].tolist() for i in range(bpe)] == epoch0  # seeded
    assert _plan_ds(num_samples, seed=4)[0]["records"].tolist() != epoch0[0]
    assert len(_plan_ds(num_samples, num_epochs=2)) == 2 * bpe

    hosts = [_plan_ds(num_samples, p, 2) for p in range(2)]
    for i in (0, 5, bpe + 1):
        parts = [h[i] for h in hosts]
        assert parts[0]["bucket"] == parts[1]["bucket"] == full[i]["bucket"]
        assert np.concatenate([p["records"] for p in parts]).tolist() == full[i]["records"].tolist()
        assert np.concatenate([p["rows"] for p in parts]).tolist() == list(range(len(full[i]["records"])))
    with pytest.raises(ValueError, match="not divisible by process_count"):
        _plan_ds(num_samples, 0, 3)
    with pytest.raises(ValueError, match="no bucket fills a batch"):
        _plan_ds(np.array([10, 20, 30]))
