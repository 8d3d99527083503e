"""Inference benchmark: the embedding throughput of `clsp_jax.CLSP` for clips and for captions.

    python -m benchmarks.embed --config configs/clsp_base.py [--clips 32 --clip-seconds 10 --captions 256
        --text-length 128 --iters 5] [--json OUT] [--config.key=value ...]

A randomly initialised network of the config's model (weights do not change the speed) with activations in
`train.compute_dtype`. Audio: `CLSP.embed_audio` on `--clips` clips of noise, each `--clip-seconds` long, as a
user calls it (host padding, fbank, speech tower, head). Captions: `CLSP.embed_tokens` on `--captions` rows of
random token ids, `--text-length` tokens each, all valid (no tokenizer needed). Each is compiled once (timed),
then called `--iters` times after one warm-up call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from clsp_jax import perf
from clsp_jax.inference import CLSP
from clsp_jax.models.clsp import CLSPNet
from clsp_jax.train.trainer import DTYPES


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=32, help="clips per call")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="length of every clip")
    p.add_argument("--captions", type=int, default=256, help="captions per call")
    p.add_argument("--text-length", type=int, default=128, help="tokens per caption")
    p.add_argument("--iters", type=int, default=5, help="timed calls of each")
    p.add_argument("--json", help="write the results here")
    args, rest = p.parse_known_args(argv)
    return args, common.load_config(rest)


def timed(name: str, call, iters: int) -> dict:
    """{"compile_s": the first call's seconds (compilation included), "call": timing summary of `iters`
    more calls after one warm-up}."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    row = {"compile_s": first, "call": common.summary(perf.time_calls(call, warmup=1, iters=iters))}
    print(f"{name}: first call {first:.1f} s, then median {row['call']['median_s']:.4f} s", flush=True)
    return row


def run(args, config) -> dict:
    model = config.model.to_dict()
    dtype = config.train.compute_dtype
    net = CLSPNet(model, rngs=nnx.Rngs(0), dtype=DTYPES[dtype])
    clsp = CLSP(net, model)
    rng = np.random.default_rng(0)
    samples = round(args.clip_seconds * config.data.sample_rate)
    audio = (0.1 * rng.standard_normal((args.clips, samples))).astype(np.float32)
    vocab = int(config.model.text.vocab_size)
    ids = rng.integers(min(1000, vocab // 2), vocab, (args.captions, args.text_length), dtype=np.int32)
    mask = np.ones_like(ids)
    print(f"machine: {common.machine()}\nembedding {args.clips} clips x {args.clip_seconds:g} s and {args.captions} "
          f"captions x {args.text_length} tokens; dtype {dtype}", flush=True)
    audio_row = timed("audio", lambda: clsp.embed_audio(audio), args.iters)
    text_row = timed("captions", lambda: clsp.embed_tokens(ids, mask), args.iters)
    audio_s, text_s = audio_row["call"]["median_s"], text_row["call"]["median_s"]
    return {
        "benchmark": "embed",
        "machine": common.machine(),
        "compute_dtype": dtype,
        "audio": {"clips": args.clips, "clip_seconds": args.clip_seconds, **audio_row,
                  "clips_per_s": args.clips / audio_s, "audio_seconds_per_s": args.clips * args.clip_seconds / audio_s},
        "text": {"captions": args.captions, "text_length": args.text_length, **text_row,
                 "captions_per_s": args.captions / text_s},
    }


def main(argv: Sequence[str] | None = None) -> None:
    args, config = parse_args(argv)
    result = run(args, config)
    common.write_json(args.json, result)
    print(f"audio: {result['audio']['clips_per_s']:.2f} clips/s ({result['audio']['audio_seconds_per_s']:.1f} "
          f"audio-s/s); captions: {result['text']['captions_per_s']:.1f} per s")


if __name__ == "__main__":
    main()
