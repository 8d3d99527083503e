"""Input-pipeline throughput (the real Grain train pipeline) against what the train step consumes.

    python -m benchmarks.pipeline --config configs/tiny.py [--data-dir DIR] [--workers 0 2]
        [--batches 200] [--step-seconds S | --step-json train_step.json] [--json OUT] [--config.key=value ...]

For each worker count: the time to the first batch (worker start-up included), then batches/s, clips/s and
audio seconds/s (real and padded) over `--batches` batches, with nothing consuming them. Without
`--data-dir` a ~300-clip espeak-ng corpus is synthesised and prepared in a temporary dir (~1-2 min).

The step's consumption: `--step-seconds` is the step time on the pipeline's own batches (ratio = batches/s
x step seconds); `--step-json` takes `benchmarks.train_step`'s JSON, whose batch may have another shape,
so the ratio compares padded audio seconds per second (the step's cost follows the padded audio). A ratio
>= 3 leaves the pipeline ample headroom.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import common
from clsp_jax.data.pipeline import make_train_iterator
from clsp_jax.tokenizer import CaptionTokenizer


def measure(data_cfg, data_dir: str, tokenizer, workers: int, batches: int, warmup: int = 2) -> dict:
    """Throughput of the train iterator with `workers` worker processes."""
    cfg = data_cfg.copy_and_resolve_references()
    cfg.worker_count = workers
    start = time.perf_counter()
    it = make_train_iterator(cfg, data_dir=data_dir, tokenizer=tokenizer, process_index=0, process_count=1)
    next(it)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    clips = real = padded = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        clips += len(b["audio_lens"])
        real += float(np.sum(b["audio_lens"])) / cfg.sample_rate
        padded += b["audio"].size / cfg.sample_rate
    elapsed = time.perf_counter() - start
    del it  # stops the worker processes
    return {"workers": workers, "first_batch_s": first_s, "batches": batches, "seconds": elapsed,
            "batches_per_s": batches / elapsed, "clips_per_s": clips / elapsed,
            "audio_seconds_per_s": real / elapsed, "padded_audio_seconds_per_s": padded / elapsed}


def run(args, config) -> dict:
    d = config.data
    with tempfile.TemporaryDirectory(prefix="clsp_pipeline_") as tmp:
        data_dir = args.data_dir or common.synthetic_data(tmp, args.corpus_clips)
        tokenizer = CaptionTokenizer(d.tokenizer, buckets=tuple(d.text_length_buckets))
        info = common.machine()
        print(f"machine: {info}")
        rows = []
        for workers in args.workers:
            r = measure(d, data_dir, tokenizer, workers, args.batches)
            rows.append(r)
            print(f"workers {workers}: first batch {r['first_batch_s']:.1f} s; {r['batches_per_s']:.2f} batches/s, "
                  f"{r['clips_per_s']:.1f} clips/s, {r['audio_seconds_per_s']:.0f} audio-s/s "
                  f"({r['padded_audio_seconds_per_s']:.0f} padded)", flush=True)

    consumption = None
    if args.step_seconds:
        consumption = {"source": "--step-seconds", "step_s": args.step_seconds}
    elif args.step_json:
        with open(args.step_json) as f:
            step = json.load(f)
        consumption = {"source": args.step_json, "step_s": step["step"]["median_s"],
                       "padded_audio_seconds_per_s": step["audio_seconds_per_s"], "batch": step["batch"]}
    for r in rows:
        if consumption is None:
            continue
        if "padded_audio_seconds_per_s" in consumption:
            r["ratio"] = r["padded_audio_seconds_per_s"] / consumption["padded_audio_seconds_per_s"]
        else:
            r["ratio"] = r["batches_per_s"] * consumption["step_s"]
        print(f"workers {r['workers']}: pipeline / step consumption = {r['ratio']:.1f}x")
    return {"benchmark": "pipeline", "machine": info, "data_dir": args.data_dir or f"synthetic ({args.corpus_clips} clips)",
            "bucket_boundaries_s": list(d.bucket_boundaries_s), "max_audio_seconds_per_batch": d.max_audio_seconds_per_batch,
            "read_threads": d.read_threads, "rows": rows, "consumption": consumption}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="prepared TFDS data dir (default: synthesise one)")
    p.add_argument("--corpus-clips", type=int, default=300, help="clips of the synthesised corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=200, help="timed batches per worker count")
    p.add_argument("--step-seconds", type=float, help="train step seconds on these batches")
    p.add_argument("--step-json", help="benchmarks.train_step --json output")
    p.add_argument("--json")
    args, rest = p.parse_known_args(argv)
    config = common.load_config(rest)
    common.write_json(args.json, run(args, config))


if __name__ == "__main__":
    main()
