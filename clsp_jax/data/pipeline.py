"""Grain input pipeline: FCaps TFDS splits -> bucketed, captioned, tokenised host batches.

    data source (ArrayRecord, via tfds.data_source; durations from the num_samples sidecar)
      -> per source: BatchPlanDataset (seeded global shuffle, repeat, duration buckets, this
         host's share of each global batch)                                   [buckets.py]
      -> weighted mixing of sources, batch by batch (grain MapDataset.mix)
      -> map_with_index(LoadTrainBatch): read records, int16 -> float32, pad to the bucket,
         sample captions for the step's task, tokenise                       [captions.py]
      -> to_iter_dataset (reader threads) -> mp_prefetch (worker processes, optional)

Every stage before loading is a random-access MapDataset, so the iterator state is grain's
``{"next_index": step}``-style JSON dict and resuming from it reproduces the same batches; the
output does not depend on ``worker_count``. The map index is the global step (batches consumed
since the start of training), which seeds the stage-2 task and the caption draws.

**Sharding and buckets across hosts**: all hosts compute the same global plan and host p takes
rows [p*B/P, (p+1)*B/P) of each global batch (rather than a record-level ``ShardOptions`` split),
so every host pads to the same bucket at every step, as ``jax.make_array_from_process_local_data``
needs. Token lengths are bucketed from the host's own captions; with several hosts set
``text_fixed_length`` (or pad to the hosts' maximum) so shapes agree.

**Mixing** is per batch: each batch comes from one source (its clips share the source's bucket
plan), sources are interleaved deterministically in proportion to their weights.

Train batch (B = this host's batch, K = captions per clip = stage number, L = token bucket)::

    audio           float32 [B, N]    16 kHz waveform in [-1, 1], zero-padded to the bucket (N samples)
    audio_lens      int32   [B]       valid samples
    input_ids       int32   [K*B, L]  caption k of clip i at row k*B + i (k-major; a free
    attention_mask  int32   [K*B, L]  reshape to [K, B, L] shards the clip axis for global arrays)
    ids             str     [B]       clip ids
    task            int32   []        0: Task 1 (global, fine-grained) — stages 1 and 3 always;
                                      1: Task 2 (two fine-grained) — stage 2 only
    step            int64   []        global step of this batch (position in the stream)
    source          int32   []        index into cfg.sources
    negative_valid  bool    [B]       stage 3 only: row 2B + i holds a usable hard negative

Config keys: ``clsp_jax.data.config`` (``default_config()``; an ``ml_collections`` ConfigDict or any mapping).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from clsp_jax.data import buckets, captions, fcaps_format
from clsp_jax.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    data_dir: str
    name: str
    split: str
    weight: float


def _source_specs(cfg, data_dir) -> list[SourceSpec]:
    specs = [
        SourceSpec(str(s.get("data_dir", data_dir)), s["name"], s["split"], float(s.get("weight", 1.0)))
        for s in cfg.sources
    ]
    if not specs or any(s.weight <= 0 for s in specs):
        raise ValueError(f"cfg.sources needs at least one source, all weights > 0: {cfg.sources}")
    return specs


def _caption_config(cfg) -> captions.CaptionConfig:
    return captions.CaptionConfig(
        stage=int(cfg.stage),
        stage1_caption_pool=cfg.stage1_caption_pool,
        task2_prob_start=float(cfg.task2_prob_start),
        task2_prob_end=float(cfg.task2_prob_end),
        task2_ramp_steps=int(cfg.task2_ramp_steps),
        accent_intra_group_prob=float(cfg.accent_intra_group_prob),
    )


def bucket_boundaries(cfg, num_samples: np.ndarray) -> tuple[float, ...]:
    """The padded lengths (seconds) of the batches: ``cfg.bucket_boundaries_s``, or with ``cfg.duration_bins``
    set, that many boundaries estimated from the clips' int [n] sample counts
    (``buckets.estimate_duration_bins``: about equal audio per bin, clips between ``cfg.min_audio_seconds``
    and the last of ``cfg.bucket_boundaries_s``, which stays the last boundary)."""
    if cfg.duration_bins is None:
        return tuple(cfg.bucket_boundaries_s)
    seconds = np.asarray(num_samples, np.float64) / int(cfg.sample_rate)
    seconds = seconds[seconds >= float(cfg.min_audio_seconds)]
    return buckets.estimate_duration_bins(seconds, int(cfg.duration_bins), float(cfg.bucket_boundaries_s[-1]))


def _tokenizer(tokenizer, cfg) -> CaptionTokenizer:
    if isinstance(tokenizer, CaptionTokenizer):
        return tokenizer
    return CaptionTokenizer(tokenizer, buckets=tuple(cfg.text_length_buckets))


class _DataSources:
    """TFDS data sources opened on first use in each process (workers unpickle a closed copy)."""

    def __init__(self, specs: Sequence[SourceSpec]):
        self._specs = tuple(specs)
        self._open: dict[int, Any] = {}

    def __getstate__(self):
        return {"_specs": self._specs, "_open": {}}

    def get(self, i: int):
        if i not in self._open:
            s = self._specs[i]
            self._open[i] = fcaps_format.open_split(s.data_dir, s.split, s.name)
        return self._open[i]


def _padded_audio(examples: Sequence[dict], length: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [B, length] waveforms (int16 / 32768) and int32 [B] lengths."""
    audio = np.zeros((len(examples), length), np.float32)
    lens = np.zeros(len(examples), np.int32)
    for i, ex in enumerate(examples):
        wave = ex["waveform"]
        if wave.shape[0] > length:
            raise ValueError(
                f"clip {ex['id']!r} has {wave.shape[0]} samples, more than its bucket ({length}); "
                "the num_samples sidecar does not match the data"
            )
        audio[i, : wave.shape[0]] = wave * np.float32(1 / 32768)
        lens[i] = wave.shape[0]
    return audio, lens


def _ids(examples: Sequence[dict]) -> np.ndarray:
    return np.array([ex["id"].decode("utf-8") for ex in examples], dtype=np.str_)


class LoadTrainBatch:
    """map_with_index transform: (step, plan element) -> train batch (see module doc)."""

    def __init__(self, sources: _DataSources, lengths: np.ndarray, caption_cfg: captions.CaptionConfig,
                 tokenizer: CaptionTokenizer, seed: int, text_fixed_length: int):
        self._sources, self._lengths, self._cfg = sources, lengths, caption_cfg
        self._tokenizer, self._seed, self._text_length = tokenizer, seed, text_fixed_length or None

    def __call__(self, step: int, plan: dict) -> dict[str, np.ndarray]:
        examples = self._sources.get(plan["source"]).__getitems__(plan["records"].tolist())
        audio, audio_lens = _padded_audio(examples, int(self._lengths[plan["bucket"]]))
        task = captions.draw_task(self._seed, step, self._cfg)
        k_rows = [[] for _ in range(self._cfg.captions_per_clip)]
        negative_valid = np.zeros(len(examples), bool)
        for i, (ex, row) in enumerate(zip(examples, plan["rows"])):
            rng = captions.clip_rng(self._seed, step, int(row))
            clip = captions.ClipText.from_example(ex)
            texts, negative_valid[i] = captions.sample_captions(clip, task, self._cfg, rng)
            for k, text in enumerate(texts):
                k_rows[k].append(text)
        tokens = self._tokenizer([t for rows in k_rows for t in rows], length=self._text_length)
        batch = {
            "audio": audio,
            "audio_lens": audio_lens,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "ids": _ids(examples),
            "task": np.int32(task),
            "step": np.int64(step),
            "source": np.int32(plan["source"]),
        }
        if self._cfg.stage == 3:
            batch["negative_valid"] = negative_valid
        return batch


def _grain_workers_ready() -> None:
    # Grain worker processes read absl flags; a program that never parsed them (pytest, notebooks,
    # a plain script) must mark them parsed or the workers fail on start.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iter_dataset(ds: grain.MapDataset, cfg, workers: int) -> grain.IterDataset:
    read = grain.ReadOptions(num_threads=int(cfg.read_threads), prefetch_buffer_size=int(cfg.read_buffer_size))
    it = ds.to_iter_dataset(read)
    if workers > 0:
        _grain_workers_ready()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=int(cfg.worker_buffer_size))
        it = it.mp_prefetch(options)
    return it


def make_train_dataset(cfg, *, data_dir: str | os.PathLike, tokenizer, process_index: int,
                       process_count: int) -> grain.IterDataset:
    """The training IterDataset of this host (see module doc); ``iter()`` it for batches.

    Args:
      cfg: config with the keys of ``clsp_jax.data.config.default_config()``.
      data_dir: TFDS data dir holding the sources (a source's own "data_dir" overrides it).
      tokenizer: a ``CaptionTokenizer`` or the path of a tokenizer.json (then bucketed with
        ``cfg.text_length_buckets``).
      process_index, process_count: this host (``jax.process_index()``, ``jax.process_count()``).
    """
    multiple = int(cfg.batch_size_multiple)
    if multiple % process_count:
        raise ValueError(f"batch_size_multiple {multiple} must be a multiple of process_count {process_count}")
    specs = _source_specs(cfg, data_dir)
    num_samples = [fcaps_format.load_num_samples(s.data_dir, s.split, s.name) for s in specs]
    boundaries = bucket_boundaries(cfg, np.concatenate(num_samples))
    if cfg.duration_bins is not None:
        log.info("duration bins estimated from the training clips: %s", list(boundaries))
    lengths = buckets.bucket_lengths(boundaries, int(cfg.sample_rate))
    sizes = buckets.bucket_batch_sizes(boundaries, float(cfg.max_audio_seconds_per_batch), multiple)
    min_seconds = float(cfg.min_audio_seconds)
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count)
    plans = []
    for i, s in enumerate(specs):
        plan = buckets.BatchPlanDataset(
            num_samples[i], source=i, lengths=lengths, batch_sizes=sizes, seed=int(cfg.seed),
            num_epochs=int(cfg.num_epochs), shard=shard, min_samples=math.ceil(min_seconds * int(cfg.sample_rate)),
        )
        log.info("source %s/%s: %d batches per epoch, %d clips longer than %.1f s and %d shorter than %.1f s "
                 "dropped; global batch sizes %s", s.name, s.split, plan.batches_per_epoch, plan.num_too_long,
                 boundaries[-1], plan.num_too_short, min_seconds, sizes)
        plans.append(plan)
    ds = plans[0] if len(plans) == 1 else grain.MapDataset.mix(plans, [s.weight for s in specs])
    load = LoadTrainBatch(_DataSources(specs), lengths, _caption_config(cfg), _tokenizer(tokenizer, cfg),
                          int(cfg.seed), int(cfg.text_fixed_length))
    return _iter_dataset(ds.map_with_index(load), cfg, int(cfg.worker_count))


def make_train_iterator(cfg, *, data_dir: str | os.PathLike, tokenizer, process_index: int,
                        process_count: int) -> grain.DatasetIterator:
    """Iterator of training batches; ``get_state()`` is a JSON-serialisable dict and
    ``set_state(state)`` on a fresh iterator (same cfg) continues with the same batches."""
    return iter(make_train_dataset(cfg, data_dir=data_dir, tokenizer=tokenizer,
                                   process_index=process_index, process_count=process_count))


def train_captions(cfg, *, data_dir: str | os.PathLike, chunk: int = 256) -> list[str]:
    """Every caption (global and fine-grained) of the training sources, distinct and sorted: what a stage 1
    or 2 batch can hold (for `clsp_jax.train.text_cache`). Reads each record once."""
    texts = set()
    for spec in _source_specs(cfg, data_dir):
        source = fcaps_format.open_split(spec.data_dir, spec.split, spec.name)
        for lo in range(0, len(source), chunk):
            for ex in source.__getitems__(list(range(lo, min(lo + chunk, len(source))))):
                clip = captions.ClipText.from_example(ex)
                texts.update(clip.global_captions + clip.finegrained_captions)
    return sorted(texts)


# ------------------------------------------------------------------------------------------ eval


class LoadEvalBatch:
    """(eval plan element) -> eval batch; padded rows repeat a real clip and are marked invalid."""

    def __init__(self, sources: _DataSources, kinds: Sequence[str], tokenizer: CaptionTokenizer,
                 text_fixed_length: int):
        self._sources, self._kinds = sources, tuple(kinds)
        self._tokenizer, self._text_length = tokenizer, text_fixed_length or None

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        records = plan["records"]
        valid = records >= 0
        examples = self._sources.get(0).__getitems__(np.where(valid, records, plan["filler"]).tolist())
        audio, audio_lens = _padded_audio(examples, plan["length"])
        texts, caption_valid = [], []
        for kind in self._kinds:
            for ex, ok in zip(examples, valid):
                text = captions.eval_caption(captions.ClipText.from_example(ex), kind)
                texts.append(text or "")
                caption_valid.append(bool(ok) and text is not None)
        tokens = self._tokenizer(texts, length=self._text_length)
        return {
            "audio": audio,
            "audio_lens": audio_lens,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "ids": np.where(valid, _ids(examples), ""),
            "index": records.astype(np.int64),
            "valid": valid,
            "caption_valid": np.asarray(caption_valid, bool),
        }


@dataclasses.dataclass
class EvalBatches:
    """Re-iterable eval batches of one split for this host; every host yields ``len(self)`` batches.

    Batch: audio [B, N], audio_lens [B], input_ids / attention_mask [K*B, L] (caption kind k of clip i
    at row k*B + i, kinds = cfg.eval_caption_kinds: first global, last fine-grained caption),
    ids str [B] ("" for padding), index int64 [B] record index in the split (-1 for padding),
    valid bool [B], caption_valid bool [K*B] (False for padding and missing captions).
    Clips are ordered by duration (least padding); N is the smallest bucket holding the global
    batch's longest clip (rounded up to whole seconds past the last bucket).
    """

    dataset: grain.MapDataset
    num_clips: int
    cfg: Any

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(_iter_dataset(self.dataset, self.cfg, workers=0))


def make_eval_batches(cfg, *, data_dir: str | os.PathLike, tokenizer, split: str, process_index: int,
                      process_count: int, name: str = fcaps_format.DEFAULT_NAME,
                      batch_size: int | None = None) -> EvalBatches:
    """Eval batches of ``split`` (global batch ``batch_size`` or cfg.eval_batch_size), padded so
    every host does equal work; see EvalBatches for the layout."""
    batch_size = int(batch_size or cfg.eval_batch_size)
    if batch_size % process_count:
        raise ValueError(f"eval batch size {batch_size} must be a multiple of process_count {process_count}")
    num_samples = fcaps_format.load_num_samples(data_dir, split, name)
    order = np.argsort(num_samples, kind="stable")
    num_batches = -(-order.size // batch_size)
    padded = np.full(num_batches * batch_size, -1, np.int64)
    padded[: order.size] = order
    lengths = buckets.bucket_lengths(bucket_boundaries(cfg, num_samples), int(cfg.sample_rate))
    per_host = batch_size // process_count
    rows = slice(process_index * per_host, (process_index + 1) * per_host)
    plans = []
    for global_batch in padded.reshape(num_batches, batch_size):
        longest = int(num_samples[global_batch[global_batch >= 0]].max())
        fits = lengths[lengths >= longest]
        sr = int(cfg.sample_rate)
        length = int(fits[0]) if fits.size else -(-longest // sr) * sr
        plans.append({"records": global_batch[rows], "filler": int(global_batch[0]), "length": length})
    specs = [SourceSpec(str(data_dir), name, split, 1.0)]
    load = LoadEvalBatch(_DataSources(specs), cfg.eval_caption_kinds, _tokenizer(tokenizer, cfg),
                         int(cfg.text_fixed_length))
    return EvalBatches(grain.MapDataset.source(plans).map(load), int(order.size), cfg)
