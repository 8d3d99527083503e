"""Pieces every benchmark shares: config files with `--config.key=value` overrides, the machine's facts,
wall-clock timing of jitted calls and the device's measured peak matmul FLOP/s (those two, and XLA's
FLOP and memory analyses, live in `clsp_jax.perf`, which the trainer uses too)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Sequence

import jax
import numpy as np


def load_config(argv: Sequence[str]):
    """The ConfigDict of `--config configs/X.py [--config.key=value ...]` in `argv` (absl's config_flags,
    as `python -m clsp_jax.train` parses it). Anything else in `argv` is an error."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["benchmark", *argv]
    # config_flags finds the override flags in the argv it is given when the flag is defined.
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file exposing get_config()", sys_argv=argv)
    flags.FLAGS(argv)  # also marks absl flags parsed, which Grain workers need
    if flags.FLAGS.config is None:
        raise SystemExit("--config configs/X.py is required")
    return flags.FLAGS.config


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def code_version() -> dict:
    """The commit measured and which of the measured files differ from it (others edit the tree too)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "clsp_jax", "configs").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": dirty}


def machine() -> dict:
    """What the figures were measured on: CPUs, load, accelerator, library versions, code version."""
    devices = jax.devices()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "code": code_version(),
    }


def summary(times: Sequence[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": [round(t, 4) for t in times]}


def memory_seen() -> dict:
    """The most memory this process has held so far: the first local device's allocator peak in bytes
    (accelerators), or, where the device reports none (CPU), the process's peak resident set in bytes."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"device_peak_bytes_in_use": int(stats["peak_bytes_in_use"])}
    return {"process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=_jsonable)
    print(f"wrote {path}")


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def synthetic_data(root: str, num_clips: int, seed: int = 0, workers: int = 2) -> str:
    """An espeak-ng FCaps corpus of `num_clips` clips (train split ~90%) prepared as a TFDS ArrayRecord
    dir under `root`; returns the data dir to pass as `data.data_dir`."""
    from data_prep import synth_corpus
    from data_prep.prepare import BuildSettings, prepare

    corpus, data_dir = os.path.join(root, "corpus"), os.path.join(root, "data")
    start = time.perf_counter()
    synth_corpus.build(corpus, num_clips, seed, workers=workers, log=lambda m: None)
    prepare([os.path.join(corpus, "synth_cuts_train.jsonl.gz")], split="train", data_dir=data_dir,
            settings=BuildSettings(audio_root=corpus), workers=1)
    print(f"synthetic corpus: {num_clips} clips synthesised and prepared in {time.perf_counter() - start:.0f} s "
          f"({data_dir})", flush=True)
    return data_dir
