"""The input pipeline's config: its keys and their defaults. Imports no jax, grain or TFDS, so a training
config loads fast.

Keys (``default_config()``; ``clsp_jax.data.pipeline`` takes an ``ml_collections`` ConfigDict or any mapping):

    sources                      tuple of {"name", "split", "weight"[, "data_dir"]}
    seed                         int; shuffle, task and caption draws
    num_epochs                   -1: repeat forever; n > 0: n passes, then StopIteration
    stage                        1, 2 or 3 (captions per clip, see clsp_jax.data.captions)
    sample_rate                  16000
    bucket_boundaries_s          padded audio lengths (seconds), ascending; longer clips are dropped
    duration_bins                None: batches pad to bucket_boundaries_s; n: to n boundaries estimated from
                                 the training clips' durations (about equal audio per bin, as the authors'
                                 Lhotse sampler), the last of bucket_boundaries_s staying the longest kept
    min_audio_seconds            shorter training clips are dropped (authors: 4 s in stage 1, 2 s later)
    max_audio_seconds_per_batch  padded audio seconds per GLOBAL batch (authors: 800 s per GPU)
    batch_size_multiple          the data-parallel size: every bucket batch is a multiple of it
    stage1_caption_pool          "finegrained" | "global" | "both": a random caption of the pool each step;
                                 "fixed": one caption per clip for the whole run (see clsp_jax.data.captions)
    task2_prob_start / task2_prob_end / task2_ramp_steps   p(Task 2) schedule (0.05 -> 0.5 over 10k)
    accent_intra_group_prob      stage 3: wrong accent taken from the same accent group
    text_length_buckets          token lengths; captions are truncated to the last one
    text_fixed_length            0: bucketed lengths; L > 0: pad every caption batch to L
    worker_count                 grain worker processes (0: load in this process)
    worker_buffer_size           batches buffered per worker
    read_threads / read_buffer_size   reader threads and their buffer in each loading process
    eval_batch_size              global eval batch size
    eval_caption_kinds           captions per eval clip, in row order ("global", "finegrained")
"""

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
    """A fresh ConfigDict of the defaults."""
    return ml_collections.ConfigDict(
        {
            "sources": ({"name": "fcaps", "split": "train", "weight": 1.0},),
            "seed": 0,
            "num_epochs": -1,
            "stage": 1,
            "sample_rate": 16000,
            "bucket_boundaries_s": (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0),
            "duration_bins": config_dict.placeholder(int),
            "min_audio_seconds": 0.0,
            "max_audio_seconds_per_batch": 800.0,
            "batch_size_multiple": 1,
            "stage1_caption_pool": "finegrained",
            "task2_prob_start": 0.05,
            "task2_prob_end": 0.5,
            "task2_ramp_steps": 10000,
            "accent_intra_group_prob": 0.2,
            "text_length_buckets": (32, 64, 128, 256, 512),
            "text_fixed_length": 0,
            "worker_count": 0,
            "worker_buffer_size": 2,
            "read_threads": 2,
            "read_buffer_size": 4,
            "eval_batch_size": 32,
            "eval_caption_kinds": ("global", "finegrained"),
        }
    )
