"""Grain pipeline (clsp_jax.data.pipeline): batches, buckets, captions, hosts, mixing, resume, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fcaps_fixtures as ff
from clsp_jax.data import buckets, captions, fcaps_format
from clsp_jax.data.config import default_config
from clsp_jax.data.pipeline import bucket_boundaries, make_eval_batches, make_train_iterator
from clsp_jax.tokenizer import CaptionTokenizer
from data_prep.prepare import BuildSettings, prepare
from train_fixtures import MINILM

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path(MINILM)  # the running interpreter's copy, whichever venv and Python version


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcaps")
    manifest, audio_root, _ = ff.make_corpus(root / "src", 30, min_s=2.5, max_s=9.0)
    other, other_audio, _ = ff.make_corpus(root / "other", 14, min_s=2.5, max_s=3.9, seed=1)
    prepare([manifest], split="train", data_dir=root / "tfds", settings=BuildSettings(str(audio_root)),
            clips_per_shard=8)
    prepare([other], split="other", data_dir=root / "tfds", settings=BuildSettings(str(other_audio)))
    return root / "tfds"


@pytest.fixture(scope="module")
def clips(data_dir):
    source = fcaps_format.open_split(data_dir, "train")
    return {ex["id"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def small_config(**overrides):
    cfg = default_config()
    cfg.bucket_boundaries_s = (4.0, 6.0, 9.0)
    cfg.max_audio_seconds_per_batch = 48.0  # global batch sizes 12, 8, 4
    cfg.batch_size_multiple = 2
    cfg.update(overrides)
    return cfg


def train_iter(cfg, data_dir, process_index=0, process_count=1):
    return make_train_iterator(cfg, data_dir=data_dir, tokenizer=TOKENIZER, process_index=process_index,
                               process_count=process_count)


def take(it, n):
    return [next(it) for _ in range(n)]


def tokens_of(texts, length):
    return CaptionTokenizer(TOKENIZER)(list(texts), length=length)["input_ids"]


def test_stage2_batches_hold_the_stored_audio_and_the_tasks_captions(data_dir, clips):
    cfg = small_config(stage=2, task2_prob_start=0.5, task2_prob_end=0.5)
    caption_cfg = captions.CaptionConfig(stage=2, task2_prob_start=0.5, task2_prob_end=0.5)
    batches = take(train_iter(cfg, data_dir), 8)
    assert {int(b["task"]) for b in batches} == {0, 1}
    for step, b in enumerate(batches):
        n, samples = b["audio"].shape
        assert (n, samples) in {(12, 64000), (8, 96000), (4, 144000)}
        assert int(b["step"]) == step and int(b["task"]) == captions.draw_task(cfg.seed, step, caption_cfg)
        L = b["input_ids"].shape[1]
        assert b["input_ids"].shape == b["attention_mask"].shape == (2 * n, L) and L in cfg.text_length_buckets
        for i, clip_id in enumerate(b["ids"]):
            ex = clips[clip_id]
            length = ex["waveform"].shape[0]
            assert {64000: 0, 96000: 64000, 144000: 96000}[samples] < length <= samples  # its bucket
            assert b["audio_lens"][i] == length
            np.testing.assert_array_equal(b["audio"][i, :length], ex["waveform"].astype(np.float32) / 32768)
            assert not b["audio"][i, length:].any()
            g = [c.decode() for c in ex["global_captions"]]
            f = [c.decode() for c in ex["finegrained_captions"]]
            # Task 2 with a single fine-grained caption falls back to the global one as second
            first_pool, second_pool = (g, f) if b["task"] == 0 else (f, f if len(f) > 1 else g)
            for k, pool in enumerate((first_pool, second_pool)):
                row = b["input_ids"][k * n + i]
                assert any(np.array_equal(row, t) for t in tokens_of(pool, L)), (step, i, k)
            if b["task"] == 1 and len(f) > 1:
                assert not np.array_equal(b["input_ids"][i], b["input_ids"][n + i])


def test_one_epoch_covers_the_clips_once_within_the_audio_budget(data_dir, clips):
    cfg = small_config(num_epochs=1, stage=1)
    seen = []
    for b in train_iter(cfg, data_dir):
        n, samples = b["audio"].shape
        assert n % 2 == 0 and n * samples / 16000 <= cfg.max_audio_seconds_per_batch
        assert b["input_ids"].shape[0] == n  # stage 1: one caption per clip
        seen += b["ids"].tolist()
    assert len(seen) == len(set(seen)) and 30 - len(seen) <= (12 - 1) + (8 - 1) + (4 - 1)

    # The authors' batching: bins estimated from the training clips, short clips dropped.
    cfg = small_config(num_epochs=1, stage=1, duration_bins=3, min_audio_seconds=3.0)
    num_samples = fcaps_format.load_num_samples(data_dir, "train")
    boundaries = bucket_boundaries(cfg, num_samples)
    assert boundaries == buckets.estimate_duration_bins(num_samples[num_samples >= 48000] / 16000, 3, 9.0)
    assert 2 <= len(boundaries) <= 3 and boundaries[-1] == 9.0
    lengths = {round(b * 16000) for b in boundaries}
    for b in train_iter(cfg, data_dir):
        assert b["audio"].shape[1] in lengths
        assert all(int(clips[i]["num_samples"]) >= 48000 for i in b["ids"].tolist())


def test_hosts_split_each_global_batch_with_the_same_bucket_and_captions(data_dir):
    cfg = small_config(stage=3)
    whole = take(train_iter(cfg, data_dir), 5)
    halves = [take(train_iter(cfg, data_dir, p, 2), 5) for p in range(2)]
    for b, h0, h1 in zip(whole, *halves):
        n = len(b["ids"])
        assert h0["audio"].shape == h1["audio"].shape == (n // 2, b["audio"].shape[1])
        assert h0["ids"].tolist() + h1["ids"].tolist() == b["ids"].tolist()
        np.testing.assert_array_equal(np.concatenate([h0["audio"], h1["audio"]]), b["audio"])
        np.testing.assert_array_equal(np.concatenate([h0["negative_valid"], h1["negative_valid"]]), b["negative_valid"])
        for k in range(3):  # caption k of clip i: row k*B + i on every host
            rows = [h["input_ids"][k * (n // 2): (k + 1) * (n // 2)] for h in (h0, h1)]
            width = min(r.shape[1] for r in rows + [b["input_ids"]])
            joined = np.concatenate([r[:, :width] for r in rows])
            np.testing.assert_array_equal(joined, b["input_ids"][k * n:(k + 1) * n, :width])
        negatives_differ = [not np.array_equal(b["input_ids"][i], b["input_ids"][2 * n + i]) for i in range(n)]
        assert negatives_differ == b["negative_valid"].tolist()
    with pytest.raises(ValueError, match="multiple of process_count"):
        train_iter(cfg, data_dir, 0, 4)


def test_fixed_text_length_and_weighted_mixing(data_dir):
    sources = ({"name": "fcaps", "split": "train", "weight": 3.0}, {"name": "fcaps", "split": "other", "weight": 1.0})
    cfg = small_config(sources=sources, text_fixed_length=96)
    batches = take(train_iter(cfg, data_dir), 16)
    assert [int(b["source"]) for b in batches].count(1) == 4
    assert {b["input_ids"].shape[1] for b in batches} == {96}
    other_ids = {i for b in batches if b["source"] == 1 for i in b["ids"]}
    train_ids = {i for b in batches if b["source"] == 0 for i in b["ids"]}
    assert other_ids and train_ids  # both corpora have ids clip0000...; they come from their own split
    first_other = next(b for b in batches if b["source"] == 1)
    other = fcaps_format.open_split(data_dir, "other")
    by_id = {other[i]["id"].decode(): other[i] for i in range(len(other))}
    ex = by_id[first_other["ids"][0]]
    length = ex["waveform"].shape[0]
    np.testing.assert_array_equal(first_other["audio"][0, :length], ex["waveform"] / np.float32(32768))


RESUME_SCRIPT = """
import json, sys
import numpy as np
from clsp_jax.data.config import default_config
from clsp_jax.data.pipeline import make_train_iterator

def main():
    cfg = default_config()
    cfg.update(json.loads(sys.argv[1]))
    it = make_train_iterator(cfg, data_dir=sys.argv[2], tokenizer=sys.argv[3], process_index=0, process_count=1)
    it.set_state(json.loads(sys.argv[4]))
    batches = [next(it) for _ in range(3)]
    np.savez(sys.argv[5], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    if hasattr(it, "close"):
        it.close()

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_state_saved_after_n_batches_resumes_in_a_new_process(data_dir, tmp_path, workers):
    overrides = dict(stage=2, task2_prob_start=0.5, worker_count=workers, bucket_boundaries_s=(4.0, 6.0, 9.0),
                     max_audio_seconds_per_batch=48.0, batch_size_multiple=2)
    cfg = small_config(**overrides)
    it = train_iter(cfg, data_dir)
    take(it, 4)
    state = json.dumps(it.get_state())
    expected = take(it, 3)
    if workers:
        it.close()
        # worker processes change nothing: same batches as loading in this process
        local = take(train_iter(small_config(**{**overrides, "worker_count": 0}), data_dir), 7)[4:]
        for a, b in zip(local, expected):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "resumed.npz"
    config_json = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    run = subprocess.run([sys.executable, str(script), config_json, str(data_dir), str(TOKENIZER), state, str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = np.load(out)
    assert sorted(resumed.files) == sorted(f"{i}/{k}" for i in range(3) for k in expected[0])
    for i, b in enumerate(expected):
        for k, v in b.items():
            np.testing.assert_array_equal(resumed[f"{i}/{k}"], v)
    assert [int(b["step"]) for b in expected] == [4, 5, 6]


def test_eval_batches_cover_every_clip_once_with_equal_work_per_host(data_dir, clips):
    cfg = small_config()
    hosts = [make_eval_batches(cfg, data_dir=data_dir, tokenizer=TOKENIZER, split="train", batch_size=8,
                               process_index=p, process_count=2) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 4 and hosts[0].num_clips == 30
    seen = []
    for h0, h1 in zip(*hosts):
        assert h0["audio"].shape == h1["audio"].shape and h0["input_ids"].shape[0] == 2 * 4
        for h in (h0, h1):
            seen += h["ids"][h["valid"]].tolist()
            for i in np.flatnonzero(h["valid"]):
                ex = clips[h["ids"][i]]
                L = h["input_ids"].shape[1]
                expected = tokens_of([ex["global_captions"][0].decode(), ex["finegrained_captions"][-1].decode()], L)
                np.testing.assert_array_equal(h["input_ids"][[i, 4 + i]], expected)
            np.testing.assert_array_equal(h["caption_valid"], np.concatenate([h["valid"], h["valid"]]))
            assert (h["index"] >= 0).tolist() == h["valid"].tolist()
    assert sorted(seen) == sorted(clips)
    assert len(list(hosts[0])) == 4  # re-iterable
